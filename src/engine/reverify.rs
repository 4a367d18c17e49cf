//! Rolling re-verification (SPEC §10.1): each incremental cycle re-reads the
//! details of the accounts verified longest ago and re-asserts the full
//! state of the users asserted longest ago, in slices sized so that all are
//! covered once per `daemon.reverify_hours`, spread over its cycles.

use super::{Engine, EngineError, Intent};
use crate::config::schedule_period;
use crate::store::Store;

/// Of `total`, the share one cycle of `interval_secs` covers so that all
/// are covered once per `period_secs` (at least one while any are left).
pub fn slice(total: u64, interval_secs: u64, period_secs: u64) -> u32 {
    if total == 0 || period_secs == 0 {
        return 0;
    }
    let n = (total * interval_secs.max(1)).div_ceil(period_secs);
    n.clamp(1, total).min(u64::from(u32::MAX)) as u32
}

impl Engine {
    pub(super) async fn reverify_slice(
        &self,
        store: &Store,
        intent: &mut Intent,
    ) -> Result<(), EngineError> {
        let period = u64::from(self.settings.daemon.reverify_hours) * 3600;
        if period == 0 {
            return Ok(());
        }
        let interval = schedule_period(&self.settings.daemon.schedule).as_secs();
        for source in &self.sources {
            let kind = source.kind();
            let n = slice(store.count_accounts(kind).await?, interval, period);
            let ids = store.oldest_verified(kind, n).await?;
            intent
                .reverify_accounts
                .insert(kind, ids.into_iter().collect());
        }
        let n = slice(store.count_applied().await?, interval, period);
        intent.reverify_logins = store.oldest_asserted(n).await?.into_iter().collect();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::slice;

    #[test]
    fn slices_cover_everything_once_per_period() {
        // 100k accounts, a cycle a minute, a day: 70 per cycle, 1440 cycles.
        assert_eq!(slice(100_000, 60, 86_400), 70);
        assert!(u64::from(slice(100_000, 60, 86_400)) * 1440 >= 100_000);
        assert_eq!(slice(10, 60, 86_400), 1);
        assert_eq!(slice(0, 60, 86_400), 0);
        assert_eq!(slice(5, 86_400, 3_600), 5, "never more than all");
        assert_eq!(slice(5, 60, 0), 0, "disabled");
    }
}
