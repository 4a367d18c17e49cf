//! A throw-away PostgreSQL cluster for tests and benches: Debian's server
//! binaries (`apt-get install -y postgresql`), `initdb` into a temporary
//! directory, one server on 127.0.0.1 and a free port, a fresh database
//! for each caller. Run as the `postgres` user when the tests run as root
//! (the server refuses root). A watchdog stops the server and removes its
//! directory once the test process is gone, however it ended.
//!
//! `BILLSYNC_TEST_PG_URL` (`postgres://user@host:port`) uses a server
//! already running instead; `BILLSYNC_TEST_PG_BIN` names the directory of
//! the server binaries when they are not where Debian puts them.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;

/// The server every caller of this process shares.
pub struct Cluster {
    /// `postgres://user@host:port`, without a database.
    base: String,
    bin: PathBuf,
}

static CLUSTER: OnceLock<Result<Cluster, String>> = OnceLock::new();
static NEXT_DB: AtomicUsize = AtomicUsize::new(0);

/// A URL of a new, empty database on the shared server. Panics, saying
/// what to install, when no server can be had: a test that needs
/// PostgreSQL must not pass without it.
pub fn fresh_database() -> String {
    let cluster = CLUSTER
        .get_or_init(Cluster::start)
        .as_ref()
        .unwrap_or_else(|e| panic!("no PostgreSQL for the tests: {e}"));
    let name = format!(
        "t{}_{}",
        std::process::id(),
        NEXT_DB.fetch_add(1, Ordering::Relaxed)
    );
    cluster.create_database(&name);
    format!("{}/{name}", cluster.base)
}

impl Cluster {
    fn start() -> Result<Cluster, String> {
        if let Ok(url) = std::env::var("BILLSYNC_TEST_PG_URL") {
            let bin = bin_dir().unwrap_or_default();
            return Ok(Cluster {
                base: url.trim_end_matches('/').to_string(),
                bin,
            });
        }
        let bin = bin_dir().ok_or(
            "PostgreSQL's server binaries were not found: apt-get install -y postgresql \
             (or set BILLSYNC_TEST_PG_BIN, or BILLSYNC_TEST_PG_URL)",
        )?;
        let dir = tempfile::Builder::new()
            .prefix("billsync-pg-")
            .tempdir()
            .map_err(|e| e.to_string())?
            .keep();
        let as_root = is_root();
        if as_root {
            chown_postgres(&dir)?;
        }
        let port = free_port()?;
        let data = dir.join("data");
        let initdb = format!(
            "{} -D {} -A trust -U postgres -N --no-instructions -E UTF8 --locale=C.UTF-8",
            bin.join("initdb").display(),
            data.display()
        );
        run(as_root, &initdb)?;
        let opts = format!(
            "-c listen_addresses=127.0.0.1 -p {port} -k {} -c fsync=off \
             -c synchronous_commit=off -c full_page_writes=off -c max_connections=300",
            dir.display()
        );
        let start = format!(
            "{} -D {} -l {} -w -o '{opts}' start",
            bin.join("pg_ctl").display(),
            data.display(),
            dir.join("log").display()
        );
        run(as_root, &start)?;
        watch(as_root, &bin, &dir)?;
        Ok(Cluster {
            base: format!("postgres://postgres@127.0.0.1:{port}"),
            bin,
        })
    }

    fn create_database(&self, name: &str) {
        let url = url::Url::parse(&self.base).expect("a PostgreSQL URL");
        let out = Command::new(self.bin.join("createdb"))
            .args(["-h", url.host_str().unwrap_or("127.0.0.1")])
            .args(["-p", &url.port().unwrap_or(5432).to_string()])
            .args([
                "-U",
                if url.username().is_empty() {
                    "postgres"
                } else {
                    url.username()
                },
            ])
            .arg(name)
            .output()
            .unwrap_or_else(|e| panic!("createdb: {e}"));
        assert!(
            out.status.success(),
            "createdb {name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

fn bin_dir() -> Option<PathBuf> {
    if let Ok(dir) = std::env::var("BILLSYNC_TEST_PG_BIN") {
        return Some(PathBuf::from(dir));
    }
    let mut found: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
        .filter(|b| b.join("initdb").is_file())
        .collect();
    found.sort();
    found.pop()
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

fn chown_postgres(dir: &Path) -> Result<(), String> {
    let ok = Command::new("chown")
        .args(["postgres:postgres", &dir.display().to_string()])
        .status()
        .map_err(|e| e.to_string())?
        .success();
    ok.then_some(())
        .ok_or_else(|| format!("cannot give {} to the postgres user", dir.display()))
}

/// A port nobody listens on now (the server binds it a moment later).
fn free_port() -> Result<u16, String> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    Ok(l.local_addr().map_err(|e| e.to_string())?.port())
}

/// Runs a shell command, as the `postgres` user when we are root.
fn run(as_root: bool, cmd: &str) -> Result<(), String> {
    let out = shell(as_root, cmd)
        .stdout(Stdio::null())
        .output()
        .map_err(|e| e.to_string())?;
    match out.status.success() {
        true => Ok(()),
        false => Err(format!(
            "{cmd}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )),
    }
}

fn shell(as_root: bool, cmd: &str) -> Command {
    let mut c = match as_root {
        true => {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--", "sh", "-c", cmd]);
            c
        }
        false => {
            let mut c = Command::new("sh");
            c.args(["-c", cmd]);
            c
        }
    };
    c.current_dir("/");
    c
}

/// Stops the server and removes its files once this process has ended.
fn watch(as_root: bool, bin: &Path, dir: &Path) -> Result<(), String> {
    let script = format!(
        "while [ -d /proc/{pid} ]; do sleep 1; done; \
         {pg_ctl} -D {data} -m immediate stop >/dev/null 2>&1; rm -rf {dir}",
        pid = std::process::id(),
        pg_ctl = bin.join("pg_ctl").display(),
        data = dir.join("data").display(),
        dir = dir.display()
    );
    let cmd = format!("nohup sh -c '{script}' >/dev/null 2>&1 &");
    run(as_root, &cmd)
}
