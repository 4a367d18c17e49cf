//! Settings the VMS API cannot apply to users that exist already: said once
//! (a warning and a notice in `status`) when they change.

use crate::config::Settings;
use crate::store::{Store, StoreError};

/// `(meta key, setting name, current value)` of each such setting.
fn watched(settings: &Settings) -> [(&'static str, &'static str, &str); 1] {
    [(
        "settings.vms.user_type",
        "vms.user_type",
        settings.vms.user_type.as_str(),
    )]
}

pub async fn unappliable_settings(store: &Store, settings: &Settings) -> Result<(), StoreError> {
    for (key, name, now) in watched(settings) {
        let before = store.meta(key).await?;
        if before.as_deref() == Some(now) {
            continue;
        }
        if let Some(before) = before {
            let message = format!(
                "{name} changed from {before:?} to {now:?}: the VMS API cannot change it for \
                 existing users, so only users created from now on get {now:?}"
            );
            tracing::warn!("{message}");
            store.add_notice(&message).await?;
        }
        store.set_meta(key, now).await?;
    }
    Ok(())
}
