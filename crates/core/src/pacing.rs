//! Rolling re-verification pacing (SPEC §10.1, "due, then paced"): when an
//! account or user is due, and how many one cycle may take.
//!
//! Each verified thing carries `verify_from`, the Unix second its period
//! counts from: the moment of its last verification, or, for its first
//! round, that moment minus a stable per-key offset of up to half a period.
//! It is due once `verify_from + period <= now`. So nothing is due right
//! after an initial sync or a full resync, each thing is verified once per
//! period and not more often, and a mass creation's first round spreads
//! over the second half of the first period instead of landing on one
//! cycle.

use sha2::{Digest, Sha256};

use super::plan::Action;

/// The pacing of one daemon: its cycle interval and verification period.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pacing {
    pub interval_secs: u64,
    /// 0: re-verification is off.
    pub period_secs: u64,
}

/// What a verification of one key counts from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Round {
    /// The first verification (a create, a first details read): staggered.
    First,
    /// Any later one: counts from now.
    Again,
}

impl Round {
    /// What a confirmed answer to `action` verified: a create states the
    /// full state for the first time, a full-state update again; any other
    /// update or a delete verifies nothing.
    pub fn of(action: &Action) -> Option<Round> {
        match action {
            Action::Create => Some(Round::First),
            Action::Update { full: true, .. } => Some(Round::Again),
            Action::Update { .. } | Action::Delete => None,
        }
    }
}

impl Pacing {
    pub fn enabled(&self) -> bool {
        self.period_secs > 0
    }

    /// Of `total`, at most this many per cycle: `ceil(total × interval /
    /// period)`, so that all fit in one period's cycles.
    pub fn bound(&self, total: u64) -> u32 {
        if total == 0 || !self.enabled() {
            return 0;
        }
        let n = (total.saturating_mul(self.interval_secs.max(1))).div_ceil(self.period_secs);
        n.clamp(1, total).min(u64::from(u32::MAX)) as u32
    }

    /// A stable offset in `[0, period / 2)` for `key`.
    pub fn stagger(&self, key: &str) -> i64 {
        let half = self.period_secs / 2;
        if half == 0 {
            return 0;
        }
        let digest = Sha256::digest(key.as_bytes());
        let word = u64::from_be_bytes(digest[..8].try_into().unwrap_or([0; 8]));
        (word % half) as i64
    }

    /// The `verify_from` of a verification of `key` at Unix second `now`.
    pub fn verify_from(&self, key: &str, round: Round, now: i64) -> i64 {
        match round {
            Round::First => now - self.stagger(key),
            Round::Again => now,
        }
    }

    /// Things whose `verify_from` is at or before this are due in a cycle
    /// started at `now`. Time counts from the start of the cycle's schedule
    /// interval, so a dry run and the cycle after it in the same interval
    /// take the same slice even if something fell due in between.
    pub fn due_before(&self, now: i64) -> i64 {
        let interval = i64::try_from(self.interval_secs.max(1)).unwrap_or(i64::MAX);
        let tick = now - now.rem_euclid(interval);
        tick.saturating_sub(i64::try_from(self.period_secs).unwrap_or(i64::MAX))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: Pacing = Pacing {
        interval_secs: 60,
        period_secs: 86_400,
    };

    #[test]
    fn bound_fits_everything_in_one_period() {
        // 100k accounts, a cycle a minute, a day: 70 per cycle, 1440 cycles.
        assert_eq!(DAY.bound(100_000), 70);
        assert!(u64::from(DAY.bound(100_000)) * 1440 >= 100_000);
        assert_eq!(DAY.bound(10), 1);
        assert_eq!(DAY.bound(0), 0);
        let slow = Pacing {
            interval_secs: 86_400,
            period_secs: 3_600,
        };
        assert_eq!(slow.bound(5), 5, "never more than all");
        let off = Pacing {
            interval_secs: 60,
            period_secs: 0,
        };
        assert_eq!(off.bound(5), 0, "disabled");
    }

    #[test]
    fn stagger_is_stable_and_within_half_a_period() {
        let offsets: Vec<i64> = (0..1000).map(|i| DAY.stagger(&format!("u{i}"))).collect();
        assert!(offsets.iter().all(|o| (0..43_200).contains(o)));
        assert_eq!(DAY.stagger("u1"), DAY.stagger("u1"));
        // Spread, not clumped: both quarters of the half period are used.
        assert!(offsets.iter().any(|o| *o < 10_000));
        assert!(offsets.iter().any(|o| *o > 33_000));
        assert_eq!(DAY.verify_from("u1", Round::Again, 1_000_000), 1_000_000);
        // Due times count from the interval's start: 59 s into it, as at 0.
        assert_eq!(DAY.due_before(1_000_020), 1_000_020 - 86_400);
        assert_eq!(DAY.due_before(1_000_079), 1_000_020 - 86_400);
        assert_eq!(
            DAY.verify_from("u1", Round::First, 1_000_000),
            1_000_000 - DAY.stagger("u1")
        );
    }
}
