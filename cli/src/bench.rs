//! `weft bench`: runs [`weft_bench::run`] (interruptible by Ctrl-C, which
//! drops and so kills the bench's cluster), prints the report as the table
//! or `--output json`, appends the results.jsonl lines if asked, and
//! answers exit 1 if a step failed. Measuring is `weft_bench`'s job.

use anyhow::{Context, bail};

use weft_bench::BenchArgs;

use crate::exit;
use crate::output::OutputFormat;

/// `weft bench`. `external` is the `--coordinator` URL when the user gave
/// one, `token` the client token for it (its own cluster's admin token
/// otherwise).
pub async fn run(
    args: BenchArgs,
    external: Option<String>,
    token: Option<String>,
    format: OutputFormat,
) -> anyhow::Result<u8> {
    let report = tokio::select! {
        report = weft_bench::run(&args, external, token) => report?,
        _ = tokio::signal::ctrl_c() => bail!("interrupted; the cluster was stopped"),
    };
    match format {
        OutputFormat::Text => println!("{}", report.table()),
        OutputFormat::Json => println!("{:#}", report.json()),
    }
    if let Some(path) = &args.results_jsonl {
        report
            .append_jsonl(path)
            .with_context(|| format!("appending to {}", path.display()))?;
        eprintln!("weft bench: appended results to {}", path.display());
    }
    Ok(if report.errors.is_empty() {
        exit::SUCCESS
    } else {
        exit::FAILURE
    })
}
