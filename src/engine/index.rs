//! Keeping the login index current (issue 21): a pass that normalizes a
//! source's stored accounts notes each row whose login is not what the
//! index holds, and writes those after. A pass over every row then records
//! which normalizer settings the index follows, so a targeted cycle may
//! trust it (`targeted::scope`).

use crate::core::model::{Account, SourceKind};
use crate::core::normalize::Normalizer;
use crate::store::{IndexEntry, Indexed, Store, StoreError};

/// Entries written together while a pass goes on.
const FLUSH_AT: usize = 2_000;

pub struct Indexing {
    tag: String,
    stale: Vec<IndexEntry>,
    /// Whether the stored tag is known to be this pass's or absent.
    tag_checked: bool,
    /// Entries written so far.
    written: usize,
}

impl Indexing {
    pub fn new(normalizer: &Normalizer) -> Self {
        Self {
            tag: normalizer.index_tag(),
            stale: vec![],
            tag_checked: false,
            written: 0,
        }
    }

    /// One row normalized: `account` is what it yields (None: invalid).
    pub fn see(&mut self, row: &Indexed, id: &str, account: Option<&Account>) {
        let login = account.map(|a| a.login.as_str());
        self.stale.extend(row.stale(id, login));
    }

    /// Writes the stale entries once there are enough for a batch, so a
    /// pass over a million new rows holds a batch, not a million.
    pub async fn flush(&mut self, store: &Store, source: SourceKind) -> Result<(), StoreError> {
        if self.stale.len() >= FLUSH_AT {
            self.write(store, source).await?;
        }
        Ok(())
    }

    /// Writes what is left; `whole`: the pass saw every row, and the index
    /// now follows these settings.
    pub async fn finish(
        mut self,
        store: &Store,
        source: SourceKind,
        whole: bool,
    ) -> Result<(), StoreError> {
        self.write(store, source).await?;
        if self.written > 0 {
            tracing::debug!(source = %source, rows = self.written, "login index updated");
        }
        if whole && store.login_tag(source).await?.as_deref() != Some(self.tag.as_str()) {
            store.set_login_tag(source, &self.tag).await?;
        }
        Ok(())
    }

    async fn write(&mut self, store: &Store, source: SourceKind) -> Result<(), StoreError> {
        if !self.stale.is_empty() && !self.tag_checked {
            // Entries of other settings are about to land: until a pass
            // over every row is done, the index follows none (a pass cut
            // short must not leave them under the old settings' name).
            if store
                .login_tag(source)
                .await?
                .is_some_and(|t| t != self.tag)
            {
                store.clear_login_tag(source).await?;
            }
            self.tag_checked = true;
        }
        if !self.stale.is_empty() {
            store.index_logins(source, &self.stale).await?;
            self.written += self.stale.len();
            self.stale.clear();
        }
        Ok(())
    }
}
