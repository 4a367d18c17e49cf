//! All three emulators on loopback and a config pointing at them: what
//! `billsync sandbox`, the integration tests and the benchmarks start from.

use std::path::PathBuf;
use std::sync::Arc;

use super::activeplatform::{self as ap_emu, ApEmulator};
use super::billmanager::{self as bm_emu, BmEmulator};
use super::vms::VmsEmulator;
use super::Server;

pub struct Lab {
    pub bm: Arc<BmEmulator>,
    pub ap: Arc<ApEmulator>,
    pub vms: Arc<VmsEmulator>,
    pub bm_srv: Server,
    pub ap_srv: Server,
    pub vms_srv: Server,
    pub dir: tempfile::TempDir,
    /// The state store in PostgreSQL (a fresh database) instead of the
    /// SQLite file: `with_postgres`, or `BILLSYNC_TEST_STORE=postgres`.
    pub state_url: Option<String>,
}

impl Lab {
    pub async fn start(bm_accounts: usize, ap_accounts: usize) -> std::io::Result<Self> {
        Self::start_in(bm_accounts, ap_accounts, None).await
    }

    /// With its files in a new directory under `parent` (else the system's
    /// temporary directory); `dir.disable_cleanup(true)` keeps them.
    pub async fn start_in(
        bm_accounts: usize,
        ap_accounts: usize,
        parent: Option<&std::path::Path>,
    ) -> std::io::Result<Self> {
        let mut dir = tempfile::Builder::new();
        dir.prefix("billsync-lab-");
        let dir = match parent {
            Some(p) => dir.tempdir_in(p)?,
            None => dir.tempdir()?,
        };
        let bm = BmEmulator::new(bm_accounts, 7);
        let ap = ApEmulator::new(ap_accounts, 7);
        let vms = VmsEmulator::new();
        let bm_srv = bm.serve().await?;
        let ap_srv = ap.serve().await?;
        let vms_srv = vms.serve().await?;
        Ok(Self {
            bm,
            ap,
            vms,
            bm_srv,
            ap_srv,
            vms_srv,
            dir,
            state_url: None,
        }
        .with_store_from_env())
    }

    /// The state store in a fresh PostgreSQL database (SPEC §13).
    pub fn with_postgres(mut self) -> Self {
        self.state_url = Some(super::postgres::fresh_database());
        self
    }

    /// PostgreSQL when `BILLSYNC_TEST_STORE=postgres`, or when this is a
    /// test binary named `*_on_postgres` (a suite run again on it).
    fn with_store_from_env(self) -> Self {
        let by_env = std::env::var("BILLSYNC_TEST_STORE").is_ok_and(|v| v == "postgres");
        let exe = std::env::current_exe().unwrap_or_default();
        let name = exe.file_name().and_then(|n| n.to_str()).unwrap_or_default();
        match by_env || name.contains("_on_postgres") {
            true => self.with_postgres(),
            false => self,
        }
    }

    pub fn state_path(&self) -> PathBuf {
        self.dir.path().join("state.db")
    }

    pub fn config_path(&self) -> PathBuf {
        self.dir.path().join("billsync.toml")
    }

    /// A complete config for the three emulators; `extra` is appended (start
    /// it with a `[section]` header). Everything is the shipped default but
    /// what a lab must change, each with its reason. The admin endpoint
    /// takes any free port, its token comes from elsewhere.
    pub fn config_text(&self, extra: &str) -> String {
        self.config_with_admin(extra, "listen = \"127.0.0.1:0\"")
    }

    /// The same with `admin` as the body of the `[admin]` section.
    pub fn config_with_admin(&self, extra: &str, admin: &str) -> String {
        format!(
            r#"[daemon]
state_path = "{state}"
{state_url}
# Every 2 s rather than every minute, so cycles can be watched.
schedule = "*/2 * * * * *"
control_poll_secs = 1

[admin]
{admin}

[log]
format = "pretty"
level = "warn"

[vms]
url = "{vms}"
# The emulators answer on loopback at once: short timeouts, a high rate,
# and a retry in the next cycle rather than minutes later.
timeout_secs = 5
max_requests_per_second = 1000
requeue_base_secs = 0

[sources.billmanager]
url = "{bm}/billmgr"
username = "{bm_user}"
password = "{bm_pass}"
page_size = 100
timeout_secs = 5

[sources.activeplatform]
url = "{ap}"
api_token = "{ap_token}"
page_size = 100
timeout_secs = 5
{extra}
"#,
            state = self.state_path().display(),
            state_url = match &self.state_url {
                Some(url) => format!("state_url = \"{url}\""),
                None => String::new(),
            },
            vms = self.vms_srv.base_url(),
            bm = self.bm_srv.base_url(),
            ap = self.ap_srv.base_url(),
            bm_user = bm_emu::USER,
            bm_pass = bm_emu::PASSWORD,
            ap_token = ap_emu::TOKEN,
        )
    }

    /// Writes the config (mode 0600: it holds the emulators' secrets) and
    /// returns its path.
    pub fn write_config(&self, extra: &str) -> PathBuf {
        self.write_config_text(&self.config_text(extra))
    }

    /// Writes `text` as the config (mode 0600) and returns its path.
    pub fn write_config_text(&self, text: &str) -> PathBuf {
        let path = self.config_path();
        write_private(&path, text);
        path
    }
}

fn write_private(path: &std::path::Path, text: &str) {
    let _ = std::fs::write(path, text);
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let _ = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600));
    }
}
