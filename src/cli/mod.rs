//! The command line (SPEC §4): one file per subcommand. Logs go to stderr,
//! results to stdout.

mod check_config;
mod explain;
mod progress;
mod quarantine;
mod requests;
mod sandbox;
mod status;
mod sync;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use billsync::config::{self, Settings};

/// Exit codes of SPEC §4.
pub const EXIT_OK: u8 = 0;
pub const EXIT_UNFINISHED: u8 = 1;
pub const EXIT_CONFIG: u8 = 2;
pub const EXIT_ABORTED: u8 = 3;

/// `run`: 0 after a signal, 3 when the daemon could not start (SPEC §4).
async fn run_daemon(settings: billsync::config::Settings, resync: bool) -> u8 {
    match billsync::daemon::run(settings, resync).await {
        Ok(()) => EXIT_OK,
        Err(e) => {
            eprintln!("billsync: {e}");
            EXIT_ABORTED
        }
    }
}

#[derive(Debug, Parser)]
#[command(
    name = "billsync",
    version,
    about = "Keeps AIPIX VMS users in step with BILLmanager and ActivePlatform accounts"
)]
pub struct Cli {
    /// Config file (default: $BILLSYNC_CONFIG, else /etc/billsync/billsync.toml)
    #[arg(long, global = true, value_name = "PATH")]
    pub config: Option<PathBuf>,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, clap::Args)]
pub struct SyncArgs {
    /// Full resync: re-read every account and push every user in full
    #[arg(long)]
    pub full: bool,
    /// Print the plan and change nothing anywhere
    #[arg(long)]
    pub dry_run: bool,
    /// Let this cycle's deprovisions through whatever their number
    #[arg(long)]
    pub allow_deprovision: bool,
    /// Print the cycle summary as one JSON object
    #[arg(long)]
    pub json: bool,
    /// Deprovision the users of a disabled or removed source (repeatable;
    /// the safety threshold and approval apply)
    #[arg(long = "retire-source", value_name = "NAME")]
    pub retire_source: Vec<String>,
    /// Re-read this account and push its user now, without listing
    /// (repeatable; nothing is deprovisioned)
    #[arg(long = "account", value_name = "SOURCE:ID")]
    pub account: Vec<String>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run as a daemon: scheduled cycles, admin HTTP, systemd notify
    Run {
        /// Start with a full resync
        #[arg(long)]
        resync: bool,
    },
    /// Run one sync cycle and exit (0 done, 1 work left, 2 config, 3 aborted)
    Sync(SyncArgs),
    /// Ask for a full resync (or of some logins) at the next cycle
    Resync {
        /// Only these logins (repeatable)
        #[arg(long = "login", value_name = "LOGIN")]
        logins: Vec<String>,
    },
    /// Approve the held deprovisions, once, at the next cycle
    Approve,
    /// Last cycles, pending, quarantined, held and conflicting logins, invalid records
    Status {
        #[arg(long)]
        json: bool,
    },
    /// Trace one account: source records, normalized account, rules, desired and applied state, operations
    Explain {
        /// A login, or SOURCE:ID (e.g. billmanager:42)
        target: String,
        #[arg(long)]
        json: bool,
    },
    /// List or release quarantined logins
    Quarantine {
        #[command(subcommand)]
        action: QuarantineAction,
    },
    /// Validate the config and print it with secrets masked
    CheckConfig {
        /// Also read the first page of each source and probe the VMS
        #[arg(long)]
        connect: bool,
    },
    /// Emulators of all three systems on loopback, one full sync, and what was pushed
    Sandbox {
        /// Generated accounts (split between the two billing systems)
        #[arg(long, default_value_t = 50)]
        accounts: usize,
        /// Exit after the first full sync instead of running until Ctrl-C
        #[arg(long)]
        once: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum QuarantineAction {
    List {
        #[arg(long)]
        json: bool,
    },
    Release {
        /// Logins to release
        #[arg(required_unless_present = "all", conflicts_with = "all")]
        logins: Vec<String>,
        /// Release every quarantined login
        #[arg(long)]
        all: bool,
    },
}

pub fn run(cli: Cli) -> ExitCode {
    let path = cli.config.clone();
    let code = match cli.command {
        Command::Run { resync } => {
            with_settings(path.as_deref(), |s| runtime(run_daemon(s, resync)))
        }
        Command::Sync(args) => with_settings(path.as_deref(), |s| runtime(sync::run(s, args))),
        Command::Resync { logins } => {
            with_settings(path.as_deref(), |s| runtime(requests::resync(s, logins)))
        }
        Command::Approve => with_settings(path.as_deref(), |s| runtime(requests::approve(s))),
        Command::Status { json } => {
            with_settings(path.as_deref(), |s| runtime(status::run(s, json)))
        }
        Command::Explain { target, json } => {
            with_settings(path.as_deref(), |s| runtime(explain::run(s, target, json)))
        }
        Command::Quarantine { action } => {
            with_settings(path.as_deref(), |s| runtime(quarantine::run(s, action)))
        }
        Command::CheckConfig { connect } => {
            with_settings(path.as_deref(), |s| runtime(check_config::run(s, connect)))
        }
        Command::Sandbox { accounts, once } => {
            billsync::telemetry::init(billsync::config::LogFormat::Pretty, "warn");
            runtime(sandbox::run(accounts, once))
        }
    };
    ExitCode::from(code)
}

/// Loads the config (exit 2 on error), sets up logging, runs `f`.
fn with_settings(path: Option<&std::path::Path>, f: impl FnOnce(Settings) -> u8) -> u8 {
    let path = config::resolve_path(path);
    match config::load(&path, &config::process_env()) {
        Ok((settings, report)) => {
            billsync::telemetry::init(settings.log.format, &settings.log.level);
            for w in &report.warnings {
                tracing::warn!("{w}");
            }
            f(settings)
        }
        Err(e) => {
            eprintln!("billsync: {e}");
            EXIT_CONFIG
        }
    }
}

fn runtime(fut: impl std::future::Future<Output = u8>) -> u8 {
    match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt.block_on(fut),
        Err(e) => {
            eprintln!("billsync: cannot start the runtime: {e}");
            EXIT_ABORTED
        }
    }
}

/// Opens the state store for the commands that only read it or file a
/// request (no lock: SQLite serializes them with the running daemon). They
/// never migrate: a daemon of another version may be using the file.
async fn open_store(settings: &Settings) -> Result<billsync::store::Store, u8> {
    billsync::store::Store::open_current(&settings.daemon.state_path)
        .await
        .map_err(|e| {
            eprintln!("billsync: {e}");
            EXIT_ABORTED
        })
}

fn print_json(v: &impl serde::Serialize) {
    match serde_json::to_string_pretty(v) {
        Ok(s) => println!("{s}"),
        Err(e) => eprintln!("billsync: cannot render JSON: {e}"),
    }
}
