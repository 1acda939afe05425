//! The node-wide timers of the discovery core, in one table (in the manner of
//! quinn-proto's `connection/timer.rs`). Per-peer suspicion timers live in a heap of
//! their own, since there is one per peer.

use super::Millis;

/// A node-wide timer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Timer {
    /// The second probe of a starting node.
    SecondProbe = 0,
    /// Answering the probes heard since the last answer.
    Reply = 1,
    /// The periodic multicast announcement.
    Announce = 2,
    /// Forgetting stale limiter buckets, replay counters, tombstones and refusals.
    Gc = 3,
    /// An observer's look, once its last probe's answers are in, at whether that probe
    /// found members the earlier ones had not (then it probes once more).
    ProbeAgain = 4,
    /// Asking again for the records that record requests did not bring.
    RecordRetry = 5,
}

impl Timer {
    const COUNT: usize = 6;
}

/// When each [`Timer`] fires, if it is set.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct TimerTable {
    data: [Option<Millis>; Timer::COUNT],
}

impl TimerTable {
    /// Sets `timer` to fire at `at` (replacing any earlier setting).
    pub(crate) fn set(&mut self, timer: Timer, at: Millis) {
        self.data[timer as usize] = Some(at);
    }

    /// When `timer` fires, if it is set.
    pub(crate) fn get(&self, timer: Timer) -> Option<Millis> {
        self.data[timer as usize]
    }

    /// Unsets `timer`.
    pub(crate) fn stop(&mut self, timer: Timer) {
        self.data[timer as usize] = None;
    }

    /// The earliest time any timer fires.
    pub(crate) fn next_timeout(&self) -> Option<Millis> {
        self.data.iter().flatten().min().copied()
    }

    /// Whether `timer` is set to fire at or before `now`.
    pub(crate) fn is_expired(&self, timer: Timer, now: Millis) -> bool {
        self.data[timer as usize].is_some_and(|at| at <= now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_keeps_each_timer_and_finds_the_earliest() {
        let mut table = TimerTable::default();
        assert_eq!(table.next_timeout(), None);
        table.set(Timer::Gc, 10_000);
        table.set(Timer::Announce, 300);
        table.set(Timer::Reply, 500);
        assert_eq!(table.next_timeout(), Some(300));
        assert_eq!(table.get(Timer::Reply), Some(500));
        assert_eq!(table.get(Timer::SecondProbe), None);
        assert!(table.is_expired(Timer::Announce, 300));
        assert!(!table.is_expired(Timer::Announce, 299));
        assert!(!table.is_expired(Timer::SecondProbe, u64::MAX));
        table.stop(Timer::Announce);
        assert_eq!(table.next_timeout(), Some(500));
        table.set(Timer::Reply, 20_000);
        assert_eq!(table.next_timeout(), Some(10_000));
    }
}
