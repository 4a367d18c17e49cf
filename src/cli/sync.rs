//! `sync [--full] [--dry-run] [--allow-deprovision] [--retire-source NAME]
//! [--account SOURCE:ID] [--json]`: one cycle.

use billsync::config::Settings;
use billsync::core::cycle::CycleResult;
use billsync::core::model::{AccountKey, SourceKind};
use billsync::engine::{CycleOptions, CycleReport, Engine, Targets};
use billsync::store::{StateLock, Store};

pub async fn run(settings: Settings, args: super::SyncArgs) -> u8 {
    match cycle(settings, args).await {
        Ok(code) | Err(code) => code,
    }
}

async fn cycle(settings: Settings, args: super::SyncArgs) -> Result<u8, u8> {
    let retire = match retired(&settings, &args.retire_source) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("billsync: {e}");
            return Err(super::EXIT_CONFIG);
        }
    };
    let targets = match targets(&args.account) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("billsync: {e}");
            return Err(super::EXIT_CONFIG);
        }
    };
    let (engine, _held) = match args.dry_run {
        true => preview_engine(settings).await,
        false => locked_engine(settings).await,
    }?;
    let bar = super::progress::terminal();
    let opts = CycleOptions {
        full: args.full,
        dry_run: args.dry_run,
        allow_deprovision: args.allow_deprovision,
        retire,
        progress: bar.as_ref().map(|(p, _)| p.clone()),
        stop: None,
        targets,
        payments: false,
    };
    let result = engine.run_cycle(&opts).await;
    if let Some((_, bar)) = bar {
        bar.finish_and_clear();
    }
    // The renewals end first, so none re-extends the lease after it is
    // given up.
    if let Held::Lease(node, stop, keeper) = _held {
        let _ = stop.send(true);
        let _ = keeper.await;
        node.release().await;
    }
    engine.store.close().await;
    let report = match result {
        Ok(r) => r,
        Err(e) => {
            eprintln!("billsync: cycle aborted: {e}");
            return Err(super::EXIT_ABORTED);
        }
    };
    if args.json {
        match serde_json::to_string(&report) {
            Ok(s) => outln!("{s}"),
            Err(e) => eprintln!("billsync: {e}"),
        }
    } else {
        print_human(&report);
    }
    Ok(exit_code(&report))
}

/// A real cycle: the state store's one writer.
async fn locked_engine(settings: Settings) -> Result<(Engine, Held), u8> {
    if let Some(url) = settings.daemon.state_url.expose() {
        return leading_engine(url.to_string(), settings).await;
    }
    let lock = StateLock::try_acquire(&settings.daemon.state_path).map_err(|e| {
        eprintln!("billsync: {e}");
        super::EXIT_ABORTED
    })?;
    let engine = Engine::new(settings).await.map_err(|e| {
        eprintln!("billsync: {e}");
        super::EXIT_ABORTED
    })?;
    Ok((engine, Held::Lock(lock)))
}

/// On PostgreSQL `sync` leads for its run, renewing the lease, or exits
/// 3 naming the node that leads (SPEC §13).
async fn leading_engine(url: String, settings: Settings) -> Result<(Engine, Held), u8> {
    let fail = |e: &dyn std::fmt::Display| {
        eprintln!("billsync: {e}");
        super::EXIT_ABORTED
    };
    let d = &settings.daemon;
    let name = billsync::lease::node_name(&d.node_name);
    let lease = std::time::Duration::from_secs(d.lease_secs);
    let vms_timeout = std::time::Duration::from_secs(settings.vms.timeout_secs);
    let opened = billsync::lease::open_shared(&url, &name, lease, vms_timeout).await;
    let (store, node, first) = opened.map_err(|e| fail(&e))?;
    if let billsync::lease::Change::Unreachable(e) = &first {
        return Err(fail(&format!("the shared state store: {e}")));
    }
    if node.leading().is_none() {
        let leader = node
            .seen()
            .map(|r| format!("{} (epoch {})", r.holder, r.epoch));
        let leader = leader.unwrap_or_else(|| "another node".into());
        let why = format!("{leader} leads the shared state store; not syncing");
        return Err(fail(&why));
    }
    let mut engine = match Engine::with_store(settings, store) {
        Ok(engine) => engine,
        Err(e) => {
            node.release().await;
            return Err(fail(&e));
        }
    };
    engine.set_gate(node.clone());
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let keeper = tokio::spawn(node.clone().keep(stopped));
    Ok((engine, Held::Lease(node, stop, keeper)))
}

/// What a cycle's engine needs kept until it ends.
enum Held {
    Lock(#[allow(dead_code)] StateLock),
    /// The leader lease, renewed by the task until the sender says stop.
    Lease(
        std::sync::Arc<billsync::lease::Node>,
        tokio::sync::watch::Sender<bool>,
        tokio::task::JoinHandle<()>,
    ),
    Scratch(#[allow(dead_code)] tempfile::TempDir),
    Nothing,
}

/// A dry run takes no lock and writes nothing: it reads the live state file
/// (beside a running daemon too) and plans on a snapshot of it, so it can
/// preview another config against the state the daemon keeps.
async fn preview_engine(settings: Settings) -> Result<(Engine, Held), u8> {
    if let Some(url) = settings.daemon.state_url.expose() {
        return preview_on_postgres(url.to_string(), settings).await;
    }
    let state = settings.daemon.state_path.clone();
    if let Some(pid) = billsync::store::lock_holder(&state) {
        eprintln!(
            "billsync: billsync pid {pid} holds {}; planning on a snapshot of it",
            state.display()
        );
    }
    let fail = |e: &dyn std::fmt::Display| {
        eprintln!("billsync: {e}");
        super::EXIT_ABORTED
    };
    let (store, held) = match Store::open_read_only(&state).await.map_err(|e| fail(&e))? {
        Some(store) => (store, Held::Nothing),
        // Nothing ran yet: plan against an empty state.
        None => {
            let dir = tempfile::tempdir().map_err(|e| fail(&e))?;
            let store = Store::open(&dir.path().join("empty.db")).await;
            (store.map_err(|e| fail(&e))?, Held::Scratch(dir))
        }
    };
    let engine = Engine::with_store(settings, store).map_err(|e| fail(&e))?;
    Ok((engine, held))
}

/// On PostgreSQL a dry run needs no lease: it reads the shared store in
/// sessions the database keeps read-only, and plans on a SQLite snapshot.
async fn preview_on_postgres(url: String, settings: Settings) -> Result<(Engine, Held), u8> {
    let fail = |e: &dyn std::fmt::Display| {
        eprintln!("billsync: {e}");
        super::EXIT_ABORTED
    };
    let bound = billsync::store::pg_bound(settings.daemon.lease_secs);
    let store = Store::open_postgres_read_only(&url, bound)
        .await
        .map_err(|e| fail(&e))?;
    let engine = Engine::with_store(settings, store).map_err(|e| fail(&e))?;
    Ok((engine, Held::Nothing))
}

/// `--retire-source` names: known sources that are not enabled.
fn retired(settings: &Settings, names: &[String]) -> Result<Vec<SourceKind>, String> {
    names
        .iter()
        .map(|name| {
            let kind = SourceKind::parse(name).ok_or_else(|| {
                format!("--retire-source {name}: unknown source (billmanager or activeplatform)")
            })?;
            match settings.source(kind) {
                Some(_) => Err(format!(
                    "--retire-source {name}: the source is enabled; set enabled = false \
                     (or remove its section) first"
                )),
                None => Ok(kind),
            }
        })
        .collect()
}

/// SPEC §4: 0 done, 1 work left, 3 aborted; a dry run that ran is 0.
pub fn exit_code(r: &CycleReport) -> u8 {
    match r.result {
        CycleResult::Failed => super::EXIT_ABORTED,
        _ if r.dry_run => super::EXIT_OK,
        CycleResult::Ok => super::EXIT_OK,
        CycleResult::Partial | CycleResult::Held => super::EXIT_UNFINISHED,
    }
}

pub fn print_human(r: &CycleReport) {
    let took = (r.finished_at - r.started_at).num_milliseconds() as f64 / 1000.0;
    outln!(
        "{} cycle{}: {} in {took:.1}s",
        r.kind,
        if r.dry_run { " (dry run)" } else { "" },
        r.result
    );
    for (name, s) in &r.sources {
        match &s.error {
            None => outln!("  {name}: {} accounts", s.accounts),
            Some(e) => outln!("  {name}: INCOMPLETE: {e}"),
        }
    }
    let o = &r.operations;
    let cameras = match o.cameras {
        0 => String::new(),
        n => format!(", {n} camera set"),
    };
    outln!(
        "  planned: {} create, {} update, {} delete, {} tree create, {} tree rename, {} write-back{cameras}",
        o.create,
        o.update,
        o.delete,
        o.tree_create,
        o.tree_update,
        o.writeback
    );
    if !r.dry_run {
        outln!(
            "  applied {}, pending {}, quarantined {}, held {}",
            r.applied,
            r.pending,
            r.quarantined,
            r.held
        );
    }
    if r.invalid > 0 || r.conflicts > 0 {
        outln!(
            "  {} invalid records and {} login conflicts (see `billsync status`)",
            r.invalid,
            r.conflicts
        );
    }
    if r.held > 0 {
        outln!("  deprovisions HELD by the safety threshold: review, then `billsync approve`");
    }
    for p in &r.plan {
        outln!(
            "  {:<12} {:<40} {}",
            p.action,
            p.login,
            p.changes.join(", ")
        );
    }
}

/// `--account SOURCE:ID`s as a targeted cycle's accounts (none: a listing
/// cycle).
fn targets(accounts: &[String]) -> Result<Option<Targets>, String> {
    if accounts.is_empty() {
        return Ok(None);
    }
    let keys = accounts.iter().map(|a| {
        AccountKey::parse(a)
            .ok_or_else(|| format!("--account {a:?}: expected SOURCE:ID, e.g. billmanager:42"))
    });
    Ok(Some(Targets {
        accounts: keys.collect::<Result<_, _>>()?,
        logins: Default::default(),
    }))
}
