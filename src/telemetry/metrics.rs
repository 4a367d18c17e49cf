//! SPEC §6 metrics. One process-wide set, exported from start; no label
//! carries a login, an account id or a secret.

use std::sync::atomic::AtomicU64;
use std::sync::OnceLock;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use crate::core::cycle::{CycleKind, CycleResult, OpResult as CoreOpResult};
use crate::core::model::{InvalidCode, SourceKind};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindResult {
    pub kind: String,
    pub result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Kind {
    pub kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Source {
    pub source: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SourceResult {
    pub source: String,
    pub result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OpCode {
    pub op: String,
    pub code: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OpResult {
    pub op: String,
    pub result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SourceReason {
    pub source: String,
    pub reason: String,
}

type HistFamily = Family<Kind, Histogram, fn() -> Histogram>;

pub struct Metrics {
    pub registry: Registry,
    pub cycles: Family<KindResult, Counter>,
    pub cycle_duration: HistFamily,
    pub last_success: Gauge<f64, AtomicU64>,
    pub source_accounts: Family<Source, Gauge>,
    pub source_requests: Family<SourceResult, Counter>,
    pub vms_requests: Family<OpCode, Counter>,
    pub operations: Family<OpResult, Counter>,
    pub pending: Gauge,
    pub quarantined: Gauge,
    pub held: Gauge,
    pub in_doubt: Gauge,
    pub invalid_records: Family<SourceReason, Counter>,
    pub payment_to_push: Histogram,
    pub oldest_verification_age: Gauge,
    /// 1 while this node may act as the leader (SPEC §13).
    pub leader: Gauge,
    pub lease_epoch: Gauge,
}

/// Every metric of SPEC §6 as it appears in the exposition.
pub const SPEC_NAMES: [&str; 16] = [
    "billsync_cycles_total",
    "billsync_cycle_duration_seconds_bucket",
    "billsync_last_success_timestamp_seconds",
    "billsync_source_accounts",
    "billsync_source_requests_total",
    "billsync_vms_requests_total",
    "billsync_operations_total",
    "billsync_pending_operations",
    "billsync_quarantined_accounts",
    "billsync_held_deprovisions",
    "billsync_invalid_records_total",
    "billsync_in_doubt_operations",
    "billsync_payment_to_push_seconds_bucket",
    "billsync_oldest_verification_age_seconds",
    "billsync_leader",
    "billsync_lease_epoch",
];

/// The `result` of a schedule tick that found a cycle running.
pub const SKIPPED: &str = "skipped";
pub const VMS_OPS: [&str; 6] = [
    "create",
    "update",
    "delete",
    "tree_create",
    "tree_update",
    "cameras",
];

fn duration_histogram() -> Histogram {
    // 50 ms .. ~7 min
    Histogram::new(exponential_buckets(0.05, 2.0, 14))
}

/// Registers each `(name, help, field)` of the table: one row a metric.
macro_rules! register_table {
    ($m:ident, [$(($name:literal, $help:literal, $field:ident)),* $(,)?]) => {
        $( $m.registry.register($name, $help, $m.$field.clone()); )*
    };
}

impl Metrics {
    fn new() -> Self {
        let mut m = Self {
            registry: Registry::default(),
            cycles: Family::default(),
            cycle_duration: Family::new_with_constructor(duration_histogram),
            last_success: Gauge::default(),
            source_accounts: Family::default(),
            source_requests: Family::default(),
            vms_requests: Family::default(),
            operations: Family::default(),
            pending: Gauge::default(),
            quarantined: Gauge::default(),
            held: Gauge::default(),
            in_doubt: Gauge::default(),
            invalid_records: Family::default(),
            // 0.5 s .. ~68 min
            payment_to_push: Histogram::new(exponential_buckets(0.5, 2.0, 14)),
            oldest_verification_age: Gauge::default(),
            leader: Gauge::default(),
            lease_epoch: Gauge::default(),
        };
        register_table!(m, [
            ("billsync_payment_to_push_seconds", "From the first cycle that saw a payment paid to the confirmed push of its user", payment_to_push),
            ("billsync_oldest_verification_age_seconds", "Age of the oldest verification: an account's details re-read, or a user's full state asserted", oldest_verification_age),
            ("billsync_cycles", "Sync cycles by kind and result", cycles),
            ("billsync_cycle_duration_seconds", "Duration of sync cycles", cycle_duration),
            ("billsync_last_success_timestamp_seconds", "Unix time of the last cycle that ended ok, partial or held", last_success),
            ("billsync_source_accounts", "Accounts listed by each source in the last complete read", source_accounts),
            ("billsync_source_requests", "HTTP requests to the billing systems", source_requests),
            ("billsync_vms_requests", "HTTP requests to the VMS by operation and status code", vms_requests),
            ("billsync_operations", "Planned VMS operations by outcome", operations),
            ("billsync_pending_operations", "Logins whose desired state is not yet applied", pending),
            ("billsync_quarantined_accounts", "Logins quarantined after a permanent VMS error", quarantined),
            ("billsync_held_deprovisions", "Deprovisions held by the safety threshold", held),
            ("billsync_in_doubt_operations", "Logins whose last VMS request got no answer; pushed in full next", in_doubt),
            ("billsync_invalid_records", "Source records skipped as invalid", invalid_records),
            ("billsync_leader", "1 while this node holds a lease it may act on (or the state file's lock), else 0", leader),
            ("billsync_lease_epoch", "The newest leader lease epoch this node has seen", lease_epoch),
        ]);
        m.start_at_zero();
        m
    }

    /// Known label values start at 0, so dashboards see them from start.
    fn start_at_zero(&self) {
        for kind in CycleKind::ALL.map(CycleKind::as_str) {
            let _ = self
                .cycle_duration
                .get_or_create(&Kind { kind: kind.into() });
            let results = CycleResult::ALL.map(CycleResult::as_str);
            for result in results.into_iter().chain([SKIPPED]) {
                let _ = self.cycles.get_or_create(&KindResult {
                    kind: kind.into(),
                    result: result.into(),
                });
            }
        }
        for s in SourceKind::ALL {
            let source = s.as_str().to_string();
            let _ = self.source_accounts.get_or_create(&Source {
                source: source.clone(),
            });
            for result in ["ok", "error"] {
                let _ = self.source_requests.get_or_create(&SourceResult {
                    source: source.clone(),
                    result: result.into(),
                });
            }
            for code in InvalidCode::ALL {
                let _ = self.invalid_records.get_or_create(&SourceReason {
                    source: source.clone(),
                    reason: code.as_str().into(),
                });
            }
        }
        for op in VMS_OPS {
            let _ = self.vms_requests.get_or_create(&OpCode {
                op: op.into(),
                code: "error".into(),
            });
        }
        for op in VMS_OPS.iter().chain(["writeback"].iter()) {
            for result in CoreOpResult::COUNTED {
                let _ = self.operations.get_or_create(&OpResult {
                    op: op.to_string(),
                    result: result.as_str().into(),
                });
            }
        }
    }

    pub fn source_request(&self, source: SourceKind, ok: bool) {
        self.source_requests
            .get_or_create(&SourceResult {
                source: source.as_str().into(),
                result: if ok { "ok" } else { "error" }.into(),
            })
            .inc();
    }

    /// `billsync_operations_total{op, result}`.
    pub fn operation(&self, op: &str, result: CoreOpResult) {
        self.operations
            .get_or_create(&OpResult {
                op: op.into(),
                result: result.as_str().into(),
            })
            .inc();
    }

    /// `billsync_cycles_total{kind, result}`; `result` may be `SKIPPED`.
    pub fn cycle(&self, kind: CycleKind, result: &str) {
        self.cycles
            .get_or_create(&KindResult {
                kind: kind.as_str().into(),
                result: result.into(),
            })
            .inc();
    }

    pub fn invalid(&self, source: SourceKind, code: InvalidCode) {
        self.invalid_records
            .get_or_create(&SourceReason {
                source: source.as_str().into(),
                reason: code.as_str().into(),
            })
            .inc();
    }

    /// The Prometheus text format (0.0.4), what scrapers and `promtool`
    /// read when they do not ask for OpenMetrics.
    pub fn encode_prometheus(&self) -> String {
        openmetrics_to_prometheus(&self.encode())
    }

    /// OpenMetrics text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &self.registry) {
            out = format!("# encoding failed: {e}\n# EOF\n");
        }
        out
    }
}

/// Rewrites OpenMetrics text as the Prometheus text format: a counter's
/// HELP and TYPE name its `_total` samples, `unknown` is `untyped`, `info`
/// is a gauge, and there is no UNIT or EOF line.
pub fn openmetrics_to_prometheus(text: &str) -> String {
    let mut renamed = std::collections::HashMap::new();
    for line in text.lines() {
        let Some(rest) = line.strip_prefix("# TYPE ") else {
            continue;
        };
        if let Some((name, kind)) = rest.split_once(' ') {
            let (new_name, new_kind) = match kind {
                "counter" if !name.ends_with("_total") => (format!("{name}_total"), "counter"),
                "info" => (format!("{name}_info"), "gauge"),
                "unknown" => (name.to_string(), "untyped"),
                other => (name.to_string(), other),
            };
            renamed.insert(name.to_string(), (new_name, new_kind));
        }
    }
    let mut out = String::with_capacity(text.len());
    for line in text.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let meta = ["# HELP ", "# TYPE "]
            .into_iter()
            .find_map(|p| Some((p, line.strip_prefix(p)?)));
        match meta {
            Some((prefix, rest)) => {
                let (name, tail) = rest.split_once(' ').unwrap_or((rest, ""));
                let (new_name, kind) = renamed
                    .get(name)
                    .map(|(n, k)| (n.as_str(), *k))
                    .unwrap_or((name, ""));
                let tail = if prefix == "# TYPE " && !kind.is_empty() {
                    kind
                } else {
                    tail
                };
                out.push_str(&format!("{prefix}{new_name} {tail}\n"));
            }
            None => {
                out.push_str(line);
                out.push('\n');
            }
        }
    }
    out
}

static METRICS: OnceLock<Metrics> = OnceLock::new();

pub fn get() -> &'static Metrics {
    METRICS.get_or_init(Metrics::new)
}

#[cfg(test)]
mod tests {
    #[test]
    fn every_spec_metric_is_exported_from_start() {
        let text = super::get().encode();
        for name in super::SPEC_NAMES {
            assert!(text.contains(name), "{name} missing from:\n{text}");
        }
        assert!(text.contains(r#"billsync_cycles_total{kind="full",result="skipped"} 0"#));
    }

    /// What `promtool check metrics` reads: every sample belongs to the
    /// family its HELP and TYPE name, and there is no OpenMetrics-only line.
    #[test]
    fn prometheus_text_names_every_sample_family() {
        let text = super::get().encode_prometheus();
        assert!(
            !text.contains("# EOF") && !text.contains("# UNIT"),
            "{text}"
        );
        let mut typed = std::collections::HashMap::new();
        let mut helped = std::collections::HashSet::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, kind) = rest.split_once(' ').unwrap();
                assert!(
                    ["counter", "gauge", "histogram", "untyped"].contains(&kind),
                    "{line}"
                );
                assert!(helped.contains(name), "TYPE before HELP: {line}");
                typed.insert(name.to_string(), kind.to_string());
            } else if let Some(rest) = line.strip_prefix("# HELP ") {
                helped.insert(rest.split_once(' ').unwrap().0.to_string());
            } else if !line.is_empty() {
                let name = line.split(['{', ' ']).next().unwrap();
                let family = ["_bucket", "_sum", "_count"]
                    .iter()
                    .filter_map(|s| name.strip_suffix(s))
                    .find(|f| typed.get(*f).map(String::as_str) == Some("histogram"))
                    .unwrap_or(name);
                let kind = typed
                    .get(family)
                    .unwrap_or_else(|| panic!("untyped sample {line}"));
                if kind == "counter" {
                    assert!(name.ends_with("_total"), "{line}");
                }
            }
        }
        assert_eq!(
            typed.get("billsync_cycles_total").map(String::as_str),
            Some("counter")
        );
    }

    /// The real linter, where it is installed (`.ci/run` installs Debian's
    /// `prometheus`); the test above checks the same structure without it.
    #[test]
    fn promtool_accepts_the_text_format() {
        use std::io::Write;
        use std::process::{Command, Stdio};
        let spawned = Command::new("promtool")
            .args(["check", "metrics"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn();
        let Ok(mut child) = spawned else {
            eprintln!("promtool is not installed; structure checked by the test above");
            return;
        };
        let text = super::get().encode_prometheus();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(text.as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        let said = String::from_utf8_lossy(&out.stdout).to_string()
            + &String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success() && said.trim().is_empty(),
            "promtool: {said}"
        );
    }

    #[test]
    fn openmetrics_counters_info_and_unknown_are_rewritten() {
        let om =
            "# HELP a_requests Requests.\n# TYPE a_requests counter\n# UNIT a_requests requests\n\
                  a_requests_total 3\n# HELP b Build.\n# TYPE b info\nb_info{v=\"1\"} 1\n\
                  # HELP c C.\n# TYPE c unknown\nc 1\n# EOF\n";
        let text = super::openmetrics_to_prometheus(om);
        assert_eq!(
            text,
            "# HELP a_requests_total Requests.\n# TYPE a_requests_total counter\na_requests_total 3\n\
             # HELP b_info Build.\n# TYPE b_info gauge\nb_info{v=\"1\"} 1\n\
             # HELP c C.\n# TYPE c untyped\nc 1\n"
        );
    }
}
