use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("start the async runtime");
    runtime.block_on(async {
        let cli = leadsync::cli::Cli::parse();
        leadsync::cli::main(cli).await
    })
}
