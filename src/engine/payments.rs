//! The payment fast path (SPEC §10.2): only the payment windows are read;
//! the accounts with new or changed payments become a targeted cycle at
//! once. A tick that finds nothing new records no cycle.

use std::collections::HashMap;

use chrono::{Duration, Utc};

use super::read::{new_payments, SourceRead};
use super::{CycleOptions, CycleReport, Engine, EngineError, Targets};
use crate::core::model::AccountKey;
use crate::sources::Source;
use crate::store::ReadStamp;

impl Engine {
    /// Runs the fast path: `None` when no payment changed.
    pub async fn run_payments(
        &self,
        opts: &CycleOptions,
    ) -> Result<Option<CycleReport>, EngineError> {
        let targets = self.paid_accounts().await?;
        if targets.accounts.is_empty() {
            return Ok(None);
        }
        tracing::info!(
            accounts = targets.accounts.len(),
            "new payments; pushing their accounts now"
        );
        let opts = CycleOptions {
            targets: Some(targets),
            payments: true,
            ..opts.clone()
        };
        self.run_cycle(&opts).await.map(Some)
    }

    /// Every source's payment window read; new and changed payments stored;
    /// the accounts they belong to. A source that fails is skipped: the
    /// next listing cycle reads its payments.
    async fn paid_accounts(&self) -> Result<Targets, EngineError> {
        let mut targets = Targets::default();
        // The tick's read, ordered against the listing lane's.
        let read = ReadStamp {
            seq: self.store.next_read_seq().await?,
            at: Utc::now(),
        };
        let now = read.at;
        for source in &self.sources {
            let kind = source.kind();
            let days = self
                .settings
                .source(kind)
                .map_or(3, |s| s.common.payment_window_days);
            let today = now.date_naive();
            let since = today - Duration::days(i64::from(days));
            let listed = match source.payments(since, today).await {
                Ok(l) => l.payments,
                Err(e) => {
                    tracing::debug!(source = %kind, error = %e, "payment window unreadable; left to the next cycle");
                    continue;
                }
            };
            let names = self.names_if_needed(source, &listed).await?;
            let mut scratch = SourceRead::default();
            let (paid, to_save) =
                new_payments(&self.store, source, listed, &names, &mut scratch).await?;
            self.store.save_payments(&to_save, read).await?;
            targets
                .accounts
                .extend(paid.into_iter().map(|id| AccountKey { source: kind, id }));
        }
        Ok(targets)
    }

    /// Account names from the store, only when a payment lacks an account id.
    async fn names_if_needed(
        &self,
        source: &Source,
        listed: &[crate::sources::ListedPayment],
    ) -> Result<HashMap<String, Option<String>>, EngineError> {
        if listed.iter().all(|p| p.raw.account_id.is_some()) {
            return Ok(HashMap::new());
        }
        Ok(self.store.account_names(source.kind()).await?)
    }
}
