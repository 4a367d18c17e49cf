use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = billsync::cli::Cli::parse();
    billsync::cli::run(cli)
}
