//! `weft limit set|list|delete`: the named limits an admin sets (rate
//! limits and concurrency keys' limits).

use clap::Subcommand;
use serde_json::{Value, json};

use weft_client::{Client, LimitInfo};
use weft_proto::policy::{Limit, LimitKind, RateLimit, check_key};

use crate::exit;
use crate::output::{OutputFormat, table};

/// `weft limit ...`.
#[derive(Subcommand, Debug, Clone)]
pub enum LimitCommand {
    /// Set (create or replace) a limit: `weft limit set api 100/s [--burst
    /// N]` (a token bucket, full when set), or `weft limit set user-42
    /// --max-concurrent 2` (a concurrency key's limit). Needs scope admin.
    Set {
        /// The limit's name (a rate limit's, or the concurrency key).
        #[arg(value_parser = parse_name)]
        name: String,
        /// UNITS/PERIOD: 100/s, 10/m, 5/h, 3/500ms.
        #[arg(value_parser = parse_rate, required_unless_present = "max_concurrent", conflicts_with = "max_concurrent")]
        rate: Option<RateLimit>,
        /// Most units the bucket holds, 1 or more (default: the rate's
        /// units).
        #[arg(long, value_name = "N", requires = "rate", value_parser = clap::value_parser!(u32).range(1..))]
        burst: Option<u32>,
        /// Most tasks of the concurrency key NAME assigned or running at once.
        #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
        max_concurrent: Option<u32>,
    },
    /// List the limits: kind, name, setting, available units, running and
    /// waiting tasks.
    List,
    /// Delete a limit. Tasks naming a deleted rate limit wait until it is
    /// set again; a concurrency key without a limit has none.
    Delete {
        /// The limit's name.
        #[arg(value_parser = parse_name)]
        name: String,
        /// Which kind, when a rate limit and a concurrency key share the name.
        #[arg(long, value_parser = ["rate", "concurrency"])]
        kind: Option<String>,
    },
}

fn parse_name(text: &str) -> Result<String, String> {
    check_key("name", text).map_err(|e| e.to_string())?;
    Ok(text.to_owned())
}

fn parse_rate(text: &str) -> Result<RateLimit, String> {
    text.parse()
        .map_err(|e: weft_proto::ConversionError| e.to_string())
}

/// Runs one `weft limit` command.
pub async fn run(
    client: &Client,
    format: OutputFormat,
    command: LimitCommand,
) -> anyhow::Result<u8> {
    match command {
        LimitCommand::Set {
            name,
            rate,
            burst,
            max_concurrent,
        } => {
            let kind = match (rate, max_concurrent) {
                (Some(rate), _) => {
                    let rate = RateLimit::new(rate.units, rate.period, burst.unwrap_or(0))?;
                    LimitKind::Rate(rate)
                }
                (None, Some(max)) => LimitKind::MaxRunning(max),
                (None, None) => anyhow::bail!("give a RATE (e.g. 100/s) or --max-concurrent N"),
            };
            let limit = Limit { name, kind };
            client.set_limit(&limit).await?;
            match format {
                OutputFormat::Text => println!("limit {} set: {}", limit.name, setting(&limit)),
                OutputFormat::Json => println!(
                    "{}",
                    json!({"name": limit.name, "kind": limit.kind.as_str(), "setting": setting(&limit)})
                ),
            }
        }
        LimitCommand::List => {
            let limits = client.limits().await?;
            match format {
                OutputFormat::Text if limits.is_empty() => eprintln!("weft: no limits set"),
                OutputFormat::Text => println!("{}", limits_table(&limits)),
                OutputFormat::Json => {
                    let all: Vec<Value> = limits.iter().map(limit_json).collect();
                    println!("{}", Value::from(all));
                }
            }
        }
        LimitCommand::Delete { name, kind } => {
            client
                .delete_limit(&name, kind.as_deref().unwrap_or(""))
                .await?;
            if format == OutputFormat::Text {
                println!("limit {name} deleted");
            } else {
                println!("{}", json!({"name": name, "deleted": true}));
            }
        }
    }
    Ok(exit::SUCCESS)
}

/// `100/s burst 200` or `max 2 running`.
fn setting(limit: &Limit) -> String {
    match limit.kind {
        LimitKind::Rate(rate) => rate.to_string(),
        LimitKind::MaxRunning(n) => format!("max {n} running"),
    }
}

fn limit_json(info: &LimitInfo) -> Value {
    let mut value = json!({
        "kind": info.limit.kind.as_str(),
        "name": info.limit.name,
        "setting": setting(&info.limit),
        "running": info.running,
        "waiting": info.waiting,
    });
    match info.limit.kind {
        LimitKind::Rate(rate) => {
            value["available"] = json!(info.available);
            value["units"] = json!(rate.units);
            value["period_ms"] = json!(u64::try_from(rate.period.as_millis()).unwrap_or(u64::MAX));
            value["burst"] = json!(rate.burst);
        }
        LimitKind::MaxRunning(n) => value["max_running"] = json!(n),
    }
    value
}

fn limits_table(limits: &[LimitInfo]) -> String {
    let rows: Vec<Vec<String>> = limits
        .iter()
        .map(|info| {
            let rate = matches!(info.limit.kind, LimitKind::Rate(_));
            vec![
                info.limit.kind.as_str().to_owned(),
                info.limit.name.clone(),
                setting(&info.limit),
                if rate {
                    info.available.to_string()
                } else {
                    "-".into()
                },
                if rate {
                    "-".into()
                } else {
                    info.running.to_string()
                },
                info.waiting.to_string(),
            ]
        })
        .collect();
    table(
        &["KIND", "NAME", "SETTING", "AVAILABLE", "RUNNING", "WAITING"],
        &rows,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser, Debug)]
    struct Cli {
        #[command(subcommand)]
        command: LimitCommand,
    }

    #[test]
    fn set_takes_a_rate_or_a_max_and_not_both() {
        let cli = Cli::try_parse_from(["x", "set", "api", "100/s", "--burst", "200"]).unwrap();
        let LimitCommand::Set { rate, burst, .. } = cli.command else {
            panic!()
        };
        assert_eq!((rate.unwrap().units, burst), (100, Some(200)));
        assert!(Cli::try_parse_from(["x", "set", "user-42", "--max-concurrent", "2"]).is_ok());
        assert!(Cli::try_parse_from(["x", "set", "api"]).is_err());
        assert!(
            Cli::try_parse_from(["x", "set", "api", "100/s", "--max-concurrent", "2"]).is_err()
        );
        let err = Cli::try_parse_from(["x", "set", "api", "fast"])
            .unwrap_err()
            .to_string();
        assert!(err.contains("UNITS/PERIOD"), "{err}");
    }

    #[test]
    fn a_zero_burst_is_a_usage_error_not_the_rates_units() {
        let err = Cli::try_parse_from(["x", "set", "api", "100/s", "--burst", "0"]).unwrap_err();
        assert_eq!(err.exit_code(), i32::from(exit::USAGE), "{err}");
        let cli = Cli::try_parse_from(["x", "set", "api", "100/s", "--burst", "1"]).unwrap();
        let LimitCommand::Set { burst, .. } = cli.command else {
            panic!()
        };
        assert_eq!(burst, Some(1));
    }
}
