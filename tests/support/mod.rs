//! A simulated LAN of network namespaces for multi-host tests (and the benchmark).
//!
//! Each [`Lan`] makes a "switch" namespace holding a bridge, and one namespace per host
//! with an `eth0` veth on that bridge, an address `10.S.0.i/16` and a default route
//! (so multicast has a route). Nothing touches the root namespace's interfaces. The
//! guard kills every process it started (by PID) and deletes its namespaces when
//! dropped, panics included.
//!
//! Not root: tests skip with a message, unless `LOCALNET_REQUIRE_NETNS=1` (set by CI),
//! which turns the skip into a failure.
#![allow(dead_code)]
pub mod words;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::net::Ipv4Addr;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Mutex;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

/// The `localnet` binary under test.
pub fn binary() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_localnet"))
}

/// An example binary built alongside the tests (`target/<profile>/examples/NAME`).
pub fn example(name: &str) -> PathBuf {
    binary()
        .parent()
        .expect("target dir")
        .join("examples")
        .join(name)
}

/// Returns false (after saying why) when namespace tests cannot run here; panics
/// instead under `LOCALNET_REQUIRE_NETNS=1`.
pub fn netns_available() -> bool {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let ip = Command::new("ip").arg("-V").output().is_ok();
    let why = match (root, ip) {
        (true, true) => return true,
        (false, _) => "not root: network namespaces need root",
        (true, false) => "the `ip` command (iproute2) is missing",
    };
    if std::env::var("LOCALNET_REQUIRE_NETNS").as_deref() == Ok("1") {
        panic!("LOCALNET_REQUIRE_NETNS=1 but namespace tests cannot run: {why}");
    }
    eprintln!("skipping: {why} (set LOCALNET_REQUIRE_NETNS=1 to make this a failure)");
    false
}

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("run ip");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// One program for [`Lan::spawn_together`]: run `program args` (with `env` added) in host
/// `host`'s namespace, stdout to `<dir>/<log>.out` and stderr to `<dir>/<log>.log`.
pub struct Start {
    pub host: usize,
    pub log: String,
    pub program: PathBuf,
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
}

/// Now, in seconds since the Unix epoch.
fn unix_seconds() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// A LAN of `hosts` namespaces on one bridge.
pub struct Lan {
    prefix: String,
    hosts: usize,
    subnet: u8,
    dir: PathBuf,
    children: Mutex<Vec<(String, Child)>>,
    /// Loss set with [`Lan::set_loss`], percent per host.
    loss: Mutex<BTreeMap<usize, u8>>,
}

impl Lan {
    /// Builds the LAN; `None` when namespace tests cannot run (see [`netns_available`]).
    /// `tag` names the test (keep it short) and `subnet` must be unique per test.
    pub fn new(tag: &str, subnet: u8, hosts: usize) -> Option<Lan> {
        if !netns_available() {
            return None;
        }
        if hosts > 10 {
            // The neighbour tables are shared by all namespaces; many hosts overflow
            // them (IPv6's too: Serf and Avahi speak it, and its link-local addresses).
            for ip in ["ipv4", "ipv6"] {
                for (k, v) in [("1", "4096"), ("2", "8192"), ("3", "16384")] {
                    let path = format!("/proc/sys/net/{ip}/neigh/default/gc_thresh{k}");
                    let _ = std::fs::write(path, v);
                }
            }
        }
        let prefix = format!("ln{tag}{}", std::process::id() % 100_000);
        let dir = std::env::temp_dir().join(format!("{prefix}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let lan = Lan {
            prefix,
            hosts,
            subnet,
            dir,
            children: Mutex::new(Vec::new()),
            loss: Mutex::new(BTreeMap::new()),
        };
        let sw = lan.switch();
        ip(&["netns", "add", &sw]);
        ip(&["-n", &sw, "link", "add", "br0", "type", "bridge"]);
        ip(&["-n", &sw, "link", "set", "br0", "up"]);
        for i in 0..hosts {
            let ns = lan.ns(i);
            ip(&["netns", "add", &ns]);
            let port = format!("v{i}");
            ip(&[
                "link", "add", "name", "eth0", "netns", &ns, "type", "veth", "peer", "name", &port,
                "netns", &sw,
            ]);
            ip(&["-n", &sw, "link", "set", &port, "master", "br0", "up"]);
            let addr = format!("{}/16", lan.ip(i));
            ip(&["-n", &ns, "addr", "add", &addr, "dev", "eth0"]);
            ip(&["-n", &ns, "link", "set", "eth0", "up"]);
            ip(&["-n", &ns, "link", "set", "lo", "up"]);
            ip(&["-n", &ns, "route", "add", "default", "dev", "eth0"]);
        }
        Some(lan)
    }

    fn switch(&self) -> String {
        format!("{}sw", self.prefix)
    }

    /// Namespace name of host `i`.
    pub fn ns(&self, i: usize) -> String {
        format!("{}h{i}", self.prefix)
    }

    /// Address of host `i`.
    pub fn ip(&self, i: usize) -> Ipv4Addr {
        Ipv4Addr::new(10, self.subnet, (i / 250) as u8, (i % 250 + 1) as u8)
    }

    /// Number of hosts.
    pub fn hosts(&self) -> usize {
        self.hosts
    }

    /// The LAN's scratch directory (logs, sockets, keys).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Writes a new cluster key `<dir>/<name>.key` with `localnet key generate`; its path.
    pub fn key(&self, name: &str) -> String {
        let path = self.dir.join(format!("{name}.key"));
        let out = Command::new(binary())
            .args(["key", "generate", "--out", path.to_str().unwrap()])
            .output()
            .expect("run localnet key generate");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        path.to_str().unwrap().to_string()
    }

    /// Control socket path for host `i`'s daemon.
    pub fn sock(&self, i: usize) -> PathBuf {
        self.dir.join(format!("h{i}.sock"))
    }

    /// `program`, to be run in host `i`'s network namespace: the child enters it
    /// (`setns`) before it execs, with no `ip netns exec` in between (which would cost a
    /// process and a sysfs mount per start, and skew simultaneous starts). Nothing else
    /// changes: programs that need a mount namespace of their own make it (`unshare`).
    pub fn command(&self, i: usize, program: &Path) -> Command {
        use std::os::fd::AsRawFd;
        use std::os::unix::process::CommandExt;
        let path = format!("/var/run/netns/{}", self.ns(i));
        let ns = std::fs::File::open(&path).unwrap_or_else(|e| panic!("open {path}: {e}"));
        let mut command = Command::new(program);
        // SAFETY: setns is async-signal-safe; the namespace's fd lives in the closure,
        // open until the child has entered it (it is close-on-exec).
        unsafe {
            command.pre_exec(
                move || match libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) {
                    0 => Ok(()),
                    _ => Err(std::io::Error::last_os_error()),
                },
            );
        }
        command
    }

    /// Starts `program args` in host `i`'s namespace, stderr to `<dir>/<log>.log`;
    /// returns its PID.
    pub fn spawn(&self, i: usize, log: &str, program: &Path, args: &[&str]) -> u32 {
        let err = std::fs::File::create(self.dir.join(format!("{log}.log"))).expect("log file");
        let out = std::fs::File::create(self.dir.join(format!("{log}.out"))).expect("out file");
        let child = self
            .command(i, program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .expect("spawn");
        let pid = child.id();
        self.children.lock().unwrap().push((log.to_string(), child));
        pid
    }

    /// Starts every program of `starts` at the same instant: each child is forked and
    /// held just before its `exec` (blocked reading a byte from a pipe), and once every
    /// one is held a byte per child is written at once, which lets them all go. Forking one after the other from a
    /// large process takes milliseconds each, so a plain loop of [`Lan::spawn`] spreads a
    /// start of 50 over 150 ms. Returns the PIDs (in the order of `starts`) and the
    /// moment they were let go, in Unix seconds.
    pub fn spawn_together(&self, starts: &[Start]) -> (Vec<u32>, f64) {
        use std::os::fd::AsRawFd;
        use std::os::unix::process::CommandExt;
        let (gate_read, gate_write) = std::io::pipe().expect("gate pipe");
        let (mut held_read, held_write) = std::io::pipe().expect("held pipe");
        let (gate_r, held_w) = (gate_read.as_raw_fd(), held_write.as_raw_fd());
        let mut commands = Vec::new();
        for start in starts {
            let log = |ext: &str| {
                let path = self.dir.join(format!("{}.{ext}", start.log));
                std::fs::File::create(&path).unwrap_or_else(|e| panic!("{path:?}: {e}"))
            };
            let mut command = self.command(start.host, &start.program);
            command
                .args(&start.args)
                .envs(start.env.iter().map(|(k, v)| (k, v)))
                .stdin(Stdio::null())
                .stdout(log("out"))
                .stderr(log("log"));
            // SAFETY: write and read are async-signal-safe, and nothing here allocates;
            // the fds stay open in this process until every child has been let go and
            // spawn has returned. Each child takes one byte of the gate: a child forked
            // meanwhile by another thread cannot hold the gate shut.
            unsafe {
                command.pre_exec(move || {
                    if libc::write(held_w, b"h".as_ptr().cast(), 1) != 1 {
                        return Err(std::io::Error::last_os_error());
                    }
                    let mut byte = 0u8;
                    loop {
                        match libc::read(gate_r, (&raw mut byte).cast(), 1) {
                            1 => return Ok(()),
                            n if n < 0 && *libc::__errno_location() == libc::EINTR => {}
                            _ => return Err(std::io::Error::from_raw_os_error(libc::EIO)),
                        }
                    }
                });
            }
            commands.push(command);
        }
        let mut released = 0.0;
        let children: Vec<std::io::Result<Child>> = std::thread::scope(|scope| {
            let threads: Vec<_> = commands
                .into_iter()
                .map(|mut command| {
                    let held = &held_write;
                    scope.spawn(move || {
                        // spawn returns once the child has exec'd (or failed to).
                        let child = command.spawn();
                        if child.is_err() {
                            // The child never said it was held: say it for it.
                            let _ = (&*held).write_all(b"x");
                        }
                        child
                    })
                })
                .collect();
            let mut bytes = vec![0u8; starts.len()];
            std::io::Read::read_exact(&mut held_read, &mut bytes).expect("held pipe");
            released = unix_seconds();
            (&gate_write)
                .write_all(&vec![b'g'; starts.len()])
                .expect("gate pipe");
            threads
                .into_iter()
                .map(|t| t.join().expect("spawning thread"))
                .collect()
        });
        // Every child that started is kept (and so ended by the guard) before a failed
        // one fails the test.
        let mut pids = Vec::new();
        let mut failed = Vec::new();
        let mut own = self.children.lock().unwrap();
        for (start, child) in starts.iter().zip(children) {
            match child {
                Ok(child) => {
                    pids.push(child.id());
                    own.push((start.log.clone(), child));
                }
                Err(e) => failed.push(format!("spawn {:?}: {e}", start.program)),
            }
        }
        drop(own);
        assert!(failed.is_empty(), "{}", failed.join("\n"));
        (pids, released)
    }

    /// Starts `localnet daemon` on host `i` (name `h<i>`, control socket [`Lan::sock`])
    /// and waits until its control socket answers.
    pub fn daemon(&self, i: usize, extra: &[&str]) -> u32 {
        self.daemon_wrapped(i, &[], extra)
    }

    /// The arguments of `localnet daemon` on host `i`: name `h<i>`, interface eth0,
    /// control socket [`Lan::sock`].
    pub fn daemon_args(&self, i: usize) -> Vec<String> {
        let sock = self.sock(i).to_string_lossy().into_owned();
        let name = format!("h{i}");
        [
            "daemon",
            "--name",
            &name,
            "--interface",
            "eth0",
            "--control",
            &sock,
        ]
        .map(str::to_string)
        .to_vec()
    }

    /// [`Lan::daemon`] run through a wrapper command that execs it (such as `env
    /// VAR=...`, see [`faketime`]), so that the PID is still the daemon's.
    pub fn daemon_wrapped(&self, i: usize, wrapper: &[String], extra: &[&str]) -> u32 {
        let sock = self.sock(i);
        let _ = std::fs::remove_file(&sock);
        let name = format!("h{i}");
        let own = self.daemon_args(i);
        let mut args: Vec<&str> = own.iter().map(String::as_str).collect();
        args.extend_from_slice(extra);
        let bin = binary();
        let pid = match wrapper.split_first() {
            None => self.spawn(i, &name, &bin, &args),
            Some((program, rest)) => {
                let mut all: Vec<&str> = rest.iter().map(String::as_str).collect();
                all.push(bin.to_str().expect("binary path"));
                all.extend_from_slice(&args);
                self.spawn(i, &name, Path::new(program), &all)
            }
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while UnixStream::connect(&sock).is_err() {
            assert!(
                Instant::now() < deadline,
                "daemon h{i} did not start:\n{}",
                self.log(&name)
            );
            assert!(alive(pid), "daemon h{i} exited:\n{}", self.log(&name));
            std::thread::sleep(Duration::from_millis(5));
        }
        pid
    }

    /// Runs `program args` in host `i`'s namespace to completion.
    pub fn run(&self, i: usize, program: &Path, args: &[&str]) -> Output {
        self.command(i, program)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("run in namespace")
    }

    /// Runs `f` on a thread whose network namespace is host `i`'s (setns affects only
    /// the calling thread), so tests can use the library as that host.
    pub fn within<T: Send + 'static>(&self, i: usize, f: impl FnOnce() -> T + Send + 'static) -> T {
        let path = format!("/var/run/netns/{}", self.ns(i));
        std::thread::spawn(move || {
            let file = std::fs::File::open(&path).expect("open netns");
            use std::os::fd::AsRawFd;
            // SAFETY: setns on a valid namespace fd; it changes only this thread.
            let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
            f()
        })
        .join()
        .expect("thread in namespace")
    }

    /// The stderr log of a spawned process.
    pub fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.join(format!("{name}.log"))).unwrap_or_default()
    }

    /// The stdout of a spawned process.
    pub fn out(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.join(format!("{name}.out"))).unwrap_or_default()
    }

    /// Waits for a spawned process to exit; its exit code, or None on timeout.
    pub fn wait(&self, pid: u32, timeout: Duration) -> Option<i32> {
        let deadline = Instant::now() + timeout;
        loop {
            {
                let mut children = self.children.lock().unwrap();
                if let Some((_, child)) = children.iter_mut().find(|(_, c)| c.id() == pid)
                    && let Ok(Some(status)) = child.try_wait()
                {
                    return Some(status.code().unwrap_or(-1));
                }
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// Sends `signal` to a process this LAN started, unless it has exited (and been
    /// reaped: its PID may be another process's by now).
    pub fn signal(&self, pid: u32, signal: i32) {
        let mut children = self.children.lock().unwrap();
        let mut ours = children
            .iter_mut()
            .filter(|(_, c)| c.id() == pid)
            .peekable();
        assert!(
            ours.peek().is_some(),
            "only processes this LAN started are signalled"
        );
        if !ours.any(|(_, c)| matches!(c.try_wait(), Ok(None))) {
            return;
        }
        // SAFETY: kill only sends a signal, to a child we started and have not reaped.
        unsafe {
            libc::kill(pid as i32, signal);
        }
    }

    /// Runs an nftables script in the switch namespace.
    fn nft(&self, script: &str) {
        let mut child = Command::new("ip")
            .args(["netns", "exec", &self.switch(), "nft", "-f", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run nft (apt-get install nftables)");
        child
            .stdin
            .take()
            .expect("nft stdin")
            .write_all(script.as_bytes())
            .expect("write nft script");
        let out = child.wait_with_output().expect("wait for nft");
        assert!(
            out.status.success(),
            "nft -f:\n{script}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// The switch's `faults` table: a bridge-family filter on forwarded frames, chain
    /// `loss` for [`Lan::set_loss`] and chain `part` for [`Lan::partition`].
    fn fault_table() -> &'static str {
        "add table bridge faults\n\
         add chain bridge faults loss { type filter hook forward priority 0; policy accept; }\n\
         add chain bridge faults part { type filter hook forward priority 1; policy accept; }\n"
    }

    /// Drops `percent` % of the frames the switch delivers to host `i` (each frame and
    /// each receiver drawn independently: with every host at P, every datagram is lost
    /// with probability P on its way to each receiver). 0 removes the loss.
    pub fn set_loss(&self, i: usize, percent: u8) {
        let mut loss = self.loss.lock().unwrap();
        match percent {
            0 => loss.remove(&i),
            p => loss.insert(i, p.min(100)),
        };
        let mut script = format!("{}flush chain bridge faults loss\n", Self::fault_table());
        for (host, p) in loss.iter() {
            script.push_str(&format!(
                "add rule bridge faults loss oifname \"v{host}\" numgen random mod 100 < {p} counter drop\n"
            ));
        }
        self.nft(&script);
    }

    /// Cuts every frame between hosts of `a` and hosts of `b` (both ways); [`Lan::heal`]
    /// ends it. Frames within each side still pass.
    pub fn partition(&self, a: &[usize], b: &[usize]) {
        let ports = |side: &[usize]| {
            side.iter()
                .map(|i| format!("\"v{i}\""))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let (pa, pb) = (ports(a), ports(b));
        self.nft(&format!(
            "{}add rule bridge faults part iifname {{ {pa} }} oifname {{ {pb} }} drop\n\
             add rule bridge faults part iifname {{ {pb} }} oifname {{ {pa} }} drop\n",
            Self::fault_table()
        ));
    }

    /// Frames dropped so far by [`Lan::set_loss`]'s rules now in force (each rule counts).
    pub fn lost_frames(&self) -> u64 {
        let out = Command::new("ip")
            .args([
                "netns",
                "exec",
                &self.switch(),
                "nft",
                "list",
                "chain",
                "bridge",
                "faults",
                "loss",
            ])
            .output()
            .expect("run nft list");
        let text = String::from_utf8_lossy(&out.stdout);
        text.split_whitespace()
            .collect::<Vec<_>>()
            .windows(2)
            .filter(|w| w[0] == "packets")
            .filter_map(|w| w[1].parse::<u64>().ok())
            .sum()
    }

    /// Ends every partition (loss set with [`Lan::set_loss`] stays).
    pub fn heal(&self) {
        self.nft(&format!(
            "{}flush chain bridge faults part\n",
            Self::fault_table()
        ));
    }

    /// Prints every log; call when a test is about to fail.
    pub fn dump_logs(&self) {
        for (name, _) in self.children.lock().unwrap().iter() {
            eprintln!("----- {name} -----\n{}", self.log(name));
        }
    }
}

impl Drop for Lan {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.dump_logs();
        }
        let mut children = self.children.lock().unwrap_or_else(|e| e.into_inner());
        for (_, child) in children.iter_mut() {
            let _ = child.kill();
            let _ = child.wait();
        }
        for i in 0..self.hosts {
            let _ = Command::new("ip")
                .args(["netns", "del", &self.ns(i)])
                .output();
        }
        let _ = Command::new("ip")
            .args(["netns", "del", &self.switch()])
            .output();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Whether `program` can be run (found on PATH); when not, says so, and panics under
/// `LOCALNET_REQUIRE_NETNS=1` (CI must install it: `apt-get install -y PACKAGE`).
pub fn tool_available(program: &str, package: &str) -> bool {
    let found = std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|dir| dir.join(program).is_file()))
        || Path::new("/usr/sbin").join(program).is_file();
    if found {
        return true;
    }
    if std::env::var("LOCALNET_REQUIRE_NETNS").as_deref() == Ok("1") {
        panic!("LOCALNET_REQUIRE_NETNS=1 but {program} is missing: apt-get install -y {package}");
    }
    eprintln!("skipping: {program} is missing (apt-get install -y {package})");
    false
}

/// A wrapper for [`Lan::daemon_wrapped`] (or `spawn` of `env`) that runs a program with
/// its wall clock `offset` off (`+40s`, `-20s`) through libfaketime; its monotonic clock
/// stays true. `None` (after saying why) when libfaketime is not installed; a panic under
/// `LOCALNET_REQUIRE_NETNS=1`.
pub fn faketime(offset: &str) -> Option<Vec<String>> {
    let candidates = [
        "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1",
        "/usr/lib/aarch64-linux-gnu/faketime/libfaketime.so.1",
        "/usr/lib/faketime/libfaketime.so.1",
    ];
    let Some(lib) = candidates.iter().find(|p| Path::new(p).is_file()) else {
        if std::env::var("LOCALNET_REQUIRE_NETNS").as_deref() == Ok("1") {
            panic!(
                "LOCALNET_REQUIRE_NETNS=1 but libfaketime is missing: apt-get install -y faketime"
            );
        }
        eprintln!("skipping: libfaketime is missing (apt-get install -y faketime)");
        return None;
    };
    Some(vec![
        "env".into(),
        format!("LD_PRELOAD={lib}"),
        format!("FAKETIME={offset}"),
        "FAKETIME_DONT_FAKE_MONOTONIC=1".into(),
    ])
}

/// Starts `localnet slave` on host `i` of `lan`, named `s<i>` (its log and output
/// under that name, see [`Lan::log`]), discovering on `eth0`, with `extra` arguments
/// (a key, tags, `--discovery`); returns its PID.
pub fn slave(lan: &Lan, i: usize, extra: &[&str]) -> u32 {
    let name = format!("s{i}");
    let mut args = vec!["slave", "--name", &name, "--interface", "eth0"];
    args.extend_from_slice(extra);
    lan.spawn(i, &name, &binary(), &args)
}

/// Whether a process exists and is not a zombie.
pub fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/status")) {
        Ok(s) => !s
            .lines()
            .any(|l| l.starts_with("State:") && l.contains('Z')),
        Err(_) => false,
    }
}

/// PIDs of processes whose command line contains `needle`.
pub fn pids_matching(needle: &str) -> Vec<u32> {
    let mut out = Vec::new();
    let me = std::process::id();
    if let Ok(dir) = std::fs::read_dir("/proc") {
        for entry in dir.flatten() {
            let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
                continue;
            };
            if pid == me {
                continue;
            }
            if let Ok(cmd) = std::fs::read(entry.path().join("cmdline"))
                && String::from_utf8_lossy(&cmd)
                    .replace('\0', " ")
                    .contains(needle)
                && alive(pid)
            {
                out.push(pid);
            }
        }
    }
    out
}

/// Polls `check` every 5 ms until it holds or `timeout` passes.
pub fn eventually(timeout: Duration, mut check: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if check() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// One request on a daemon's control socket.
pub fn control(sock: &Path, request: Value) -> Value {
    let mut stream = UnixStream::connect(sock).expect("connect control socket");
    writeln!(stream, "{request}").expect("write request");
    let mut line = String::new();
    BufReader::new(stream)
        .read_line(&mut line)
        .expect("read answer");
    serde_json::from_str(&line).expect("answer is JSON")
}

/// The peers a daemon knows.
pub fn peers(sock: &Path) -> Vec<Value> {
    let answer = control(sock, json!({"cmd": "peers"}));
    answer["peers"].as_array().cloned().unwrap_or_default()
}

/// The names of the peers a daemon knows, sorted.
pub fn peer_names(sock: &Path) -> Vec<String> {
    let mut names: Vec<String> = peers(sock)
        .iter()
        .filter_map(|p| p["name"].as_str().map(str::to_string))
        .collect();
    names.sort();
    names
}

/// A daemon's status object.
pub fn status(sock: &Path) -> Value {
    control(sock, json!({"cmd": "status"}))["status"].clone()
}

/// Streams a daemon's events, each with the time it arrived.
pub fn watch(sock: &Path) -> mpsc::Receiver<(Instant, Value)> {
    let mut stream = UnixStream::connect(sock).expect("connect control socket");
    writeln!(stream, "{}", json!({"cmd": "watch"})).expect("write watch");
    let mut reader = BufReader::new(stream);
    let mut first = String::new();
    reader.read_line(&mut first).expect("watch answer");
    assert!(first.contains("\"ok\":true"), "watch refused: {first}");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in reader.lines() {
            let Ok(line) = line else { return };
            let Ok(value) = serde_json::from_str::<Value>(&line) else {
                continue;
            };
            if tx.send((Instant::now(), value)).is_err() {
                return;
            }
        }
    });
    rx
}

/// Waits for an event of `kind` about the peer named `name`; when it arrived.
pub fn wait_event(
    rx: &mpsc::Receiver<(Instant, Value)>,
    kind: &str,
    name: &str,
    timeout: Duration,
) -> Option<Instant> {
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok((at, v)) if v["event"] == kind && v["peer"]["name"] == name => return Some(at),
            Ok(_) => {}
            Err(_) => return None,
        }
    }
}
