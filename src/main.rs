use std::process::ExitCode;

use clap::Parser;

#[tokio::main]
async fn main() -> ExitCode {
    let cli = leadsync::cli::Cli::parse();
    leadsync::cli::main(cli).await
}
