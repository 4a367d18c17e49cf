//! VMS user operations: create (then attach), update, delete, adoption on
//! "login taken", re-creation of a login the VMS forgot. Each confirmed
//! answer is recorded at once through `confirm`.

use std::collections::BTreeSet;

use super::policy::PushError;
use super::Executor;
use crate::core::plan::{applied_after, Action, Op, Proof};
use crate::vms::{VmsError, VmsOp};

/// A user op that completed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Done {
    /// The user existed already and was adopted.
    pub adopted: bool,
}

const DONE: Done = Done { adopted: false };

impl Executor<'_> {
    pub(super) async fn user(&self, op: &Op) -> Result<Done, PushError> {
        match &op.action {
            Action::Create => self.create(op).await,
            Action::Update { attach, detach, .. } => self.update(op, attach, detach).await,
            Action::Delete => self.delete(op).await,
        }
    }

    /// Records what a VMS answer proved about the op's login.
    async fn confirm(&self, op: &Op, proof: Proof) -> Result<(), PushError> {
        let user = applied_after(op, proof);
        self.store.set_applied(&op.login, user.as_ref()).await?;
        self.note_on_vms(&op.login, user.is_some());
        Ok(())
    }

    fn managed_except(&self, keep: &BTreeSet<String>) -> BTreeSet<String> {
        self.core
            .managed
            .iter()
            .filter(|p| !keep.contains(*p))
            .cloned()
            .collect()
    }

    /// Full state: profile, every desired managed permission attached and
    /// every other managed permission detached.
    async fn full_patch(&self, op: &Op) -> Result<(), VmsError> {
        let t = &op.target;
        let detach = self.managed_except(&t.permissions);
        self.channel
            .request(VmsOp::Update, || {
                self.vms.update(&op.login, t, &t.permissions, &detach)
            })
            .await
    }

    /// POST, record, then attach the permissions (create takes none).
    async fn create(&self, op: &Op) -> Result<Done, PushError> {
        let t = &op.target;
        match self
            .channel
            .request(VmsOp::Create, || self.vms.create(&op.login, t))
            .await
        {
            Ok(()) => {}
            // The login exists (created by a run that died before recording,
            // or by hand): adopt it with a full-state PATCH.
            Err(e) if e.is_login_error() => {
                tracing::info!(login = %op.login, "login exists on the VMS; adopting it");
                self.full_patch(op).await?;
                self.confirm(op, Proof::Updated).await?;
                return Ok(Done { adopted: true });
            }
            Err(e) => return Err(e.into()),
        }
        self.confirm(op, Proof::Created).await?;
        if !t.permissions.is_empty() {
            let none = BTreeSet::new();
            self.channel
                .request(VmsOp::Update, || {
                    self.vms.update(&op.login, t, &t.permissions, &none)
                })
                .await?;
            self.confirm(op, Proof::Updated).await?;
        }
        Ok(DONE)
    }

    async fn update(
        &self,
        op: &Op,
        attach: &BTreeSet<String>,
        detach: &BTreeSet<String>,
    ) -> Result<Done, PushError> {
        let t = &op.target;
        match self
            .channel
            .request(VmsOp::Update, || {
                self.vms.update(&op.login, t, attach, detach)
            })
            .await
        {
            Ok(()) => {
                self.confirm(op, Proof::Updated).await?;
                Ok(DONE)
            }
            Err(e) if e.is_login_error() => self.recreate(op).await,
            Err(e) => Err(e.into()),
        }
    }

    /// The VMS no longer knows the login (removed by hand): create it again
    /// once, then apply the full state. A second failure quarantines.
    async fn recreate(&self, op: &Op) -> Result<Done, PushError> {
        tracing::warn!(login = %op.login, "the VMS no longer knows this login; creating it again");
        self.confirm(op, Proof::Removed).await?;
        let t = &op.target;
        if let Err(e) = self
            .channel
            .request(VmsOp::Create, || self.vms.create(&op.login, t))
            .await
        {
            return Err(match e.is_transient() {
                true => e,
                false => VmsError {
                    message: format!("unknown to the VMS and re-creating failed: {e}"),
                    ..e
                },
            }
            .into());
        }
        self.full_patch(op).await?;
        self.confirm(op, Proof::Updated).await?;
        Ok(DONE)
    }

    async fn delete(&self, op: &Op) -> Result<Done, PushError> {
        match self
            .channel
            .request(VmsOp::Delete, || self.vms.delete(&op.login))
            .await
        {
            Ok(()) => {}
            // Unknown to the VMS: already what we want.
            Err(e) if e.status == Some(404) || e.is_login_error() => {}
            Err(e) => return Err(e.into()),
        }
        self.confirm(op, Proof::Removed).await?;
        Ok(DONE)
    }
}
