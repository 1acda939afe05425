//! The systemd units, under a real systemd booted as PID 1 of its own PID and mount
//! namespaces, on an overlay copy of `/` (never on the host root: its boot would clean
//! the host's /tmp), attached as one host of a namespace LAN, in a cgroup (and cgroup
//! namespace) of its own.

mod support;
mod systemd_support;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use support::words::{words, words_then};
use support::{Lan, binary, eventually, peer_names, wait_event, watch};
use systemd_support::{Cgroup, host_mounts_under};

/// Units of the image that have no business in this test machine.
const MASKED: &[&str] = &[
    "avahi-daemon.service",
    "avahi-daemon.socket",
    "systemd-timesyncd.service",
    "systemd-pstore.service",
    "postgresql.service",
    "e2scrub_reap.service",
    "getty@tty1.service",
    "systemd-udevd.service",
    "systemd-udev-trigger.service",
    "systemd-networkd-wait-online.service",
    "NetworkManager-wait-online.service",
];

/// A booted systemd. Dropping it kills systemd (PID 1 of its namespace, so everything
/// in it dies); the mount namespace, overlay included, goes with it, then its cgroup.
/// If the test process itself is killed, the launcher dies with it (parent-death
/// signal) and takes systemd along (`unshare --kill-child`).
struct Machine {
    launcher: Child,
    /// systemd's PID as seen from here; 0 until it is found.
    pid: u32,
    dir: PathBuf,
    /// Dropped after the processes are killed (fields drop after `Drop::drop`).
    cgroup: Cgroup,
}

impl Machine {
    fn boot(lan: &Lan, host: usize, key: &Path) -> Machine {
        let dir = lan.dir().join("machine");
        let (upper, work, root) = (dir.join("upper"), dir.join("work"), dir.join("root"));
        for d in [&upper, &work, &root] {
            std::fs::create_dir_all(d).unwrap();
        }
        // What the test installs, written into the overlay's upper layer.
        let put = |path: &str, bytes: &[u8], mode: u32| {
            let p = upper.join(path.trim_start_matches('/'));
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(&p, bytes).unwrap();
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
        };
        let root_dir = root.clone();
        let units = Path::new(env!("CARGO_MANIFEST_DIR")).join("systemd");
        put(
            "/usr/local/bin/localnet",
            &std::fs::read(binary()).unwrap(),
            0o755,
        );
        for unit in ["localnet.service", "localnet-slave.service"] {
            put(
                &format!("/etc/systemd/system/{unit}"),
                &std::fs::read(units.join(unit)).unwrap(),
                0o644,
            );
        }
        put(
            "/usr/lib/sysusers.d/localnet.conf",
            &std::fs::read(units.join("localnet.sysusers")).unwrap(),
            0o644,
        );
        put(
            "/etc/localnet/cluster.key",
            &std::fs::read(key).unwrap(),
            0o640,
        );
        {
            use std::os::unix::fs::PermissionsExt;
            let etc = upper.join("etc/localnet");
            std::fs::set_permissions(etc, std::fs::Permissions::from_mode(0o750)).unwrap();
        }
        // The machine's journal in memory (/run), not in the image's /var/log/journal.
        put(
            "/etc/systemd/journald.conf.d/test.conf",
            b"[Journal]\nStorage=volatile\n",
            0o644,
        );
        // A short watchdog, so the test sees it act.
        put(
            "/etc/systemd/system/localnet.service.d/test.conf",
            b"[Service]\nWatchdogSec=2s\n",
            0o644,
        );
        put(
            "/etc/systemd/system/localnet-test.target",
            b"[Unit]\nDescription=localnet test machine\nRequires=sysinit.target sockets.target\nAfter=sysinit.target sockets.target\nAllowIsolate=yes\n",
            0o644,
        );
        for unit in MASKED {
            let link = upper.join("etc/systemd/system").join(unit);
            let _ = std::os::unix::fs::symlink("/dev/null", link);
        }
        // All mounts happen in the machine's own mount namespace (private propagation),
        // so none reaches the host and all go when it dies. /sys/fs/cgroup is a cgroup2
        // mount of the machine's cgroup namespace: only its own subtree. /dev holds only
        // the harmless devices (no disks, no kernel log). alice may use
        // the control socket (group localnet), bob may not.
        let script = format!(
            "set -e
mount -t overlay overlay -o lowerdir=/,upperdir={up},workdir={wk} {root}
mount -t proc proc {root}/proc
mount --rbind /sys {root}/sys
mount -t cgroup2 cgroup2 {root}/sys/fs/cgroup
mount -t tmpfs -o mode=755,nosuid tmpfs {root}/dev
for d in null zero full random urandom tty; do touch {root}/dev/$d; mount --bind /dev/$d {root}/dev/$d; done
mkdir {root}/dev/pts {root}/dev/shm
mount -t devpts -o newinstance,ptmxmode=0666,mode=620 devpts {root}/dev/pts
ln -s pts/ptmx {root}/dev/ptmx
mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs {root}/dev/shm
ln -s /proc/self/fd {root}/dev/fd
mount -t tmpfs tmpfs {root}/run
mount -t tmpfs tmpfs {root}/tmp
chroot {root} systemd-sysusers
chroot {root} chgrp localnet /etc/localnet /etc/localnet/cluster.key
chroot {root} useradd --no-create-home --shell /usr/sbin/nologin --groups localnet alice
chroot {root} useradd --no-create-home --shell /usr/sbin/nologin bob
exec chroot {root} env container=localnet-test /lib/systemd/systemd --system --unit=localnet-test.target",
            up = upper.display(),
            wk = work.display(),
            root = root.display()
        );
        let log = std::fs::File::create(dir.join("boot.log")).unwrap();
        let cgroup = Cgroup::new(&format!("localnet-test-{}", std::process::id()));
        let procs = cgroup.procs_file();
        let mut launcher = Command::new("ip");
        launcher
            .args([
                "netns",
                "exec",
                &lan.ns(host),
                "unshare",
                "--pid",
                "--fork",
                "--kill-child",
                "--mount",
                "--uts",
                "--ipc",
                "--cgroup",
            ])
            .args(["--propagation", "private", "sh", "-c", &script])
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        use std::os::unix::process::CommandExt;
        // SAFETY: only async-signal-safe calls (prctl, open, write, close) on memory
        // prepared before the fork.
        unsafe {
            launcher.pre_exec(move || {
                // Die with the test (the parent-death signal survives exec), and enter
                // the machine's cgroup before `unshare --cgroup` roots a namespace there.
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                let fd = libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
                if fd < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                let written = libc::write(fd, b"0".as_ptr().cast(), 1);
                let error = std::io::Error::last_os_error();
                libc::close(fd);
                if written != 1 {
                    return Err(error);
                }
                Ok(())
            });
        }
        let launcher = launcher.spawn().expect("start unshare");
        // systemd is the child of unshare (it forked into the new PID namespace).
        let mut machine = Machine {
            launcher,
            pid: 0,
            dir,
            cgroup,
        };
        let launcher_pid = machine.launcher.id();
        let found = eventually(Duration::from_secs(10), || {
            let children = std::fs::read_to_string(format!(
                "/proc/{launcher_pid}/task/{launcher_pid}/children"
            ))
            .unwrap_or_default();
            let Some(p) = children
                .split_whitespace()
                .next()
                .and_then(|p| p.parse::<u32>().ok())
            else {
                return false;
            };
            let is_systemd = std::fs::read_to_string(format!("/proc/{p}/comm"))
                .is_ok_and(|c| c.trim() == "systemd");
            if is_systemd {
                machine.pid = p;
            }
            is_systemd
        });
        assert!(found, "systemd did not start:\n{}", machine.boot_log());
        let booted = eventually(Duration::from_secs(60), || {
            let state = machine.run(&["systemctl", "is-system-running"]);
            let s = String::from_utf8_lossy(&state.stdout);
            s.contains("running") || s.contains("degraded")
        });
        assert!(
            booted,
            "systemd did not finish booting:\n{}\n{}",
            machine.boot_log(),
            machine.text(&["systemctl", "--failed", "--no-pager"])
        );
        let leaked = host_mounts_under(&root_dir);
        assert!(
            leaked.is_empty(),
            "the machine's mounts reached the host: {leaked:?}"
        );
        machine
    }

    fn boot_log(&self) -> String {
        std::fs::read_to_string(self.dir.join("boot.log")).unwrap_or_default()
    }

    /// Runs a command inside the machine (its mount, PID, root and working directory).
    fn run(&self, args: &[&str]) -> Output {
        let pid = self.pid.to_string();
        Command::new("nsenter")
            .args(["-t", &pid, "-m", "-p", "-n", "-r", "-w"])
            .args(args)
            .output()
            .expect("nsenter")
    }

    fn text(&self, args: &[&str]) -> String {
        let out = self.run(args);
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    }

    fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "{args:?} failed: {}{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            self.text(&["journalctl", "--no-pager", "-n", "60"])
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    fn main_pid(&self, unit: &str) -> u32 {
        self.ok(&["systemctl", "show", "-p", "MainPID", "--value", unit])
            .parse()
            .unwrap_or(0)
    }

    fn active(&self, unit: &str) -> bool {
        self.text(&["systemctl", "is-active", unit]).trim() == "active"
    }
}

impl Drop for Machine {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("----- boot log -----\n{}", self.boot_log());
            eprintln!(
                "----- journal -----\n{}",
                self.text(&["journalctl", "--no-pager", "-n", "100"])
            );
        }
        if self.pid > 0 {
            // SAFETY: kill only sends a signal; self.pid is the systemd this test started
            // (never 0, which would signal our whole process group).
            unsafe {
                libc::kill(self.pid as i32, libc::SIGKILL);
            }
        }
        // unshare kills its child (systemd) when it dies (--kill-child), and exits only
        // once that child is gone, which as PID 1 ends every process of the namespace.
        let _ = self.launcher.kill();
        let _ = self.launcher.wait();
        let deadline = Instant::now() + Duration::from_secs(5);
        while !self.cgroup.empty() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        // The mount namespace died with its last process; the overlay went with it.
        // Should a mount have leaked to this namespace, detach it, deepest first.
        let mut leaked: Vec<String> = host_mounts_under(&self.dir)
            .iter()
            .filter_map(|l| l.split_whitespace().nth(4).map(str::to_string))
            .collect();
        leaked.sort_by_key(|m| std::cmp::Reverse(m.len()));
        for mount in leaked {
            let _ = Command::new("umount").args(["-l", &mount]).output();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[test]
fn units_under_a_real_systemd() {
    let Some(lan) = Lan::new("sysd", 71, 2) else {
        return;
    };
    let key = std::path::PathBuf::from(lan.key("cluster"));
    // Host 1: a plain daemon outside the machine, with the same key.
    lan.daemon(1, &["--key-file", key.to_str().unwrap()]);
    let events = watch(&lan.sock(1));
    let machine = Machine::boot(&lan, 0, &key);

    // Both units are clean for systemd-analyze.
    let verify = machine.run(&words(
        "systemd-analyze verify localnet.service localnet-slave.service",
    ));
    let complaints = String::from_utf8_lossy(&verify.stderr).to_string();
    assert!(
        verify.status.success() && complaints.trim().is_empty(),
        "verify: {complaints}"
    );

    // Type=notify: `systemctl start` returns once the daemon said READY=1, and by then
    // its control socket answers.
    let started = Instant::now();
    machine.ok(&["systemctl", "start", "localnet"]);
    println!("systemctl start localnet took {:?}", started.elapsed());
    assert!(machine.active("localnet"));
    machine.ok(&["localnet", "status", "--json"]);
    let journal = machine.text(&["journalctl", "-u", "localnet", "--no-pager"]);
    assert!(journal.contains("localnet daemon running"), "{journal}");

    // `localnet peers` inside sees the daemon outside, and the outside sees the inside.
    assert!(eventually(Duration::from_secs(5), || machine
        .text(&["localnet", "peers", "--json"])
        .contains("\"h1\"")));
    assert!(eventually(Duration::from_secs(5), || peer_names(
        &lan.sock(1)
    )
    .len()
        == 1));
    let inside = peer_names(&lan.sock(1))[0].clone();
    let status = machine.text(&["systemctl", "status", "localnet", "--no-pager"]);
    assert!(status.contains("1 peers known"), "{status}");

    // Members of the group `localnet` may use the control socket without root; others
    // may not.
    let member = machine.run(&[
        "runuser", "-u", "alice", "--", "localnet", "status", "--json",
    ]);
    assert!(
        member.status.success(),
        "a member of the group localnet cannot use the control socket: {}",
        String::from_utf8_lossy(&member.stderr)
    );
    assert!(
        machine
            .text(&[
                "runuser", "-u", "alice", "--", "localnet", "peers", "--json"
            ])
            .contains("\"h1\""),
        "`localnet peers` as a member of the group"
    );
    let other = machine.run(&words(
        "runuser -u bob -- localnet status --control /run/localnet/control.sock",
    ));
    assert!(
        !other.status.success()
            && String::from_utf8_lossy(&other.stderr).contains("ermission denied"),
        "someone outside the group reached the control socket: {}{}",
        String::from_utf8_lossy(&other.stdout),
        String::from_utf8_lossy(&other.stderr)
    );

    // kill -9 of the main PID: systemd restarts it and it rejoins (same id: the state
    // directory keeps it; a new incarnation).
    let first = machine.main_pid("localnet");
    machine.ok(&["kill", "-9", &first.to_string()]);
    assert!(
        eventually(Duration::from_secs(10), || machine.active("localnet")
            && machine.main_pid("localnet") != first),
        "not restarted after kill -9"
    );
    // Restarting takes longer than its TTL, so the peer outside sees it fail and join
    // again (or, if quicker, an update to a new incarnation).
    let rejoined = eventually(Duration::from_secs(5), || {
        events.try_iter().any(|(_, e)| {
            (e["event"] == "joined" || e["event"] == "updated")
                && e["peer"]["name"] == inside.as_str()
        })
    });
    assert!(rejoined, "did not rejoin");

    // A hung daemon (SIGSTOP) is restarted by the watchdog (WatchdogSec=2s here).
    let hung = machine.main_pid("localnet");
    machine.ok(&["kill", "-STOP", &hung.to_string()]);
    assert!(
        eventually(Duration::from_secs(20), || machine.active("localnet")
            && machine.main_pid("localnet") != hung),
        "the watchdog did not restart a hung daemon:\n{}",
        machine.text(&["journalctl", "-u", "localnet", "--no-pager", "-n", "20"])
    );
    let journal = machine.text(&["journalctl", "-u", "localnet", "--no-pager"]);
    assert!(journal.to_lowercase().contains("watchdog"), "{journal}");
    assert!(eventually(Duration::from_secs(5), || peer_names(
        &lan.sock(1)
    )
    .len()
        == 1));
    std::thread::sleep(Duration::from_millis(500));
    while events.try_recv().is_ok() {}

    // systemctl stop: the peer outside sees `left` within 100 ms.
    let stopping = Instant::now();
    machine.ok(&["systemctl", "stop", "localnet"]);
    let left = wait_event(&events, "left", &inside, Duration::from_secs(2)).expect("no left event");
    println!(
        "left seen {:?} after `systemctl stop` began",
        left - stopping
    );
    assert!(
        left - stopping < Duration::from_millis(100),
        "{:?}",
        left - stopping
    );
    assert_eq!(
        machine.text(&["systemctl", "is-active", "localnet"]).trim(),
        "inactive",
        "a clean stop is not a failure"
    );

    // The journal holds the daemon's lines, at their syslog priorities.
    let journal = machine.text(&words("journalctl -u localnet --no-pager -o verbose"));
    assert!(journal.contains("goodbye sent"), "{journal}");
    // Native journal entries from the daemon itself: INFO is priority 6, the message
    // carries no timestamp or level of its own.
    let entries: Vec<serde_json::Value> = machine
        .text(&["journalctl", "-u", "localnet", "--no-pager", "-o", "json"])
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let running = entries
        .iter()
        .find(|e| e["MESSAGE"] == "localnet daemon running")
        .unwrap_or_else(|| panic!("no daemon entry in {entries:?}"));
    assert_eq!(running["PRIORITY"], "6", "{running}");
    assert_eq!(running["_TRANSPORT"], "journal", "{running}");
    assert_eq!(running["SYSLOG_IDENTIFIER"], "localnet", "{running}");
    let watchdog = entries.iter().find(|e| {
        e["MESSAGE"]
            .as_str()
            .is_some_and(|m| m.contains("Watchdog timeout"))
    });
    assert!(watchdog.is_some(), "systemd logged no watchdog timeout");

    // The slave unit takes a job from a master outside the machine.
    machine.ok(&["systemctl", "start", "localnet-slave"]);
    let line = format!(
        "master --interface eth0 --key-file {} --slaves 1 --wait 5s -- sh -c",
        key.display()
    );
    let script = "echo job ran as $(id -un) in $(pwd)";
    let out = lan.run(1, &binary(), &words_then(&line, &[script]));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("job ran as localnet in /var/lib/localnet-slave"),
        "{stdout}"
    );
    machine.ok(&["systemctl", "stop", "localnet-slave"]);
}
