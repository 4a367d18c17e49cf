//! VMS user operations: create (then attach), update, delete, adoption on
//! "login taken", re-creation of a login the VMS forgot, and each one's
//! camera step (SPEC §12.3: after the permissions, or first when another
//! account held the login). Each confirmed answer is recorded at once
//! through `confirm`.

use std::collections::BTreeSet;

use super::policy::PushError;
use super::Executor;
use crate::core::cameras::{self, CameraStep};
use crate::core::pacing::Round;
use crate::core::plan::{applied_after, Action, AppliedUser, Op, Proof};
use crate::vms::{VmsError, VmsOp};

/// A user op that completed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Done {
    /// The user existed already and was adopted.
    pub adopted: bool,
}

const DONE: Done = Done { adopted: false };

type Permissions = BTreeSet<String>;

impl Executor<'_> {
    /// `full`: update with the whole target state (see `execute`).
    pub(super) async fn user(&self, op: &Op, full: bool) -> Result<Done, PushError> {
        // Stale: the other lane pushed this login after it was planned, so
        // its camera step is worked out again from the record as it is now.
        let step = match full {
            true => self.stale_step(op).await?,
            false => op.cameras.clone(),
        };
        // Until an answer proves what happened, the login is in doubt; a
        // crash or a lost answer leaves it so (SPEC §9.1).
        if !self.channel.closed() {
            let asked = AppliedUser {
                owner: op.owner.clone(),
                state: op.target.clone(),
            };
            let label = op.label(&self.core.status_blocked);
            self.store.mark_in_doubt(&op.login, label, &asked).await?;
        }
        let step = step.as_ref();
        match &op.action {
            Action::Create => self.create(op, step).await,
            Action::Update { .. } if full => self.update(op, None, step).await,
            Action::Update { attach, detach, .. } => {
                self.update(op, Some((attach, detach)), step).await
            }
            Action::Delete => self.delete(op).await,
        }
    }

    async fn stale_step(&self, op: &Op) -> Result<Option<CameraStep>, PushError> {
        if op.target.cameras.is_none() {
            return Ok(None);
        }
        let login = std::collections::HashSet::from([op.login.clone()]);
        let current = self.store.load_applied_users(Some(&login)).await?;
        let planned = op.cameras.as_ref();
        Ok(cameras::stale_step(
            current.get(&op.login),
            planned,
            &op.target,
        ))
    }

    /// Records what a VMS answer proved about the op's login.
    async fn confirm(&self, op: &Op, proof: Proof) -> Result<(), PushError> {
        let user = applied_after(op, proof);
        let now = self.clock.now().timestamp();
        let round = Round::of(&op.action).map(|r| match self.restagger {
            true => Round::First,
            false => r,
        });
        let verify_from = round.map(|r| self.pacing.verify_from(&op.login, r, now));
        self.store
            .set_applied(&op.login, user.as_ref(), verify_from)
            .await?;
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

    /// The create request itself (POST `user/manage`).
    async fn post(&self, op: &Op) -> Result<(), VmsError> {
        self.channel
            .request(VmsOp::Create, || self.vms.create(&op.login, &op.target))
            .await
    }

    /// The complete camera set of the op's target.
    async fn send_cameras(&self, op: &Op, step: &CameraStep) -> Result<(), VmsError> {
        let Some(set) = &op.target.cameras else {
            return Ok(());
        };
        self.channel
            .request(VmsOp::Cameras, || {
                self.vms.cameras(&op.login, &set.groups, &step.removed)
            })
            .await
    }

    /// POST, record, then attach the permissions (create takes none), then
    /// the camera set.
    async fn create(&self, op: &Op, step: Option<&CameraStep>) -> Result<Done, PushError> {
        let t = &op.target;
        match self.post(op).await {
            Ok(()) => {}
            // The login exists (created by a run that died before recording,
            // or by hand): adopt it with a full-state PATCH. Whose groups it
            // holds is not known, so its set is replaced first.
            Err(e) if e.is_login_error() => {
                tracing::info!(login = %op.login, "login exists on the VMS; adopting it");
                if let Some(step) = cameras::adopt_step(step, t) {
                    self.send_cameras(op, &step).await?;
                }
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
            let proof = if step.is_some() {
                Proof::Profile
            } else {
                Proof::Updated
            };
            self.confirm(op, proof).await?;
        }
        if let Some(step) = step {
            self.send_cameras(op, step).await?;
            self.confirm(op, Proof::Updated).await?;
        }
        Ok(DONE)
    }

    /// The planned difference of permissions, or (None) the full state,
    /// with the op's camera step; a full push whose op planned no step
    /// states the target set all the same.
    async fn update(
        &self,
        op: &Op,
        delta: Option<(&Permissions, &Permissions)>,
        step: Option<&CameraStep>,
    ) -> Result<Done, PushError> {
        let step = match delta {
            Some(_) => step.cloned(),
            None => step.cloned().or_else(|| cameras::restate(&op.target)),
        };
        match self.send_update(op, delta, step.as_ref()).await {
            Ok(()) => {
                self.confirm(op, Proof::Updated).await?;
                Ok(DONE)
            }
            // Nothing to block or strip: the VMS has no such user.
            Err(PushError::Vms(e)) if e.is_login_error() && op.target.gone => {
                self.confirm(op, Proof::Removed).await?;
                Ok(DONE)
            }
            Err(PushError::Vms(e)) if e.is_login_error() => {
                let step = step.or_else(|| cameras::restate(&op.target));
                self.recreate(op, step.as_ref()).await
            }
            Err(e) => Err(e),
        }
    }

    /// The requests of an update, in order: a replaced set first, the
    /// PATCH (unless the set is all that changed), then the set.
    async fn send_update(
        &self,
        op: &Op,
        delta: Option<(&Permissions, &Permissions)>,
        step: Option<&CameraStep>,
    ) -> Result<(), PushError> {
        let t = &op.target;
        if let Some(first) = step.filter(|s| s.first) {
            self.send_cameras(op, first).await?;
        }
        let patches = delta.is_none() || op.patches();
        match delta {
            _ if !patches => {}
            Some((attach, detach)) => {
                self.channel
                    .request(VmsOp::Update, || {
                        self.vms.update(&op.login, t, attach, detach)
                    })
                    .await?
            }
            None => self.full_patch(op).await?,
        }
        if let Some(after) = step.filter(|s| !s.first) {
            if patches {
                self.confirm(op, Proof::Profile).await?;
            }
            self.send_cameras(op, after).await?;
        }
        Ok(())
    }

    /// The VMS no longer knows the login (removed by hand): create it again
    /// once, then apply the full state. The applied record stays until that
    /// is confirmed; a "taken" answer means an earlier re-create whose answer
    /// was lost made it, so the user is adopted. Another answer about the
    /// data quarantines.
    async fn recreate(&self, op: &Op, step: Option<&CameraStep>) -> Result<Done, PushError> {
        tracing::warn!(login = %op.login, "the VMS no longer knows this login; creating it again");
        match self.post(op).await {
            Ok(()) => {}
            Err(e) if e.is_login_error() => {}
            Err(e) if e.blames_login() => {
                let message = format!("unknown to the VMS and re-creating failed: {e}");
                return Err(VmsError { message, ..e }.into());
            }
            Err(e) => return Err(e.into()),
        }
        self.full_patch(op).await?;
        if let Some(step) = step {
            self.send_cameras(op, step).await?;
        }
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
            // The VMS says it has no such user: already what we want. A 404
            // is not that answer (a proxy or a wrong path says it too).
            Err(e) if e.is_login_error() => {}
            Err(e) => return Err(e.into()),
        }
        self.confirm(op, Proof::Removed).await?;
        Ok(DONE)
    }
}
