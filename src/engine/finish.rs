//! Phase 8, record: the cycle's result (one `classify`), its row, old
//! history pruned, metrics and the closing log line.

use std::time::Instant;

use chrono::{Duration, Utc};

use super::report::{plan_entries, CycleReport};
use super::{Engine, EngineError, Memory, Planned, PushSummary};
use crate::core::cycle::{classify, CycleFacts};
use crate::core::desired::CoreConfig;
use crate::store::Store;
use crate::telemetry::metrics;

/// Payments are kept at least this long, whatever the rules need.
const MIN_PAYMENT_DAYS: u32 = 31;

fn facts(report: &CycleReport, pushed: Option<&PushSummary>) -> CycleFacts {
    CycleFacts {
        dry_run: report.dry_run,
        sources: report.sources.len(),
        sources_complete: report.sources.values().filter(|s| s.complete).count(),
        breaker_open: pushed.is_some_and(|p| p.breaker_open),
        vms_refused: pushed.is_some_and(|p| p.vms_refused),
        applied: report.applied,
        pending: report.pending,
        quarantined: report.quarantined,
        held: report.held,
    }
}

/// A dry run ends once the plan is computed: the plan is the result.
pub fn dry_run(mut report: CycleReport, planned: &Planned, core: &CoreConfig) -> CycleReport {
    report.plan = plan_entries(&planned.plan, core);
    report.result = classify(&facts(&report, None));
    report.finished_at = Utc::now();
    report
}

impl Engine {
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn finish(
        &self,
        store: &Store,
        cycle_id: i64,
        mut report: CycleReport,
        planned: &Planned,
        memory: &Memory,
        pushed: PushSummary,
        clock: Instant,
    ) -> Result<CycleReport, EngineError> {
        report.applied = pushed.applied;
        report.pending = pushed.pending + planned.backing_off;
        report.quarantined = memory.quarantined() + pushed.quarantined;
        report.held = planned.plan.held.len();
        report.result = classify(&facts(&report, Some(&pushed)));
        report.finished_at = Utc::now();
        let summary = serde_json::to_value(&report).unwrap_or_default();
        store
            .finish_cycle(cycle_id, report.result, &summary)
            .await?;
        let in_doubt = store.count_in_doubt().await?;
        metrics::get().in_doubt.set(in_doubt as i64);
        // Pruning and the oldest verification scan tables the size of the
        // customer base: the listing lane's work, so that a payment tick
        // costs what it re-read.
        if report.kind.lists() {
            self.prune(store, &report).await?;
            if let Some(oldest) = store.oldest_verification().await? {
                let age = (Utc::now() - oldest).num_seconds().max(0);
                metrics::get().oldest_verification_age.set(age);
            }
        }
        observe(&report, clock);
        Ok(report)
    }

    /// Audit and cycles past retention; payments no rule can use.
    async fn prune(&self, store: &Store, report: &CycleReport) -> Result<(), EngineError> {
        let days = |d: u32| Duration::days(i64::from(d));
        let retention = days(self.settings.daemon.audit_retention_days);
        store.prune_history(report.started_at - retention).await?;
        let grace = self.settings.daemon.missing_grace_cycles;
        let purged = store
            .purge_gone_accounts(grace, report.started_at - retention)
            .await?;
        if purged > 0 {
            tracing::info!(
                purged,
                "accounts gone and deprovisioned past retention forgotten"
            );
        }
        let rules = self.core.rules.iter().map(|r| r.paid_within_days);
        let keep = days(rules.max().unwrap_or(0).max(MIN_PAYMENT_DAYS));
        store.prune_payments(report.started_at - keep).await?;
        Ok(())
    }
}

fn observe(report: &CycleReport, clock: Instant) {
    let m = metrics::get();
    m.cycle(report.kind, report.result.as_str());
    m.cycle_duration
        .get_or_create(&metrics::Kind {
            kind: report.kind.as_str().into(),
        })
        .observe(clock.elapsed().as_secs_f64());
    // A targeted cycle sees only its own logins: the gauges are the
    // listing cycles' (both lanes run at once).
    if report.kind.lists() {
        if report.result.completed() {
            m.last_success.set(Utc::now().timestamp() as f64);
        }
        m.pending.set(report.pending as i64);
        m.held.set(report.held as i64);
    }
    m.quarantined.set(report.quarantined as i64);
    tracing::info!(
        kind = %report.kind,
        result = %report.result,
        applied = report.applied,
        pending = report.pending,
        quarantined = report.quarantined,
        held = report.held,
        ms = clock.elapsed().as_millis() as u64,
        rss_mb = ?crate::telemetry::rss_mb(),
        "cycle finished"
    );
}
