//! What a cycle was and how it ended (SPEC §2.1 "Cycle results"): one
//! definition, shared by the engine, `sync`'s exit codes and the health checks.

use std::fmt;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CycleKind {
    Incremental,
    /// A full resync: every account re-read, every user pushed in full.
    Full,
    /// Named accounts re-read and their users pushed now (SPEC §10.3): no
    /// listing, so nothing is deprovisioned.
    Targeted,
    /// The payment fast path (SPEC §10.2): a targeted cycle for the accounts
    /// with new or changed payments.
    Payments,
}

impl CycleKind {
    pub const ALL: [CycleKind; 4] = [
        CycleKind::Incremental,
        CycleKind::Full,
        CycleKind::Targeted,
        CycleKind::Payments,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            CycleKind::Incremental => "incremental",
            CycleKind::Full => "full",
            CycleKind::Targeted => "targeted",
            CycleKind::Payments => "payments",
        }
    }

    /// Whether the cycle lists every source (a targeted one does not, so it
    /// proves nothing about the listings to health checks).
    pub fn lists(self) -> bool {
        matches!(self, CycleKind::Incremental | CycleKind::Full)
    }

    pub fn is_full(self) -> bool {
        self == CycleKind::Full
    }
}

impl fmt::Display for CycleKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How one planned operation ended in a cycle: the `result` of
/// `billsync_operations_total` and of the audit log.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum OpResult {
    Applied,
    /// Left pending: tried again later.
    Retry,
    Quarantined,
    /// Held by the safety threshold, not sent.
    Held,
    /// Not sent: another cycle decided the key (a newer read, or an older
    /// one whose push already did this). Audited, not counted in metrics.
    Superseded,
}

impl OpResult {
    /// The values `billsync_operations_total` starts at 0 with (SPEC §6).
    pub const COUNTED: [OpResult; 4] = [
        OpResult::Applied,
        OpResult::Retry,
        OpResult::Quarantined,
        OpResult::Held,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            OpResult::Applied => "applied",
            OpResult::Retry => "retry",
            OpResult::Quarantined => "quarantined",
            OpResult::Held => "held",
            OpResult::Superseded => "superseded",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CycleResult {
    /// Everything applied, or nothing to do.
    Ok,
    /// Some logins pending or quarantined, or a source could not be read.
    Partial,
    /// Deprovisions held by the safety threshold.
    Held,
    /// Aborted: every source failed, or the VMS refused before anything applied.
    Failed,
}

impl CycleResult {
    pub const ALL: [CycleResult; 4] = [
        CycleResult::Ok,
        CycleResult::Partial,
        CycleResult::Held,
        CycleResult::Failed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            CycleResult::Ok => "ok",
            CycleResult::Partial => "partial",
            CycleResult::Held => "held",
            CycleResult::Failed => "failed",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|r| r.as_str() == s)
    }

    /// The cycle ran to its end (health: anything but `failed`).
    pub fn completed(self) -> bool {
        self != CycleResult::Failed
    }
}

impl fmt::Display for CycleResult {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What `classify` needs to know of a finished cycle.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CycleFacts {
    pub dry_run: bool,
    /// Enabled sources, and how many of them were read completely.
    pub sources: usize,
    pub sources_complete: usize,
    /// The circuit breaker opened during the push.
    pub breaker_open: bool,
    /// Requests went out and the VMS refused every one (SPEC §9.3).
    pub vms_refused: bool,
    pub applied: usize,
    pub pending: usize,
    pub quarantined: usize,
    pub held: usize,
}

/// The one place that turns a cycle's facts into its result.
pub fn classify(f: &CycleFacts) -> CycleResult {
    let every_source_failed = f.sources > 0 && f.sources_complete == 0;
    let vms_refused = !f.dry_run && f.applied == 0 && (f.breaker_open || f.vms_refused);
    if every_source_failed || vms_refused {
        CycleResult::Failed
    } else if f.dry_run {
        CycleResult::Ok
    } else if f.held > 0 {
        CycleResult::Held
    } else if f.pending > 0 || f.quarantined > 0 || f.sources_complete < f.sources {
        CycleResult::Partial
    } else {
        CycleResult::Ok
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts() -> CycleFacts {
        CycleFacts {
            sources: 2,
            sources_complete: 2,
            ..Default::default()
        }
    }

    #[test]
    fn results_in_order_of_severity() {
        assert_eq!(classify(&facts()), CycleResult::Ok);
        let partial = CycleFacts {
            pending: 1,
            ..facts()
        };
        assert_eq!(classify(&partial), CycleResult::Partial);
        let quarantined = CycleFacts {
            quarantined: 1,
            ..facts()
        };
        assert_eq!(classify(&quarantined), CycleResult::Partial);
        let one_source = CycleFacts {
            sources_complete: 1,
            ..facts()
        };
        assert_eq!(classify(&one_source), CycleResult::Partial);
        let held = CycleFacts { held: 3, ..partial };
        assert_eq!(classify(&held), CycleResult::Held);
        let no_source = CycleFacts {
            sources_complete: 0,
            ..held
        };
        assert_eq!(classify(&no_source), CycleResult::Failed);
    }

    #[test]
    fn breaker_fails_a_cycle_only_when_nothing_applied() {
        let refused = CycleFacts {
            breaker_open: true,
            pending: 5,
            ..facts()
        };
        assert_eq!(classify(&refused), CycleResult::Failed);
        let some = CycleFacts {
            applied: 1,
            ..refused
        };
        assert_eq!(classify(&some), CycleResult::Partial);
    }

    #[test]
    fn a_cycle_whose_every_request_was_refused_failed() {
        let refused = CycleFacts {
            vms_refused: true,
            pending: 3,
            ..facts()
        };
        assert_eq!(classify(&refused), CycleResult::Failed);
        let one_in = CycleFacts {
            applied: 1,
            ..refused
        };
        assert_eq!(classify(&one_in), CycleResult::Partial);
    }

    #[test]
    fn dry_run_is_ok_unless_every_source_failed() {
        let dry = CycleFacts {
            dry_run: true,
            held: 4,
            breaker_open: true,
            ..facts()
        };
        assert_eq!(classify(&dry), CycleResult::Ok);
        let blind = CycleFacts {
            sources_complete: 0,
            ..dry
        };
        assert_eq!(classify(&blind), CycleResult::Failed);
        // No source configured at all is not "every source failed".
        assert_eq!(
            classify(&CycleFacts {
                dry_run: true,
                ..Default::default()
            }),
            CycleResult::Ok
        );
    }

    #[test]
    fn names_round_trip() {
        for r in CycleResult::ALL {
            assert_eq!(CycleResult::parse(r.as_str()), Some(r));
            assert_eq!(serde_json::to_value(r).unwrap(), r.as_str());
        }
        assert_eq!(CycleResult::parse("skipped"), None);
    }
}
