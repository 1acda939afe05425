//! Running under systemd: readiness, status, watchdog, journal logging, and the files
//! systemd hands a service.
//!
//! This module owns what the daemon tells the service manager (through the `sd-notify`
//! crate: READY=1 once its sockets are up, STATUS= lines, WATCHDOG=1 pings, STOPPING=1),
//! whether its standard error is the journal (then logs go to journald through
//! `tracing-journald`, with levels as syslog priorities and journald's own timestamps),
//! and where a cluster key is found when none is named. Outside systemd every call here
//! is a no-op.

use std::path::PathBuf;
use std::time::Duration;

use sd_notify::NotifyState;
use tracing_subscriber::fmt::format::{Format, Full, Writer};
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;

/// Tells systemd the service is ready, with a status line.
pub fn ready(status: &str) {
    let _ = sd_notify::notify(&[NotifyState::Ready, NotifyState::Status(status)]);
}

/// Updates the status line `systemctl status` shows.
pub fn status(status: &str) {
    let _ = sd_notify::notify(&[NotifyState::Status(status)]);
}

/// Tells systemd the service is stopping.
pub fn stopping() {
    let _ = sd_notify::notify(&[
        NotifyState::Stopping,
        NotifyState::Status("leaving the group"),
    ]);
}

/// How often to ping the watchdog (half of `WatchdogSec=`), if it is on for us.
pub fn watchdog_interval() -> Option<Duration> {
    sd_notify::watchdog_enabled().map(|d| d / 2)
}

/// Pings the watchdog.
pub fn watchdog_ping() {
    let _ = sd_notify::notify(&[NotifyState::Watchdog]);
}

/// The variables through which systemd talks to its main process; children (jobs) must
/// not inherit them.
pub const SERVICE_ENV: [&str; 4] = [
    "NOTIFY_SOCKET",
    "WATCHDOG_USEC",
    "WATCHDOG_PID",
    "JOURNAL_STREAM",
];

/// Whether standard error is connected to the journal (`JOURNAL_STREAM` names its
/// device and inode, see systemd.exec(5)).
pub fn stderr_is_journal() -> bool {
    let Ok(value) = std::env::var("JOURNAL_STREAM") else {
        return false;
    };
    let Some((dev, ino)) = value.split_once(':') else {
        return false;
    };
    let (Ok(dev), Ok(ino)) = (dev.parse::<u64>(), ino.parse::<u64>()) else {
        return false;
    };
    use std::os::unix::fs::MetadataExt;
    // /proc/self/fd/2 follows to the socket or file that is our stderr.
    std::fs::metadata("/proc/self/fd/2").is_ok_and(|m| m.dev() == dev && m.ino() == ino)
}

/// The journald layer for logs when standard error is the journal (see
/// [`stderr_is_journal`]); `None` when journald's socket cannot be reached. Levels map
/// to the usual syslog priorities: ERROR 3, WARN 4, INFO 6, DEBUG and TRACE 7.
pub fn journald_layer() -> Option<tracing_journald::Layer> {
    use tracing_journald::{Priority, PriorityMappings};
    let layer = tracing_journald::layer().ok()?;
    Some(layer.with_priority_mappings(PriorityMappings {
        error: Priority::Error,
        warn: Priority::Warning,
        info: Priority::Informational,
        debug: Priority::Debug,
        trace: Priority::Debug,
    }))
}

/// The syslog priority of a level, as [`journald_layer`] maps it.
pub fn syslog_priority(level: &tracing::Level) -> u8 {
    match *level {
        tracing::Level::ERROR => 3,
        tracing::Level::WARN => 4,
        tracing::Level::INFO => 6,
        _ => 7,
    }
}

/// Log lines for standard error when it is a journal stream but journald's native
/// socket cannot be used: no timestamp and no level word (journald records both), and a
/// `<N>` syslog priority prefix, which journald reads from each stream line
/// (`SyslogLevelPrefix=yes`, its default).
pub struct JournalStreamFormat(Format<Full, ()>);

impl Default for JournalStreamFormat {
    fn default() -> Self {
        Self(
            tracing_subscriber::fmt::format()
                .without_time()
                .with_level(false)
                .with_ansi(false),
        )
    }
}

impl<S, N> FormatEvent<S, N> for JournalStreamFormat
where
    S: tracing::Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &tracing::Event<'_>,
    ) -> std::fmt::Result {
        write!(writer, "<{}>", syslog_priority(event.metadata().level()))?;
        self.0.format_event(ctx, writer.by_ref(), event)
    }
}

/// Where a daemon or slave finds a cluster key when none is named: `cluster.key` in the
/// configuration directory systemd made (`$CONFIGURATION_DIRECTORY`), else
/// `/etc/localnet/cluster.key`, when present. A file that may be there but cannot be
/// looked at (a directory without permission) counts as present, so that loading it
/// fails loudly instead of the node silently joining the open cluster.
pub fn default_key_file() -> Option<PathBuf> {
    let present = |p: &PathBuf| match std::fs::metadata(p) {
        Ok(_) => true,
        Err(e) => e.kind() != std::io::ErrorKind::NotFound,
    };
    let from_systemd = std::env::var_os("CONFIGURATION_DIRECTORY")
        .map(|dirs| {
            // Several directories are separated by colons; ours is the first.
            let first = dirs
                .to_string_lossy()
                .split(':')
                .next()
                .unwrap_or("")
                .to_string();
            PathBuf::from(first).join("cluster.key")
        })
        .filter(present);
    from_systemd.or_else(|| Some(PathBuf::from("/etc/localnet/cluster.key")).filter(present))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One test, because it changes process-wide environment variables.
    #[test]
    fn outside_systemd_nothing_happens_and_journal_stream_must_match_stderr() {
        use std::os::unix::fs::MetadataExt;
        // SAFETY: no other test reads or writes these variables.
        unsafe {
            std::env::remove_var("NOTIFY_SOCKET");
            std::env::remove_var("WATCHDOG_USEC");
            std::env::set_var("JOURNAL_STREAM", "1:2");
        }
        ready("ok");
        status("ok");
        stopping();
        assert_eq!(watchdog_interval(), None);
        assert!(
            !stderr_is_journal(),
            "a JOURNAL_STREAM that is not our stderr"
        );
        let m = std::fs::metadata("/proc/self/fd/2").unwrap();
        // SAFETY: as above.
        unsafe { std::env::set_var("JOURNAL_STREAM", format!("{}:{}", m.dev(), m.ino())) };
        assert!(stderr_is_journal());
        // SAFETY: as above.
        unsafe { std::env::remove_var("JOURNAL_STREAM") };
        assert!(!stderr_is_journal());
    }

    #[test]
    fn journal_stream_lines_carry_a_priority_and_no_timestamp() {
        use std::sync::{Arc, Mutex};
        let buf = Arc::new(Mutex::new(Vec::new()));
        let sink = buf.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::TRACE)
            .with_ansi(false)
            .event_format(JournalStreamFormat::default())
            .with_writer(move || Sink(sink.clone()))
            .finish();
        tracing::subscriber::with_default(subscriber, || {
            tracing::error!(code = 7, "broken");
            tracing::warn!("odd");
            tracing::info!("fine");
            tracing::debug!("detail");
        });
        let text = String::from_utf8(buf.lock().unwrap().clone()).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 4, "{text}");
        for (line, prefix) in lines.iter().zip(["<3>", "<4>", "<6>", "<7>"]) {
            assert!(line.starts_with(prefix), "{line}");
            assert!(!line.contains("ERROR") && !line.contains("INFO"), "{line}");
            // No timestamp: the target follows the prefix directly.
            assert!(line[3..].starts_with("localnet::service"), "{line}");
        }
        assert!(lines[0].ends_with("broken code=7"), "{}", lines[0]);

        struct Sink(Arc<Mutex<Vec<u8>>>);
        impl std::io::Write for Sink {
            fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(b);
                Ok(b.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
    }
}
