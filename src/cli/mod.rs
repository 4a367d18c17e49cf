//! The command line (SPEC §4): one file per subcommand. Logs go to stderr,
//! results to stdout.

mod check_config;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::config::{self, Settings};

/// Exit codes of SPEC §4.
pub const EXIT_OK: u8 = 0;
pub const EXIT_UNFINISHED: u8 = 1;
pub const EXIT_CONFIG: u8 = 2;
pub const EXIT_ABORTED: u8 = 3;

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

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Validate the config and print it with secrets masked
    CheckConfig {
        /// Also read the first page of each source and probe the VMS
        #[arg(long)]
        connect: bool,
    },
}

pub fn run(cli: Cli) -> ExitCode {
    let code = match cli.command {
        Command::CheckConfig { connect } => with_settings(cli.config.as_deref(), |s| {
            runtime(check_config::run(s, connect))
        }),
    };
    ExitCode::from(code)
}

/// Loads the config (exit 2 on error), sets up logging, runs `f`.
fn with_settings(path: Option<&std::path::Path>, f: impl FnOnce(Settings) -> u8) -> u8 {
    let path = config::resolve_path(path);
    match config::load(&path, &config::process_env()) {
        Ok((settings, report)) => {
            crate::telemetry::init(settings.log.format, &settings.log.level);
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
