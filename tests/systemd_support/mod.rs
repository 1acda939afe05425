//! A cgroup of its own for the systemd the test boots.
//!
//! A systemd booted as PID 1 of a container takes the cgroup it finds itself in for the
//! root of its tree, and creates `init.scope`, `system.slice` and a cgroup per unit
//! under it. Without a cgroup namespace that root is the host's, so it would fill (and
//! leave behind) cgroups at the top of the host's hierarchies. The test therefore puts
//! the machine in a fresh cgroup v2 directory below its own cgroup, gives it a cgroup
//! namespace rooted there and a cgroup2 mount of just that subtree, and removes the
//! whole subtree when dropped.
#![allow(dead_code)]

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// A cgroup v2 directory this test made; removed (subtree included) when dropped.
pub struct Cgroup {
    path: PathBuf,
}

impl Cgroup {
    /// Creates `name` below this process's own cgroup in the cgroup v2 hierarchy.
    pub fn new(name: &str) -> Cgroup {
        let mount = v2_mount().expect(
            "no cgroup2 hierarchy is mounted here; the systemd test needs one \
             (mount -t cgroup2 none /sys/fs/cgroup/unified)",
        );
        let own = std::fs::read_to_string("/proc/self/cgroup")
            .expect("read /proc/self/cgroup")
            .lines()
            .find_map(|l| l.strip_prefix("0::").map(str::to_string))
            .unwrap_or_else(|| "/".to_string());
        let path = mount.join(own.trim_start_matches('/')).join(name);
        std::fs::create_dir(&path)
            .unwrap_or_else(|e| panic!("create cgroup {}: {e}", path.display()));
        Cgroup { path }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// `cgroup.procs`, as a C string for a `pre_exec` hook (where allocating is not
    /// allowed): writing "0" to it moves the writing process into this cgroup.
    pub fn procs_file(&self) -> CString {
        CString::new(self.path.join("cgroup.procs").as_os_str().as_bytes()).unwrap()
    }

    /// Whether no process is left in the subtree.
    pub fn empty(&self) -> bool {
        std::fs::read_to_string(self.path.join("cgroup.events"))
            .map(|e| e.lines().any(|l| l == "populated 0"))
            .unwrap_or(true)
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        // Processes killed a moment ago may still be leaving; cgroups in use cannot go.
        let deadline = Instant::now() + Duration::from_secs(5);
        while !remove_tree(&self.path) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        if self.path.exists() {
            eprintln!("warning: could not remove cgroup {}", self.path.display());
        }
    }
}

/// Removes a cgroup directory and its children, deepest first (rmdir only: a cgroup
/// with processes in it stays). True when it is gone.
fn remove_tree(dir: &Path) -> bool {
    if let Ok(entries) = std::fs::read_dir(dir) {
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                remove_tree(&entry.path());
            }
        }
    }
    let _ = std::fs::remove_dir(dir);
    !dir.exists()
}

/// Where the cgroup v2 hierarchy is mounted in this mount namespace.
fn v2_mount() -> Option<PathBuf> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    info.lines().find_map(|line| {
        let (before, after) = line.split_once(" - ")?;
        if after.split_whitespace().next()? != "cgroup2" {
            return None;
        }
        before.split_whitespace().nth(4).map(PathBuf::from)
    })
}

/// Lines of this process's mount table that mention `path` (none, if the machine's
/// mounts stayed in its own mount namespace as they should).
pub fn host_mounts_under(path: &Path) -> Vec<String> {
    let needle = path.to_string_lossy().to_string();
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains(&needle))
        .map(str::to_string)
        .collect()
}
