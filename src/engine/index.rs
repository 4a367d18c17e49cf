//! Keeping the login index current (issue 21): a pass that normalizes a
//! source's stored accounts notes each row whose login is not what the
//! index holds, and writes those after. A pass over every row then records
//! which normalizer settings the index follows, so a targeted cycle may
//! trust it (`targeted::scope`).

use crate::core::model::{Account, SourceKind};
use crate::core::normalize::Normalizer;
use crate::store::{IndexEntry, Indexed, Store, StoreError};

pub struct Indexing {
    tag: String,
    stale: Vec<IndexEntry>,
}

impl Indexing {
    pub fn new(normalizer: &Normalizer) -> Self {
        Self {
            tag: normalizer.index_tag(),
            stale: vec![],
        }
    }

    /// One row normalized: `account` is what it yields (None: invalid).
    pub fn see(&mut self, row: &Indexed, id: &str, account: Option<&Account>) {
        let login = account.map(|a| a.login.as_str());
        self.stale.extend(row.stale(id, login));
    }

    /// Writes the stale entries; `whole`: the pass saw every row.
    pub async fn write(
        self,
        store: &Store,
        source: SourceKind,
        whole: bool,
    ) -> Result<(), StoreError> {
        if !self.stale.is_empty() {
            tracing::debug!(source = %source, rows = self.stale.len(), "login index updated");
            store.index_logins(source, &self.stale).await?;
        }
        if whole && store.login_tag(source).await?.as_deref() != Some(self.tag.as_str()) {
            store.set_login_tag(source, &self.tag).await?;
        }
        Ok(())
    }
}
