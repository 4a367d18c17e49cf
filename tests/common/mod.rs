//! Shared test fixtures: emulators on loopback, configs pointing at them,
//! a temporary state store.
#![allow(dead_code)]

use std::path::PathBuf;
use std::sync::Arc;

use billsync::config::{self, Settings};
use billsync::emulators::activeplatform::{self as ap_emu, ApEmulator};
use billsync::emulators::billmanager::{self as bm_emu, BmEmulator};
use billsync::emulators::Server;

pub struct World {
    pub bm: Arc<BmEmulator>,
    pub ap: Arc<ApEmulator>,
    pub bm_srv: Server,
    pub ap_srv: Server,
    pub dir: tempfile::TempDir,
}

impl World {
    pub async fn new(bm_accounts: usize, ap_accounts: usize) -> Self {
        let bm = BmEmulator::new(bm_accounts, 7);
        let ap = ApEmulator::new(ap_accounts, 7);
        let bm_srv = bm.serve().await.unwrap();
        let ap_srv = ap.serve().await.unwrap();
        Self {
            bm,
            ap,
            bm_srv,
            ap_srv,
            dir: tempfile::tempdir().unwrap(),
        }
    }

    pub fn state_path(&self) -> PathBuf {
        self.dir.path().join("state.db")
    }

    /// A config for both sources (and a VMS URL that `extra` may replace).
    pub fn config_text(&self, extra: &str) -> String {
        format!(
            r#"
[daemon]
state_path = "{state}"

[vms]
url = "http://127.0.0.1:9"

[sources.billmanager]
url = "{bm}/billmgr"
username = "{bm_user}"
password = "{bm_pass}"
page_size = 100
timeout_secs = 2

[sources.activeplatform]
url = "{ap}"
api_token = "{ap_token}"
page_size = 100
timeout_secs = 2
{extra}
"#,
            state = self.state_path().display(),
            bm = self.bm_srv.base_url(),
            ap = self.ap_srv.base_url(),
            bm_user = bm_emu::USER,
            bm_pass = bm_emu::PASSWORD,
            ap_token = ap_emu::TOKEN,
        )
    }

    pub fn settings(&self, extra: &str) -> Settings {
        settings_from(&self.config_text(extra))
    }
}

pub fn settings_from(text: &str) -> Settings {
    let f = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(f.path(), text).unwrap();
    config::load(f.path(), &[]).unwrap().0
}

impl World {
    /// Settings with `BILLSYNC__…` overrides, as the environment gives them.
    pub fn settings_env(&self, extra: &str, env: &[(&str, &str)]) -> Settings {
        let f = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(f.path(), self.config_text(extra)).unwrap();
        let env: Vec<(String, String)> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        config::load(f.path(), &env).unwrap().0
    }
}
