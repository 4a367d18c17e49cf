//! The cycle summary of SPEC §6a (`sync --json`, `status`, the cycles table).

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::{Intent, Planned};
use crate::core::cycle::{CycleKind, CycleResult};
use crate::core::desired::{CoreConfig, Desired};
use crate::core::plan::{Action, Op, Plan};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct SourceSummary {
    pub accounts: usize,
    pub complete: bool,
    pub error: Option<String>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct OperationCounts {
    pub create: usize,
    pub update: usize,
    pub delete: usize,
    pub tree_create: usize,
    pub tree_update: usize,
    pub writeback: usize,
    /// Camera set requests (SPEC §12.3), part of creates and updates.
    #[serde(default)]
    pub cameras: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct PlanEntry {
    pub login: String,
    pub action: String,
    pub changes: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CycleReport {
    pub kind: CycleKind,
    pub result: CycleResult,
    pub dry_run: bool,
    pub started_at: DateTime<Utc>,
    pub finished_at: DateTime<Utc>,
    pub sources: BTreeMap<String, SourceSummary>,
    /// Operations planned this cycle, by kind.
    pub operations: OperationCounts,
    pub applied: usize,
    pub pending: usize,
    pub quarantined: usize,
    pub held: usize,
    pub invalid: usize,
    pub conflicts: usize,
    pub plan: Vec<PlanEntry>,
}

impl OperationCounts {
    fn of(plan: &Plan) -> Self {
        let mut ops = OperationCounts::default();
        for op in &plan.ops {
            match op.action {
                Action::Create => ops.create += 1,
                Action::Update { .. } => ops.update += 1,
                Action::Delete => ops.delete += 1,
            }
            ops.cameras += usize::from(op.cameras.is_some());
        }
        for t in &plan.tree {
            if t.create {
                ops.tree_create += 1;
            } else {
                ops.tree_update += 1;
            }
        }
        ops.writeback = plan.writebacks.len();
        ops
    }
}

impl CycleReport {
    /// The report of a planned cycle; the push and `finish` fill in the rest.
    pub fn new(
        intent: &Intent,
        sources: BTreeMap<String, SourceSummary>,
        invalid: usize,
        desired: &Desired,
        planned: &Planned,
    ) -> Self {
        Self {
            kind: intent.kind,
            result: CycleResult::Ok,
            dry_run: intent.dry_run,
            started_at: intent.started,
            finished_at: intent.started,
            sources,
            operations: OperationCounts::of(&planned.plan),
            applied: 0,
            pending: 0,
            quarantined: 0,
            held: planned.plan.held.len(),
            invalid,
            conflicts: desired.conflicts.len(),
            plan: vec![],
        }
    }
}

/// An op's camera set request: the whole set, and what it removes.
fn camera_entry(op: &Op, suffix: &[String]) -> Option<PlanEntry> {
    let step = op.cameras.as_ref()?;
    let groups = op.target.cameras.as_ref()?.groups.iter();
    let mut changes = vec![format!(
        "set={}",
        groups.cloned().collect::<Vec<_>>().join(",")
    )];
    if !step.removed.is_empty() {
        let removed = step.removed.iter().cloned().collect::<Vec<_>>();
        changes.push(format!("removed={}", removed.join(",")));
    }
    changes.extend(suffix.iter().cloned());
    Some(PlanEntry {
        login: op.login.clone(),
        action: "cameras".into(),
        changes,
    })
}

/// The plan, per login, as people read it: create / update with changed
/// fields / attach / detach / block / delete / tree / writeback.
pub fn plan_entries(plan: &Plan, core: &CoreConfig) -> Vec<PlanEntry> {
    let mut out = vec![];
    for op in plan.ops.iter().chain(plan.held.iter()) {
        let held = plan.held.contains(op);
        let suffix = if held {
            vec!["held".to_string()]
        } else {
            vec![]
        };
        match &op.action {
            Action::Create => {
                out.push(PlanEntry {
                    login: op.login.clone(),
                    action: "create".into(),
                    changes: vec![format!("status={}", op.target.status)],
                });
                if !op.target.permissions.is_empty() {
                    out.push(PlanEntry {
                        login: op.login.clone(),
                        action: "attach".into(),
                        changes: op.target.permissions.iter().cloned().collect(),
                    });
                }
            }
            Action::Delete => out.push(PlanEntry {
                login: op.login.clone(),
                action: "delete".into(),
                changes: suffix.clone(),
            }),
            Action::Update {
                attach,
                detach,
                changes,
                ..
            } => {
                let label = op.label(&core.status_blocked);
                if !changes.is_empty() || (attach.is_empty() && detach.is_empty()) {
                    let mut c = changes.clone();
                    c.extend(suffix.clone());
                    out.push(PlanEntry {
                        login: op.login.clone(),
                        action: label.into(),
                        changes: c,
                    });
                }
                if !attach.is_empty() {
                    out.push(PlanEntry {
                        login: op.login.clone(),
                        action: "attach".into(),
                        changes: attach.iter().cloned().collect(),
                    });
                }
                if !detach.is_empty() {
                    let mut c: Vec<String> = detach.iter().cloned().collect();
                    c.extend(suffix.clone());
                    out.push(PlanEntry {
                        login: op.login.clone(),
                        action: "detach".into(),
                        changes: c,
                    });
                }
            }
        }
        out.extend(camera_entry(op, &suffix));
    }
    for t in &plan.tree {
        out.push(PlanEntry {
            login: t.external_id.clone(),
            action: if t.create {
                "tree_create"
            } else {
                "tree_update"
            }
            .into(),
            changes: vec![format!("name={}", t.name)],
        });
    }
    for w in &plan.writebacks {
        out.push(PlanEntry {
            login: w.login.clone(),
            action: "writeback".into(),
            changes: vec![w.account.to_string()],
        });
    }
    out
}
