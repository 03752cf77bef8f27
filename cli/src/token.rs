//! Client tokens on the command line: where the token comes from
//! (`--token` > `--token-file` > `$WEFT_TOKEN` > the `weft login` context),
//! the per-user context file, and `weft token create|list|revoke`, `weft
//! login`.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use anyhow::Context as _;
use serde_json::{Value, json};

use weft_client::Client;
use weft_proto::pb;

use crate::args::{TokenCommand, TokenRole};
use crate::exit;
use crate::output::{OutputFormat, table};

/// The environment variable holding a client token.
pub const TOKEN_ENV: &str = "WEFT_TOKEN";

/// What `weft login` saved: coordinator, token, and (for TLS) CA file or pin.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Context {
    /// Coordinator address.
    pub coordinator: Option<String>,
    /// Client token.
    pub token: Option<String>,
    /// PEM file of the cluster CA.
    pub ca_file: Option<String>,
    /// `sha256:HEX` pin of the cluster CA.
    pub ca_pin: Option<String>,
}

/// `$XDG_CONFIG_HOME/weft/context.json`, else `~/.config/weft/context.json`.
pub fn context_path() -> Option<PathBuf> {
    let base = std::env::var_os("XDG_CONFIG_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| {
            std::env::var_os("HOME")
                .filter(|v| !v.is_empty())
                .map(|home| PathBuf::from(home).join(".config"))
        })?;
    Some(base.join("weft").join("context.json"))
}

impl Context {
    /// The saved CA file or pin, as a trust (a pin that does not parse is
    /// ignored).
    pub fn trust(&self) -> Option<weft_client::Trust> {
        match (&self.ca_file, &self.ca_pin) {
            (Some(file), _) => Some(weft_client::Trust::CaFile(file.into())),
            (None, Some(pin)) => weft_client::Trust::pin(pin).ok(),
            (None, None) => None,
        }
    }

    /// The context as it applies to a command dialing `url`: all of it
    /// when `url` is the saved coordinator (compared as parsed addresses),
    /// else without the token and CA (they are for that coordinator only).
    pub fn for_coordinator(self, url: &str) -> Context {
        // A list of coordinators is the same context only as the same list.
        let same = |a: &str, b: &str| match (
            weft_proto::CoordinatorAddr::parse_list(a),
            weft_proto::CoordinatorAddr::parse_list(b),
        ) {
            (Ok(a), Ok(b)) => a == b,
            _ => a == b,
        };
        match &self.coordinator {
            Some(saved) if same(saved, url) => self,
            _ => Context {
                coordinator: self.coordinator,
                ..Context::default()
            },
        }
    }

    /// The saved context; empty when there is none (or it is unreadable).
    pub fn load() -> Context {
        let Some(path) = context_path() else {
            return Context::default();
        };
        let Ok(text) = std::fs::read_to_string(&path) else {
            return Context::default();
        };
        let Ok(value) = serde_json::from_str::<Value>(&text) else {
            eprintln!("weft: warning: ignoring {}: not valid JSON", path.display());
            return Context::default();
        };
        let field = |name: &str| value.get(name).and_then(Value::as_str).map(str::to_owned);
        Context {
            coordinator: field("coordinator"),
            token: field("token"),
            ca_file: field("ca_file"),
            ca_pin: field("ca_pin"),
        }
    }

    /// Writes the context to `path` (0600; its directory 0700).
    pub fn save(&self, path: &Path) -> anyhow::Result<()> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
            #[cfg(unix)]
            {
                use std::os::unix::fs::PermissionsExt;
                let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700));
            }
        }
        let text = serde_json::to_string_pretty(&json!({
            "coordinator": self.coordinator,
            "token": self.token,
            "ca_file": self.ca_file,
            "ca_pin": self.ca_pin,
        }))?;
        let tmp = path.with_extension("json.tmp");
        let _ = std::fs::remove_file(&tmp);
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create_new(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            options.mode(0o600);
        }
        let mut file = options
            .open(&tmp)
            .with_context(|| format!("writing {}", tmp.display()))?;
        std::io::Write::write_all(&mut file, text.as_bytes())?;
        file.sync_all()?;
        std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))?;
        Ok(())
    }
}

/// Reads a token file (surrounding whitespace dropped).
pub fn read_token_file(path: &Path) -> anyhow::Result<String> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading token file {}", path.display()))?;
    let token = text.trim().to_owned();
    if token.is_empty() {
        return Err(exit::UsageError(format!("token file {} is empty", path.display())).into());
    }
    Ok(token)
}

/// The token a command uses: `--token`, else `--token-file`, else
/// `$WEFT_TOKEN`, else the context's.
pub fn resolve(
    flag: Option<&str>,
    file: Option<&Path>,
    context: &Context,
) -> anyhow::Result<Option<String>> {
    if let Some(token) = flag.map(str::trim).filter(|t| !t.is_empty()) {
        return Ok(Some(token.to_owned()));
    }
    if let Some(file) = file {
        return read_token_file(file).map(Some);
    }
    if let Some(token) = std::env::var(TOKEN_ENV)
        .ok()
        .map(|t| t.trim().to_owned())
        .filter(|t| !t.is_empty())
    {
        return Ok(Some(token));
    }
    Ok(context.token.clone())
}

fn when(t: Option<&prost_types::Timestamp>) -> String {
    match t {
        None => "-".to_owned(),
        Some(t) => {
            let at = weft_proto::convert::system_time(t);
            weft_proto::convert::rfc3339(at, false)
        }
    }
}

fn token_json(info: &pb::TokenInfo) -> Value {
    json!({
        "id": info.id,
        "name": info.name,
        "role": info.role,
        "scopes": info.scopes,
        "uses": info.uses,
        "used": info.used,
        "created": when(info.created.as_ref()),
        "expires": info.expires.as_ref().map(|t| when(Some(t))),
        "revoked": info.revoked.as_ref().map(|t| when(Some(t))),
    })
}

fn status(info: &pb::TokenInfo) -> &'static str {
    let now = SystemTime::now();
    if info.revoked.is_some() {
        "revoked"
    } else if info
        .expires
        .as_ref()
        .is_some_and(|t| weft_proto::convert::system_time(t) <= now)
    {
        "expired"
    } else if info.role == "node" && info.uses > 0 && info.used >= info.uses {
        "used up"
    } else {
        "active"
    }
}

/// `weft token create|list|revoke`.
pub async fn run(
    client: &Client,
    format: OutputFormat,
    command: TokenCommand,
) -> anyhow::Result<u8> {
    match command {
        TokenCommand::Create {
            role: TokenRole::Client,
            scopes,
            name,
            ttl,
            uses,
            address,
        } => {
            if uses.is_some() || address.is_some() {
                return Err(exit::UsageError(
                    "--uses and --address are for join tokens: add --role node".into(),
                )
                .into());
            }
            if scopes.is_empty() {
                return Err(exit::UsageError(
                    "a client token needs --scope (read, submit, cancel, admin); for a node join token pass --role node".into(),
                )
                .into());
            }
            create(client, format, scopes, &name, ttl).await
        }
        TokenCommand::Create {
            role: TokenRole::Node,
            scopes,
            name,
            ttl,
            uses,
            address,
        } => {
            if !scopes.is_empty() {
                return Err(exit::UsageError(
                    "a join token (--role node) has no scopes: drop --scope".into(),
                )
                .into());
            }
            let ttl = ttl.unwrap_or(DEFAULT_JOIN_TTL);
            create_join(client, format, &name, ttl, uses.unwrap_or(1), address).await
        }
        TokenCommand::List => list(client, format).await,
        TokenCommand::Revoke { id } => {
            let info = client
                .revoke_token(&id)
                .await
                .with_context(|| format!("revoking token {id}"))?;
            match format {
                OutputFormat::Text => println!("token {} revoked", info.id),
                OutputFormat::Json => println!("{}", token_json(&info)),
            }
            Ok(exit::SUCCESS)
        }
    }
}

async fn create(
    client: &Client,
    format: OutputFormat,
    scopes: Vec<String>,
    name: &str,
    ttl: Option<Duration>,
) -> anyhow::Result<u8> {
    let (token, info) = client
        .create_token(scopes, name, ttl)
        .await
        .context("creating a token")?;
    match format {
        // The token alone on stdout, so `$(weft token create ...)` works.
        OutputFormat::Text => {
            println!("{token}");
            eprintln!(
                "weft: token {} ({}) created; it is shown only this once",
                info.id,
                info.scopes.join(",")
            );
        }
        OutputFormat::Json => {
            let mut value = token_json(&info);
            value["token"] = Value::from(token);
            println!("{value}");
        }
    }
    Ok(exit::SUCCESS)
}

/// How long a join token lives unless `--ttl` says otherwise.
pub const DEFAULT_JOIN_TTL: Duration = Duration::from_secs(60 * 60);

async fn create_join(
    client: &Client,
    format: OutputFormat,
    name: &str,
    ttl: Duration,
    uses: u32,
    address: Option<String>,
) -> anyhow::Result<u8> {
    let (token, info) = client
        .create_join_token(name, Some(ttl), uses, address.as_deref().unwrap_or(""))
        .await
        .context("creating a join token")?;
    match format {
        OutputFormat::Text => {
            println!("{token}");
            let joins = match uses {
                0 => "any number of nodes".to_owned(),
                1 => "one node".to_owned(),
                n => format!("{n} nodes"),
            };
            let address = weft_proto::JoinToken::parse(&token)
                .map(|t| t.address)
                .unwrap_or_default();
            eprintln!(
                "weft: join token {} created for {joins}, valid {}, naming {address}; shown only this once. On each machine: weft-node --join TOKEN",
                info.id,
                humantime::format_duration(ttl),
            );
        }
        OutputFormat::Json => {
            let mut value = token_json(&info);
            value["token"] = Value::from(token);
            println!("{value}");
        }
    }
    Ok(exit::SUCCESS)
}

async fn list(client: &Client, format: OutputFormat) -> anyhow::Result<u8> {
    let tokens = client.list_tokens().await?;
    match format {
        OutputFormat::Text => {
            let rows: Vec<Vec<String>> = tokens
                .iter()
                .map(|t| {
                    vec![
                        t.id.clone(),
                        if t.name.is_empty() {
                            "-".into()
                        } else {
                            t.name.clone()
                        },
                        t.role.clone(),
                        match t.role.as_str() {
                            "node" => match t.uses {
                                0 => format!("joins: {}", t.used),
                                n => format!("joins: {}/{n}", t.used),
                            },
                            _ => t.scopes.join(","),
                        },
                        status(t).to_owned(),
                        when(t.created.as_ref()),
                        when(t.expires.as_ref()),
                    ]
                })
                .collect();
            println!(
                "{}",
                table(
                    &[
                        "ID", "NAME", "ROLE", "SCOPES", "STATUS", "CREATED", "EXPIRES"
                    ],
                    &rows
                )
            );
        }
        OutputFormat::Json => {
            let all: Vec<Value> = tokens.iter().map(token_json).collect();
            println!("{}", Value::from(all));
        }
    }
    Ok(exit::SUCCESS)
}

/// `weft login URL --token T [--ca-file F | --ca-pin sha256:..]`: checks
/// the token against the coordinator (`ClusterInfo`: a token it knows
/// passes, whatever its scopes), then saves the context.
pub async fn login(
    url: String,
    token: Option<String>,
    trust: Option<weft_client::Trust>,
) -> anyhow::Result<u8> {
    let Some(token) = token else {
        return Err(exit::UsageError(
            "weft login needs a token: --token T (or --token-file F, or $WEFT_TOKEN)".into(),
        )
        .into());
    };
    let client = Client::connect_secure(&url, trust.as_ref(), Some(&token)).await?;
    match client.cluster_info().await {
        // PERMISSION_DENIED: the coordinator knows the token, which only
        // lacks the `read` scope (a submit-only token): valid to save.
        Ok(_)
        | Err(weft_client::Error::Other {
            code: tonic::Code::PermissionDenied,
            ..
        }) => {}
        Err(err) => {
            return Err(
                anyhow::Error::new(err).context(format!("checking the token against {url}"))
            );
        }
    }
    let path = context_path()
        .ok_or_else(|| anyhow::anyhow!("no place for the context: set XDG_CONFIG_HOME or HOME"))?;
    let ca_pin = trust.as_ref().and_then(weft_client::Trust::pin_text);
    let ca_file = match trust {
        Some(weft_client::Trust::CaFile(f)) => {
            Some(std::path::absolute(&f).unwrap_or(f).display().to_string())
        }
        _ => None,
    };
    Context {
        coordinator: Some(url.clone()),
        token: Some(token),
        ca_file,
        ca_pin,
    }
    .save(&path)?;
    eprintln!(
        "weft: logged in to {url}; saved to {} (later commands use it when given no --coordinator/--token nor WEFT_COORDINATOR/WEFT_TOKEN)",
        path.display()
    );
    Ok(exit::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_expiry_past_the_year_9999_is_shown_not_a_panic() {
        let far = prost_types::Timestamp {
            seconds: 300_000_000_000,
            nanos: 0,
        };
        assert_eq!(when(Some(&far)), "300000000000s after the Unix epoch");
        let epoch = prost_types::Timestamp::default();
        assert_eq!(when(Some(&epoch)), "1970-01-01T00:00:00Z");
    }

    #[test]
    fn flag_wins_over_file_and_context() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("t");
        std::fs::write(&file, "weft_file\n").unwrap();
        let context = Context {
            token: Some("weft_ctx".into()),
            ..Context::default()
        };
        assert_eq!(
            resolve(Some("weft_flag"), Some(&file), &context).unwrap(),
            Some("weft_flag".into())
        );
        assert_eq!(
            resolve(None, Some(&file), &context).unwrap(),
            Some("weft_file".into())
        );
    }

    #[test]
    fn context_round_trips_with_mode_0600() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("weft").join("context.json");
        let context = Context {
            coordinator: Some("127.0.0.1:7070".into()),
            token: Some("weft_x".into()),
            ca_file: None,
            ca_pin: Some("sha256:00".into()),
        };
        context.save(&path).unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.contains("weft_x"));
    }
}
