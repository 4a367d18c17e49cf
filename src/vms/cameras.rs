//! Camera access on the VMS (SPEC §12.3): the user's complete public group
//! set, and the read-only list of what the user sees (`explain --vms`).

use std::collections::BTreeSet;

use reqwest::Method;
use serde_json::{json, Value};

use super::{Expect, VmsClient, VmsError, VmsOp};
use crate::config::CameraFormat;
use crate::http;

const CAMERAS_PATH: &str = "api/v1/billing/user/manage/cameras";
const LIST_PATH: &str = "api/v1/billing/cameras/list";

/// One camera the VMS says a user sees.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VisibleCamera {
    pub external_id: Option<String>,
    pub name: Option<String>,
    pub status: Option<String>,
    pub group_type: Option<String>,
}

impl VmsClient {
    /// Sends the complete set: bare ids, or objects with the groups the set
    /// drops once more as blocked (so removal works whether the VMS
    /// replaces or merges).
    pub async fn cameras(
        &self,
        login: &str,
        groups: &BTreeSet<String>,
        removed: &BTreeSet<String>,
    ) -> Result<(), VmsError> {
        let list = match self.camera_format {
            CameraFormat::Ids => json!(groups),
            CameraFormat::Objects => {
                let entry = |g: &String, status| json!({"external_id": g, "status": status});
                let active = groups.iter().map(|g| entry(g, "active"));
                let blocked = removed.iter().map(|g| entry(g, "blocked"));
                Value::Array(active.chain(blocked).collect())
            }
        };
        let body = json!({"login": login, "public_group_external_ids": list});
        let expect = Expect::Synced(login);
        self.send(VmsOp::Cameras, Method::POST, CAMERAS_PATH, body, expect)
            .await
    }

    /// What the user sees (`GET cameras/list?login=`, 24.12+). Read-only.
    pub async fn visible_cameras(&self, login: &str) -> Result<Vec<VisibleCamera>, VmsError> {
        let url = (self.base.join(LIST_PATH))
            .map_err(|e| VmsError::transient(format!("bad VMS URL: {e}"), None))?;
        let req = self.http.get(url).query(&[("login", login)]);
        let (status, headers, bytes) = http::send(req).await.map_err(VmsError::from)?;
        if !(200..300).contains(&status) {
            return Err(super::decode_error(status, &headers, &bytes));
        }
        let value = http::parse_json(&bytes).map_err(VmsError::from)?;
        Ok(visible(value))
    }
}

/// The cameras of a list answer: an array, under `data` or not; `null`
/// (no cameras) and anything else are none.
fn visible(value: Value) -> Vec<VisibleCamera> {
    let list = match value {
        Value::Object(mut o) => o.remove("data").unwrap_or(Value::Null),
        other => other,
    };
    let Value::Array(items) = list else {
        return vec![];
    };
    let text = |v: &Value, key: &str| v.get(key).and_then(crate::sources::json_text);
    items
        .iter()
        .map(|c| VisibleCamera {
            external_id: text(c, "external_id").or_else(|| text(c, "id")),
            name: text(c, "name"),
            status: text(c, "status"),
            group_type: text(c, "group_type"),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_list_answer_in_every_shape() {
        assert!(visible(Value::Null).is_empty());
        let one = json!([{"id": 7, "external_id": "cam-1", "status": "active", "name": "Door", "group_type": "public"}]);
        let cams = visible(one.clone());
        assert_eq!(cams.len(), 1);
        assert_eq!(cams[0].external_id.as_deref(), Some("cam-1"));
        assert_eq!(cams[0].group_type.as_deref(), Some("public"));
        assert_eq!(visible(json!({"data": one})), cams);
        let bare = visible(json!([{"id": 9}]));
        assert_eq!(bare[0].external_id.as_deref(), Some("9"));
        assert!(visible(json!({"data": null})).is_empty());
    }
}
