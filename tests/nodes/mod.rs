//! Nodes of one shared store (SPEC §13) for the tests: `billsync run`
//! processes with a short lease, each optionally behind its own proxies to
//! the VMS and to PostgreSQL, and what they report on their admin server.

#![allow(dead_code)]

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use billsync_emulators::lab::Lab;

pub const BIN: &str = env!("CARGO_BIN_EXE_billsync");
pub const TOKEN: &str = "test-admin-token-0123456789";
/// The lease the nodes run with: 3 s, renewed every second.
pub const LEASE: Duration = Duration::from_secs(3);

pub fn billsync(lab: &Lab, args: &[&str]) -> Command {
    let mut c = Command::new(BIN);
    c.arg("--config").arg(lab.config_path()).args(args);
    c.env_remove("RUST_LOG");
    c
}

/// Where a node reaches the VMS and the store, when not the lab's own.
#[derive(Default, Clone)]
pub struct Via {
    pub vms_url: Option<String>,
    pub state_url: Option<String>,
    /// Else `LEASE`.
    pub lease: Option<Duration>,
    /// More `BILLSYNC__...` overrides.
    pub env: Vec<(&'static str, String)>,
}

/// One `billsync run` node; killed when dropped.
pub struct Node {
    pub child: Child,
    pub admin: String,
    pub name: String,
    /// Its stderr (warnings and errors).
    pub log: PathBuf,
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Node {
    /// Node `name` with the short lease, its admin endpoint up.
    pub async fn start(lab: &Lab, name: &str) -> Self {
        Self::start_via(lab, name, &Via::default()).await
    }

    pub async fn start_via(lab: &Lab, name: &str, via: &Via) -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let admin = format!("127.0.0.1:{port}");
        let log = lab.dir.path().join(format!("{name}-{port}.log"));
        let lease = via.lease.unwrap_or(LEASE);
        let mut cmd = billsync(lab, &["run"]);
        cmd.env("BILLSYNC__ADMIN__LISTEN", &admin)
            .env("BILLSYNC__ADMIN__TOKEN", TOKEN)
            .env("BILLSYNC__DAEMON__NODE_NAME", name)
            .env("BILLSYNC__DAEMON__LEASE_SECS", lease.as_secs().to_string())
            .env_remove("NOTIFY_SOCKET")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap());
        if let Some(url) = &via.vms_url {
            cmd.env("BILLSYNC__VMS__URL", url);
        }
        if let Some(url) = &via.state_url {
            cmd.env("BILLSYNC__DAEMON__STATE_URL", url);
        }
        cmd.envs(via.env.iter().map(|(k, v)| (k, v)));
        let node = Node {
            child: cmd.spawn().unwrap(),
            admin: format!("http://{admin}"),
            name: name.into(),
            log,
        };
        let up = || async { reqwest::get(format!("{}/livez", node.admin)).await.is_ok() };
        wait_for("the node's admin endpoint", Duration::from_secs(20), up).await;
        node
    }

    async fn get(&self, path: &str) -> Option<reqwest::Response> {
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(5))
            .build()
            .unwrap();
        client
            .get(format!("{}{path}", self.admin))
            .send()
            .await
            .ok()
    }

    pub async fn metrics(&self) -> String {
        match self.get("/metrics").await {
            Some(r) => r.text().await.unwrap_or_default(),
            None => String::new(),
        }
    }

    /// `billsync_leader` as this node reports it.
    pub async fn leads(&self) -> bool {
        self.metrics()
            .await
            .lines()
            .any(|l| l == "billsync_leader 1")
    }

    /// Every VMS request this node sent (`billsync_vms_requests_total`).
    pub async fn vms_requests(&self) -> u64 {
        let text = self.metrics().await;
        let counts = text
            .lines()
            .filter(|l| l.starts_with("billsync_vms_requests_total{"));
        counts
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>() as u64
    }

    /// `/healthz`'s role.
    pub async fn role(&self) -> String {
        let Some(r) = self.get("/healthz").await else {
            return String::new();
        };
        let v: serde_json::Value = r.json().await.unwrap_or_default();
        v["role"].as_str().unwrap_or_default().to_string()
    }

    /// `/readyz`: its status code and body.
    pub async fn readyz(&self) -> (u16, serde_json::Value) {
        let r = self.get("/readyz").await.expect("/readyz answers");
        let code = r.status().as_u16();
        (code, r.json().await.unwrap_or_default())
    }

    /// Sends `sig` (`-STOP`, `-CONT`) to the process.
    pub fn signal(&self, sig: &str) {
        let pid = self.child.id().to_string();
        let ok = Command::new("kill")
            .args([sig, &pid])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill {sig} {pid}");
    }

    pub fn kill_9(&mut self) {
        self.child.kill().unwrap();
        let _ = self.child.wait();
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

/// Waits for `f`; fails the test when `limit` passes first.
pub async fn wait_for<F, Fut>(what: &str, limit: Duration, f: F)
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let t = std::time::Instant::now();
    while !f().await {
        assert!(t.elapsed() < limit, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Logins the VMS created more than once (a 2xx `POST user/manage`).
pub fn created_twice(lab: &Lab) -> std::collections::BTreeMap<String, usize> {
    let mut created: std::collections::BTreeMap<String, usize> = Default::default();
    for e in lab.vms.data().events.iter() {
        if e.method == "POST" && e.path == "user/manage" && (200..300).contains(&e.status) {
            *created.entry(e.login.clone()).or_default() += 1;
        }
    }
    created.retain(|_, n| *n > 1);
    created
}

/// `url` (the lab's PostgreSQL) reached through `proxy` instead, its
/// sessions named `name` (so a test can find and terminate them).
pub fn through(url: &str, proxy: std::net::SocketAddr, name: &str) -> String {
    let mut u = url::Url::parse(url).unwrap();
    u.set_ip_host(proxy.ip()).unwrap();
    u.set_port(Some(proxy.port())).unwrap();
    u.query_pairs_mut().append_pair("application_name", name);
    u.to_string()
}

/// The socket address of a `postgres://` or `http://` URL on loopback.
pub fn addr_of(url: &str) -> std::net::SocketAddr {
    let u = url::Url::parse(url).unwrap();
    let port = u.port_or_known_default().unwrap();
    format!("{}:{port}", u.host_str().unwrap()).parse().unwrap()
}

/// Every leadership term the store held while watched: epoch → the
/// holder's node name and when the term began (database time, ms).
type Seen = std::sync::Arc<std::sync::Mutex<std::collections::BTreeMap<i64, (String, i64)>>>;

pub struct Terms {
    seen: Seen,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Terms {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Terms {
    /// Reads the lease every 20 ms: a term lasts far longer than that.
    pub fn watch(store: billsync::store::Store) -> Self {
        let seen: Seen = Default::default();
        let into = seen.clone();
        let task = tokio::spawn(async move {
            loop {
                if let Ok(Some(r)) = store.lease().await {
                    let node = r.holder.split('/').next().unwrap_or_default().to_string();
                    let mut m = into.lock().unwrap_or_else(|e| e.into_inner());
                    m.entry(r.epoch).or_insert((node, r.since_ms));
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        });
        Terms { seen, task }
    }

    pub fn all(&self) -> Vec<(i64, String, i64)> {
        let m = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        m.iter().map(|(e, (n, s))| (*e, n.clone(), *s)).collect()
    }

    /// The sends of `node` (wall clock, which the database on this machine
    /// shares) that fell in another node's term: after that one took the
    /// lease, so after `node`'s own lease had expired.
    pub fn foreign(&self, node: &str, sends: &[std::time::SystemTime]) -> Vec<(u128, String)> {
        let terms = self.all();
        let ms = |t: &std::time::SystemTime| {
            t.duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default()
                .as_millis()
        };
        sends
            .iter()
            .filter_map(|t| {
                let at = ms(t) as i64;
                let (_, holder, _) = terms.iter().rev().find(|(_, _, since)| *since <= at)?;
                (holder != node).then(|| (at as u128, holder.clone()))
            })
            .collect()
    }
}

/// One test of this binary at a time: two nodes with a 3 s lease each
/// share the machine's two cores with the emulators and PostgreSQL.
pub async fn one_at_a_time() -> tokio::sync::MutexGuard<'static, ()> {
    static ONE: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    ONE.lock().await
}

/// Logs every committed write statement to the store's tables (but the
/// lease's) with the writing session's `application_name` and the
/// database time: which node wrote when. For the tests of fencing only.
pub async fn log_writes(url: &str) -> sqlx::PgPool {
    let db = sqlx::PgPool::connect(url).await.unwrap();
    let setup = [
        "CREATE TABLE test_write_log (app TEXT NOT NULL, at_ms BIGINT NOT NULL)",
        "CREATE FUNCTION test_log_write() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN
           INSERT INTO test_write_log VALUES (current_setting('application_name'),
             CAST(EXTRACT(EPOCH FROM clock_timestamp()) * 1000 AS BIGINT));
           RETURN NULL;
         END $$",
        "DO $$ DECLARE t TEXT; BEGIN
           FOR t IN SELECT table_name FROM information_schema.tables
                    WHERE table_schema = current_schema() AND table_type = 'BASE TABLE'
                      AND table_name NOT IN ('test_write_log', '_sqlx_migrations', 'lease')
           LOOP
             EXECUTE format('CREATE TRIGGER test_log_write AFTER INSERT OR UPDATE OR DELETE
                             ON %I FOR EACH STATEMENT EXECUTE FUNCTION test_log_write()', t);
           END LOOP;
         END $$",
    ];
    for sql in setup {
        sqlx::raw_sql(sql).execute(&db).await.unwrap();
    }
    db
}

/// How many write statements `app` committed after `since_ms`.
pub async fn writes_after(db: &sqlx::PgPool, app: &str, since_ms: i64) -> i64 {
    sqlx::query_scalar("SELECT COUNT(*) FROM test_write_log WHERE app = $1 AND at_ms > $2")
        .bind(app)
        .bind(since_ms)
        .fetch_one(db)
        .await
        .unwrap()
}
