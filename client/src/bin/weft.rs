//! The `weft` command line: parse, set up logging on stderr, run, exit.
//! Everything else lives in `weft_client::cli`.

use std::process::ExitCode;

use tracing_subscriber::EnvFilter;

use weft_client::cli;

fn main() -> ExitCode {
    // `weft local` and `weft demo` run nodes in this process; their reaper
    // is this executable (see weft_node::reaper).
    if let Some(code) = weft_node::reaper::run_if_reaper() {
        return code;
    }
    match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime.block_on(run()),
        Err(err) => {
            eprintln!("weft: cannot start the runtime: {err}");
            ExitCode::FAILURE
        }
    }
}

async fn run() -> ExitCode {
    let args = cli::parse();
    // Logs are for diagnosing; results and errors the user needs are
    // printed by the commands. RUST_LOG=info shows the cluster's logs.
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    ExitCode::from(cli::main(args).await)
}
