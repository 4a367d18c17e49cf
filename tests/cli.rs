//! The real binary against the emulators: exit codes, JSON output, the state
//! lock, secrets kept out of output, and kill -9 in the middle of a cycle.

mod common;
use common::LabSettings;

use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use billsync_emulators::activeplatform::TOKEN;
use billsync_emulators::billmanager::PASSWORD;
use billsync_emulators::lab::Lab;
use billsync_emulators::Fault;

const BIN: &str = env!("CARGO_BIN_EXE_billsync");

fn billsync(lab: &Lab, args: &[&str]) -> Command {
    let mut c = Command::new(BIN);
    c.arg("--config").arg(lab.config_path()).args(args);
    c.env_remove("RUST_LOG");
    c
}

/// Waits for `f`; fails the test when `limit` passes first.
async fn wait_until(what: &str, limit: Duration, mut f: impl FnMut() -> bool) {
    let t = Instant::now();
    while !f() {
        assert!(t.elapsed() < limit, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

async fn run(lab: &Lab, args: &[&str]) -> Output {
    let mut cmd = billsync(lab, args);
    tokio::task::spawn_blocking(move || cmd.output().unwrap())
        .await
        .unwrap()
}

fn text(o: &Output) -> String {
    format!(
        "status {:?}\nstdout:\n{}\nstderr:\n{}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

async fn lab(bm: usize, ap: usize, extra: &str) -> Lab {
    let lab = Lab::start(bm, ap).await.unwrap();
    lab.settings(extra, &[]).unwrap();
    lab
}

#[tokio::test(flavor = "multi_thread")]
async fn sync_json_and_exit_codes() {
    let lab = lab(5, 5, "").await;
    let out = run(&lab, &["sync", "--json"]).await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    for key in [
        "kind",
        "result",
        "dry_run",
        "started_at",
        "finished_at",
        "sources",
        "operations",
        "applied",
        "pending",
        "quarantined",
        "held",
        "invalid",
        "conflicts",
        "plan",
    ] {
        assert!(v.get(key).is_some(), "missing {key} in {v}");
    }
    assert_eq!(v["operations"]["create"], 10);
    assert_eq!(v["sources"]["billmanager"]["complete"], true);
    // Quarantined work: exit 1.
    lab.vms
        .data()
        .force_422
        .insert("user1@bm.example.com".into());
    lab.bm.data().accounts[0].balance = "-10000".into();
    let out = run(&lab, &["sync"]).await;
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    // VMS down: the breaker opens before anything applies: exit 3.
    lab.vms.faults.always("", Fault::Status(503));
    lab.bm.data().accounts[1].balance = "-10000".into();
    let mut cmd = billsync(&lab, &["sync", "--json"]);
    cmd.env("BILLSYNC__VMS__CIRCUIT_BREAKER_FAILURES", "2");
    let out = tokio::task::spawn_blocking(move || cmd.output().unwrap())
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(3), "{}", text(&out));
    lab.vms.faults.clear();
    // A dry run exits 0 with the plan.
    let out = run(&lab, &["sync", "--dry-run", "--json"]).await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(v["plan"]
        .as_array()
        .unwrap()
        .iter()
        .any(|p| p["login"] == "user2@bm.example.com"));
    // status, quarantine and explain speak JSON.
    let out = run(&lab, &["status", "--json"]).await;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    for key in billsync::status::KEYS {
        assert!(v.get(key).is_some(), "missing {key}");
    }
    assert_eq!(v["quarantined"][0]["login"], "user1@bm.example.com");
    let out = run(&lab, &["quarantine", "list", "--json"]).await;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v.as_array().unwrap().len(), 1);
    let out = run(&lab, &["explain", "billmanager:2", "--json"]).await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["normalized"]["login"], "user2@bm.example.com");
    assert!(
        v["operations"]
            .as_array()
            .unwrap()
            .iter()
            .any(|o| o["action"] == "detach"),
        "{v}"
    );
    // The quarantined login's trace shows its quarantine and the VMS's words.
    let out = run(&lab, &["explain", "user1@bm.example.com", "--json"]).await;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["normalized"]["login"], "user1@bm.example.com", "{v}");
    let q = v["quarantine"].as_array().unwrap();
    assert_eq!(q.len(), 1, "{v}");
    assert_eq!(q[0]["part"], "user");
    assert!(q[0]["error"].as_str().unwrap().contains("HTTP 422"), "{v}");
    let human = run(&lab, &["explain", "user2@bm.example.com"]).await;
    let shown = String::from_utf8_lossy(&human.stdout);
    assert!(!shown.contains("quarantined since"), "{shown}");
    // Release, approve and resync file requests and say so.
    let out = run(&lab, &["quarantine", "release", "--all"]).await;
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("released 1"),
        "{}",
        text(&out)
    );
    let out = run(&lab, &["resync", "--login", "user3@bm.example.com"]).await;
    assert!(String::from_utf8_lossy(&out.stdout).contains("user3@bm.example.com"));
    let out = run(&lab, &["status", "--json"]).await;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["resync_requested"], true);
}

#[tokio::test(flavor = "multi_thread")]
async fn config_errors_exit_2_and_name_the_key() {
    let lab = lab(1, 1, "").await;
    std::fs::write(
        lab.config_path(),
        lab.config_text("[vms.tree]\nenabled = 3\n"),
    )
    .unwrap();
    let out = run(&lab, &["sync"]).await;
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("vms.tree.enabled"),
        "{}",
        text(&out)
    );
    std::fs::write(lab.config_path(), lab.config_text("")).unwrap();
    let mut cmd = billsync(&lab, &["check-config"]);
    cmd.env("BILLSYNC__VMS__CONCURRENCY", "lots");
    let out = tokio::task::spawn_blocking(move || cmd.output().unwrap())
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("vms.concurrency"),
        "{}",
        text(&out)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn secrets_never_reach_output() {
    let lab = lab(3, 3, "").await;
    let out = run(&lab, &["check-config", "--connect"]).await;
    let all = text(&out);
    assert_eq!(out.status.code(), Some(0), "{all}");
    assert!(!all.contains(PASSWORD) && !all.contains(TOKEN), "{all}");
    assert!(all.contains("raw statuses seen"), "{all}");
    assert!(all.contains("vms: answers"), "{all}");
    // Failing sources put URLs and errors in logs: still no secret.
    lab.ap.faults.always("accounts.json", Fault::Status(500));
    lab.bm
        .faults
        .always("account", Fault::ErrorBody("auth".into()));
    let mut cmd = billsync(&lab, &["sync"]);
    cmd.env("RUST_LOG", "debug");
    let out = tokio::task::spawn_blocking(move || cmd.output().unwrap())
        .await
        .unwrap();
    let all = text(&out);
    assert_eq!(out.status.code(), Some(3), "{all}");
    assert!(!all.contains(PASSWORD) && !all.contains(TOKEN), "{all}");
    // A status map that lacks a raw status is reported by --connect.
    lab.ap.faults.clear();
    lab.bm.faults.clear();
    lab.bm.data().accounts[0].status = "7".into();
    let out = run(&lab, &["check-config", "--connect"]).await;
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("LACKS [\"7\"]"),
        "{}",
        text(&out)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_second_writer_is_refused() {
    let lab = lab(40, 0, "").await;
    lab.vms.faults.set_latency(Duration::from_millis(50));
    let mut first = billsync(&lab, &["sync"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Wait until the first one is pushing, so it holds the lock.
    wait_until("the first sync to push", Duration::from_secs(20), || {
        lab.vms.requests() > 0
    })
    .await;
    let out = run(&lab, &["sync"]).await;
    assert_eq!(out.status.code(), Some(3), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("in use"),
        "{}",
        text(&out)
    );
    let status = tokio::task::spawn_blocking(move || first.wait().unwrap())
        .await
        .unwrap();
    assert_eq!(status.code(), Some(0));
}

#[tokio::test(flavor = "multi_thread")]
async fn kill_9_mid_cycle_loses_nothing_and_creates_once() {
    let lab = lab(200, 100, "").await;
    lab.vms.faults.set_latency(Duration::from_millis(15));
    let mut child = billsync(&lab, &["sync"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_until("60 users created", Duration::from_secs(60), || {
        lab.vms.data().users.len() >= 60
    })
    .await;
    child.kill().unwrap(); // SIGKILL
    let status = child.wait().unwrap();
    assert_eq!(status.code(), None, "killed by a signal");
    let created_before = lab.vms.data().users.len();
    assert!(
        (60..300).contains(&created_before),
        "killed mid-cycle at {created_before}"
    );
    lab.vms.faults.set_latency(Duration::ZERO);
    let out = run(&lab, &["sync", "--json"]).await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let users = lab.vms.data().users.clone();
    assert_eq!(users.len(), 300, "nothing lost");
    // Each login was created exactly once; a retry after the kill met a 422
    // and adopted the user instead of creating a second one.
    let events = lab.vms.data().events.clone();
    for login in users.keys() {
        let ok_creates = events
            .iter()
            .filter(|e| {
                e.method == "POST"
                    && e.path == "user/manage"
                    && e.login == *login
                    && e.status == 200
            })
            .count();
        assert_eq!(ok_creates, 1, "{login}");
    }
    // And every user carries its desired permissions: the run after the
    // kill re-sent what was lost in between.
    let again = run(&lab, &["sync", "--json"]).await;
    let v: serde_json::Value = serde_json::from_slice(&again.stdout).unwrap();
    assert_eq!(v["operations"]["create"], 0);
    assert_eq!(v["operations"]["update"], 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_example_config_is_valid_with_credentials() {
    let dir = tempfile::tempdir().unwrap();
    let creds = dir.path().join("creds");
    std::fs::create_dir(&creds).unwrap();
    for (name, value) in [
        ("billmanager_password", "bm-secret-value\n"),
        ("activeplatform_api_token", "ap-secret-value\n"),
        ("admin_token", "admin-secret-value\n"),
    ] {
        std::fs::write(creds.join(name), value).unwrap();
    }
    let example =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/billsync.toml"))
            .unwrap();
    let state = dir.path().join("state.db");
    let config = dir.path().join("billsync.toml");
    std::fs::write(
        &config,
        example.replace("/var/lib/billsync/state.db", &state.display().to_string()),
    )
    .unwrap();
    let out = Command::new(BIN)
        .arg("--config")
        .arg(&config)
        .arg("check-config")
        .env("CREDENTIALS_DIRECTORY", &creds)
        .output()
        .unwrap();
    let all = text(&out);
    assert_eq!(out.status.code(), Some(0), "{all}");
    assert!(all.contains("# config OK"), "{all}");
    assert!(!all.contains("secret-value"), "{all}");
    // Without the credentials directory the relative secret paths fail, naming the key.
    let out = Command::new(BIN)
        .arg("--config")
        .arg(&config)
        .arg("check-config")
        .env_remove("CREDENTIALS_DIRECTORY")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("_file"),
        "{}",
        text(&out)
    );
}

/// SPEC §11: a secret of the wrong type is named, never quoted; a secret from
/// the environment is taken verbatim (`1e3` stays `1e3`, not 1000).
#[tokio::test(flavor = "multi_thread")]
async fn a_secret_is_never_echoed_and_env_secrets_are_verbatim() {
    let lab = lab(1, 1, "").await;
    std::fs::write(
        lab.config_path(),
        lab.config_text("")
            .replace("[admin]\n", "[admin]\ntoken = 987654321987\n"),
    )
    .unwrap();
    let out = run(&lab, &["check-config"]).await;
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(text(&out).contains("admin.token"), "{}", text(&out));
    assert!(!text(&out).contains("987654321987"), "{}", text(&out));

    std::fs::write(lab.config_path(), lab.config_text("")).unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut cmd = billsync(&lab, &["run"]);
    cmd.env("BILLSYNC__ADMIN__TOKEN", "1e3")
        .env("BILLSYNC__ADMIN__LISTEN", format!("127.0.0.1:{port}"))
        .env("BILLSYNC__DAEMON__SCHEDULE", "0 0 0 1 1 *")
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let mut child = cmd.spawn().unwrap();
    let url = format!("http://127.0.0.1:{port}/approve");
    let client = reqwest::Client::new();
    let mut answer = None;
    let t = Instant::now();
    while answer.is_none() {
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "daemon did not come up"
        );
        answer = client.post(&url).bearer_auth("1e3").send().await.ok();
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(answer.unwrap().status(), 202, "the token is not \"1e3\"");
}

/// SPEC §11: `state_path` may hold `#`, `?`, `%` and spaces; `status` does
/// not upgrade a state file behind a running daemon's back.
#[tokio::test(flavor = "multi_thread")]
async fn odd_state_paths_work_and_status_never_migrates() {
    let lab = lab(2, 2, "").await;
    let path = lab.dir.path().join("data #1 ?x %41").join("state.db");
    let env = ("BILLSYNC__DAEMON__STATE_PATH", path.to_str().unwrap());
    let with_env = |args: &[&str]| {
        let mut c = billsync(&lab, args);
        c.env(env.0, env.1);
        c
    };
    let out = with_env(&["sync"]).output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(path.is_file(), "state not at {}", path.display());
    let out = with_env(&["status"]).output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));

    // An upgrade's new migration, not yet applied by the (old) daemon.
    let db =
        sqlx::SqlitePool::connect_with(sqlx::sqlite::SqliteConnectOptions::new().filename(&path))
            .await
            .unwrap();
    let newest: i64 = sqlx::query_scalar("SELECT MAX(version) FROM _sqlx_migrations")
        .fetch_one(&db)
        .await
        .unwrap();
    sqlx::query("DELETE FROM _sqlx_migrations WHERE version = ?")
        .bind(newest)
        .execute(&db)
        .await
        .unwrap();
    for args in [
        &["status"][..],
        &["explain", "nobody@x.example"],
        &["quarantine", "list"],
    ] {
        let out = with_env(args).output().unwrap();
        assert_eq!(out.status.code(), Some(3), "{args:?}: {}", text(&out));
        assert!(text(&out).contains("older billsync"), "{}", text(&out));
    }
    let after: i64 = sqlx::query_scalar("SELECT MAX(version) FROM _sqlx_migrations")
        .fetch_one(&db)
        .await
        .unwrap();
    assert!(
        after < newest,
        "a read-only command migrated the state file"
    );
}

/// SPEC §10.3: `sync --account SOURCE:ID` (repeatable) re-reads those
/// accounts and pushes their users, without listing.
#[tokio::test(flavor = "multi_thread")]
async fn sync_account_pushes_the_named_accounts_only() {
    let lab = lab(3, 0, "").await;
    let out = run(&lab, &["sync"]).await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    {
        let mut bm = lab.bm.data();
        for a in bm.accounts.iter_mut() {
            a.balance = "-500.00".into(); // nobody pays any more
            a.credit_limits = vec!["0".into()];
        }
    }
    let lists = lab.bm.calls("account");
    let out = run(&lab, &["sync", "--account", "billmanager:1", "--json"]).await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["kind"], "targeted");
    assert_eq!(lab.bm.calls("account"), lists, "it listed");
    let paying = |l: &str| {
        lab.vms
            .user(l)
            .unwrap()
            .permissions
            .contains("archives-show")
    };
    assert!(
        !paying("user1@bm.example.com"),
        "the named account was not pushed"
    );
    assert!(paying("user2@bm.example.com"), "not named, yet touched");
    let out = run(&lab, &["sync", "--account", "billmanager"]).await;
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(text(&out).contains("SOURCE:ID"), "{}", text(&out));
}

/// The README's first command: `billsync sandbox` starts the emulators,
/// syncs them and shows what the VMS received. `--once` exits after that
/// first sync with `sync`'s exit code.
#[test]
fn the_sandbox_syncs_its_emulators_once() {
    let out = std::process::Command::new(BIN)
        .args(["sandbox", "--accounts", "10", "--once"])
        .env_remove("RUST_LOG")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}");
    assert!(stdout.contains("what the VMS received"), "{stdout}");
    assert!(stdout.contains("VMS users now (10)"), "{stdout}");
}

/// Every command the sandbox prints works as printed while it runs: the
/// binary's real path, the sandbox's own config (with the admin address
/// and token file the daemon uses), a dry run beside the running daemon.
#[tokio::test(flavor = "multi_thread")]
async fn every_command_the_sandbox_prints_works_as_printed() {
    use std::io::{BufRead, BufReader};
    let mut sandbox = Command::new(BIN)
        .args(["sandbox", "--accounts", "12"])
        .env_remove("RUST_LOG")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = sandbox.stdout.take().unwrap();
    let lines = tokio::task::spawn_blocking(move || {
        let mut lines = vec![];
        for line in BufReader::new(stdout).lines() {
            let line = line.unwrap();
            let done = line.starts_with("Ctrl-C");
            lines.push(line);
            if done {
                break;
            }
        }
        lines
    });
    let lines = tokio::time::timeout(Duration::from_secs(60), lines)
        .await
        .expect("the sandbox never printed its commands")
        .unwrap();
    let commands: Vec<&str> = lines
        .iter()
        .filter_map(|l| l.strip_prefix("  "))
        .filter(|l| l.starts_with("curl ") || l.starts_with(BIN))
        .collect();
    assert_eq!(commands.len(), 6, "{lines:#?}");
    for c in &commands {
        let line = c.to_string();
        let out = tokio::task::spawn_blocking(move || {
            Command::new("bash").args(["-c", &line]).output().unwrap()
        })
        .await
        .unwrap();
        assert_eq!(out.status.code(), Some(0), "{c}: {}", text(&out));
    }
    let pid = sandbox.id().to_string();
    Command::new("kill").args(["-INT", &pid]).status().unwrap();
    let status = tokio::task::spawn_blocking(move || sandbox.wait().unwrap())
        .await
        .unwrap();
    assert_eq!(status.code(), Some(0));
}

/// `status | head` must not panic when head closes the pipe: billsync ends
/// quietly with 0, as `ls | head` does. The reader here closes its end at
/// once, so every write of billsync meets a closed pipe.
#[tokio::test(flavor = "multi_thread")]
async fn a_closed_pipe_ends_output_quietly() {
    let lab = lab(3, 3, "").await;
    assert_eq!(run(&lab, &["sync"]).await.status.code(), Some(0));
    for args in ["status", "explain user1@bm.example.com", "sync --dry-run"] {
        let line = format!(
            "{BIN} --config {} {args} | {{ exec 0<&-; sleep 1; }}; exit ${{PIPESTATUS[0]}}",
            lab.config_path().display()
        );
        let out = tokio::task::spawn_blocking(move || {
            Command::new("bash").args(["-c", &line]).output().unwrap()
        });
        let out = out.await.unwrap();
        assert_eq!(out.status.code(), Some(0), "{args}: {}", text(&out));
        assert!(!text(&out).contains("panicked"), "{args}: {}", text(&out));
    }
}

/// `explain` names the reason, for an account of each kind: paying, not
/// paying by balance (and so held by a zero safety threshold), suspended,
/// quarantined, in doubt.
#[tokio::test(flavor = "multi_thread")]
async fn explain_names_the_reason_for_each_kind_of_account() {
    // Any deprovision is held, so the two below wait for an approval.
    let safety = "[safety]\nmax_deprovision = 0\nmax_deprovision_ratio = 0.0\n";
    let lab = lab(4, 4, safety).await;
    lab.vms
        .data()
        .force_422
        .insert("user4@bm.example.com".into());
    run(&lab, &["sync"]).await;
    {
        let mut bm = lab.bm.data();
        let a = bm.accounts.iter_mut().find(|a| a.id == 2).unwrap();
        (a.balance, a.credit_limits) = ("-50.00".into(), vec!["0".into()]);
    }
    let suspended = {
        let mut ap = lab.ap.data();
        ap.accounts[0].status = "credit hold".into();
        ap.accounts[0].email.to_lowercase()
    };
    run(&lab, &["resync", "--login", "user3@bm.example.com"]).await;
    lab.vms.faults.once(
        "PATCH user/manage user3@bm.example.com",
        Fault::LoseAnswer(Duration::from_secs(3)),
    );
    let mut second = billsync(&lab, &["sync"]);
    second.env("BILLSYNC__VMS__TIMEOUT_SECS", "1");
    second.env("BILLSYNC__VMS__MAX_ATTEMPTS", "1");
    // Its one request lost its answer: the cycle failed (3), work is left.
    let out = tokio::task::spawn_blocking(move || second.output().unwrap());
    assert_eq!(out.await.unwrap().status.code(), Some(3));
    let cases = [
        ("user1@bm.example.com", "rule       paying: matches"),
        ("user1@bm.example.com", "next       nothing to do"),
        (
            "user2@bm.example.com",
            "no: min_available 0: balance -50.00",
        ),
        ("user2@bm.example.com", "held by the safety threshold"),
        (
            &suspended,
            "the account is suspended: rules apply only to active accounts",
        ),
        (&suspended, "(raw \"credit hold\")"),
        ("user4@bm.example.com", "quarantined since"),
        ("user4@bm.example.com", "quarantine release"),
        ("user3@bm.example.com", "in doubt since"),
    ];
    for (login, reason) in cases {
        let out = run(&lab, &["explain", login]).await;
        let shown = String::from_utf8_lossy(&out.stdout);
        assert!(
            shown.contains(reason),
            "{login}: {reason:?} not in\n{shown}"
        );
    }
}
