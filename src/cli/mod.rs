//! The command line (SPEC §4): one file per subcommand. Logs go to stderr,
//! results to stdout.

/// `println!` that ends the process quietly (exit 0) once stdout is closed,
/// as `ls | head` does: `billsync status | head -1` must not panic.
macro_rules! outln {
    () => {
        $crate::cli::write_line(format_args!(""))
    };
    ($($arg:tt)*) => {
        $crate::cli::write_line(format_args!($($arg)*))
    };
}

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
    #[arg(long, value_name = "PATH")]
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
        /// Also ask the VMS which cameras the user sees (read-only)
        #[arg(long)]
        vms: bool,
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
    Sandbox(SandboxArgs),
}

#[derive(Debug, clap::Args)]
pub struct SandboxArgs {
    /// Generated accounts (split between the two billing systems)
    #[arg(long, default_value_t = 50)]
    pub accounts: usize,
    /// Exit after the first full sync instead of running until Ctrl-C
    #[arg(long)]
    pub once: bool,
    /// Keep the sandbox's files (config, state, admin token) in a new
    /// directory under DIR instead of deleting them on exit
    #[arg(long, value_name = "DIR")]
    pub keep: Option<PathBuf>,
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
        Command::Explain { target, json, vms } => with_settings(path.as_deref(), |s| {
            runtime(explain::run(s, target, json, vms))
        }),
        Command::Quarantine { action } => {
            with_settings(path.as_deref(), |s| runtime(quarantine::run(s, action)))
        }
        Command::CheckConfig { connect } => {
            with_settings(path.as_deref(), |s| runtime(check_config::run(s, connect)))
        }
        Command::Sandbox(args) if path.is_none() => {
            billsync::telemetry::init(billsync::config::LogFormat::Pretty, "warn");
            runtime(sandbox::run(args))
        }
        Command::Sandbox(_) => {
            eprintln!("billsync: sandbox writes its own config; --config is not used");
            EXIT_CONFIG
        }
    };
    ExitCode::from(code)
}

/// Loads the config (exit 2 on error), sets up logging, runs `f`.
fn with_settings(path: Option<&std::path::Path>, f: impl FnOnce(Settings) -> u8) -> u8 {
    match config::load_resolved(config::resolve_path(path), &config::process_env()) {
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
    let d = &settings.daemon;
    billsync::store::Store::open_configured_current(
        d.state_url.expose(),
        &d.state_path,
        d.lease_secs,
    )
    .await
    .map_err(|e| {
        eprintln!("billsync: {e}");
        EXIT_ABORTED
    })
}

/// One line to stdout; a closed pipe ends the process quietly.
pub fn write_line(args: std::fmt::Arguments<'_>) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    if let Err(e) = out.write_fmt(args).and_then(|()| out.write_all(b"\n")) {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(i32::from(EXIT_OK));
        }
        eprintln!("billsync: cannot write to stdout: {e}");
        std::process::exit(i32::from(EXIT_ABORTED));
    }
}

fn print_json(v: &impl serde::Serialize) {
    match serde_json::to_string_pretty(v) {
        Ok(s) => outln!("{s}"),
        Err(e) => eprintln!("billsync: cannot render JSON: {e}"),
    }
}
