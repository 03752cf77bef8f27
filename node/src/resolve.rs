//! Which identity a node starts with, decided once at start from its
//! config and what its state dir holds, and the coordinator and trust
//! that follow from it:
//!
//! 1. an identity in the state dir (not expired): use it. The coordinators
//!    are `node.conf`'s unless configured (configured ones replace them), the trust the state dir's
//!    `ca.pem` unless configured; a join token given as well is not
//!    needed (logged, ignored); a configured name other than the one it
//!    joined with is refused.
//! 2. else a join token: join first (`join.rs`), at the token's address
//!    unless coordinators are configured (then at those, in order), trusting the token's pin unless configured.
//! 3. else no identity: connect as configured, as nodes always did (a
//!    coordinator started with `--insecure` or `--no-auth`).
//!
//! An expired identity without a token is refused (the node must join
//! again); with one, the node joins again.
//!
//! [`resolve`] is plain code (tested without disk); [`plan`] reads the
//! state dir first.

use std::time::SystemTime;

use tracing::{info, warn};

use weft_proto::address::Scheme;
use weft_proto::tls::Trust;
use weft_proto::{CoordinatorAddr, JoinToken};

use crate::config::{DEFAULT_COORDINATOR, NodeConfig};
use crate::error::Error;
use crate::identity::{StateDir, Stored, Validity};

/// What the node does before its first session.
#[derive(Debug)]
pub(crate) enum Plan {
    /// Connect with the identity kept in the state dir.
    Stored(Stored, Validity),
    /// Join with this token first.
    Join(JoinToken),
    /// Connect without an identity.
    Anonymous,
}

/// Reads the state dir (if any), then [`resolve`]s.
pub(crate) fn plan(config: &mut NodeConfig, now: SystemTime) -> Result<Plan, Error> {
    let stored = match &config.state_dir {
        Some(dir) => StateDir::new(dir).load()?,
        None => None,
    };
    resolve(config, stored, now)
}

/// Decides the plan from `config` and the identity `stored` in its state
/// dir, filling in `config.coordinators` and `config.trust` where the plan
/// gives them.
pub(crate) fn resolve(
    config: &mut NodeConfig,
    stored: Option<(Stored, Validity)>,
    now: SystemTime,
) -> Result<Plan, Error> {
    let state_dir = config.state_dir.clone().map(StateDir::new);
    let shown = state_dir.as_ref().map_or_else(
        || "(none)".to_owned(),
        |dir| dir.path().display().to_string(),
    );
    let token = config.join_token.clone();
    match (stored, token) {
        (Some((stored, validity)), token) if validity.not_after > now => {
            if config.name != stored.name {
                return Err(Error::NameMismatch {
                    configured: config.name.clone(),
                    joined: stored.name,
                    state_dir: shown,
                });
            }
            if token.is_some() {
                info!(
                    state_dir = %shown,
                    node_id = %stored.node_id,
                    "this node already joined (its identity is in the state dir): the join token is not needed and is ignored"
                );
            }
            default_coordinator(config, &stored.coordinator);
            if config.trust.is_none() && any_tls(&config.coordinators) {
                config.trust = state_dir.map(|dir| Trust::CaFile(dir.ca_file()));
            }
            Ok(Plan::Stored(stored, validity))
        }
        (Some((_, validity)), None) => Err(Error::CertificateExpired {
            not_after: humantime::format_rfc3339_seconds(validity.not_after).to_string(),
            state_dir: shown,
        }),
        (expired, Some(token)) => {
            if expired.is_some() {
                warn!(state_dir = %shown, "the node's certificate expired; joining again with the token");
            }
            default_coordinator(config, &token.address);
            if config.trust.is_none() && any_tls(&config.coordinators) {
                config.trust = Some(token.trust().map_err(|err| Error::Tls(err.to_string()))?);
            }
            Ok(Plan::Join(token))
        }
        (None, None) => {
            default_coordinator(config, DEFAULT_COORDINATOR);
            Ok(Plan::Anonymous)
        }
    }
}

/// Sets the coordinators to `addresses` (one, or several comma-separated,
/// as URLs) unless some are configured. Text that does not parse is kept
/// as it is, for the dial to refuse with its error.
fn default_coordinator(config: &mut NodeConfig, addresses: &str) {
    if config.coordinators.iter().all(|c| c.trim().is_empty()) {
        config.coordinators = match CoordinatorAddr::parse_list(addresses) {
            Ok(list) => list.iter().map(CoordinatorAddr::url).collect(),
            Err(_) => vec![addresses.to_owned()],
        };
    }
}

/// Whether any of `coordinators` is dialed over TLS (then all of them
/// share the trust).
fn any_tls(coordinators: &[String]) -> bool {
    coordinators.iter().any(|coordinator| {
        CoordinatorAddr::parse(coordinator).is_ok_and(|address| address.scheme() == Scheme::Https)
    })
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use weft_proto::NodeId;

    use super::*;

    const HOUR: Duration = Duration::from_secs(3600);

    fn stored(name: &str) -> Stored {
        Stored {
            node_id: NodeId::new(),
            name: name.into(),
            coordinator: "10.0.0.5:7070".into(),
            key_pem: String::new(),
            chain_pem: String::new(),
            ca_pem: String::new(),
        }
    }

    fn valid_until(now: SystemTime, left: Duration) -> Validity {
        Validity {
            not_before: now - HOUR,
            not_after: now + left,
        }
    }

    fn token() -> JoinToken {
        JoinToken {
            address: "join.example:7443".into(),
            ca_pin: format!("sha256:{}", "ab".repeat(32)),
            credential: format!("0123456789abcdef_{}", "s".repeat(43)),
        }
    }

    /// A config as `weft-node` makes it with no --coordinator, no trust.
    fn config(name: &str) -> NodeConfig {
        let mut config = NodeConfig::new("");
        config.name = name.into();
        config.state_dir = Some("/var/lib/weft-node".into());
        config
    }

    #[test]
    fn an_identity_in_the_state_dir_gives_the_coordinator_and_the_trust_and_a_token_is_ignored() {
        let now = SystemTime::now();
        for token in [None, Some(token())] {
            let mut config = config("n1");
            config.join_token = token;
            let plan = resolve(
                &mut config,
                Some((stored("n1"), valid_until(now, HOUR))),
                now,
            );
            assert!(matches!(plan, Ok(Plan::Stored(..))), "{plan:?}");
            assert_eq!(config.coordinators, ["https://10.0.0.5:7070"]);
            assert_eq!(
                config.trust,
                Some(Trust::CaFile("/var/lib/weft-node/ca.pem".into()))
            );
        }
    }

    #[test]
    fn a_configured_coordinator_and_trust_win_over_the_state_dir() {
        let now = SystemTime::now();
        let mut config = config("n1");
        config.coordinators = vec!["https://elsewhere:1".into()];
        config.trust = Some(Trust::CaFile("/etc/weft/ca.pem".into()));
        resolve(
            &mut config,
            Some((stored("n1"), valid_until(now, HOUR))),
            now,
        )
        .unwrap();
        assert_eq!(config.coordinators, ["https://elsewhere:1"]);
        assert_eq!(config.trust, Some(Trust::CaFile("/etc/weft/ca.pem".into())));
    }

    #[test]
    fn every_coordinator_a_node_joined_through_is_used_again() {
        let now = SystemTime::now();
        let mut config = config("n1");
        let mut several = stored("n1");
        several.coordinator = "10.0.0.5:7070,https://10.0.0.6:7070".into();
        resolve(&mut config, Some((several, valid_until(now, HOUR))), now).unwrap();
        assert_eq!(
            config.coordinators,
            ["https://10.0.0.5:7070", "https://10.0.0.6:7070"]
        );
    }

    #[test]
    fn another_name_than_the_one_joined_with_is_refused_saying_how_to_take_it() {
        let now = SystemTime::now();
        let mut config = config("other");
        let err = resolve(
            &mut config,
            Some((stored("n1"), valid_until(now, HOUR))),
            now,
        )
        .unwrap_err();
        assert!(err.is_fatal());
        let message = err.to_string();
        assert!(
            message.contains("joined as 'n1'")
                && message.contains("'other'")
                && message.contains("new --state-dir"),
            "{message}"
        );
    }

    #[test]
    fn without_an_identity_a_token_means_join_at_its_address_trusting_its_pin() {
        let now = SystemTime::now();
        let mut joining = config("n1");
        joining.join_token = Some(token());
        let plan = resolve(&mut joining, None, now).unwrap();
        assert!(
            matches!(plan, Plan::Join(ref t) if *t == token()),
            "{plan:?}"
        );
        assert_eq!(joining.coordinators, ["https://join.example:7443"]);
        assert_eq!(joining.trust, Some(token().trust().unwrap()));

        let mut configured = config("n1");
        configured.coordinators = vec![
            "https://10.1.1.1:7443".into(),
            "https://10.1.1.2:7443".into(),
        ];
        configured.join_token = Some(token());
        resolve(&mut configured, None, now).unwrap();
        assert_eq!(
            configured.coordinators,
            ["https://10.1.1.1:7443", "https://10.1.1.2:7443"],
            "configured coordinators replace the token's address"
        );
    }

    #[test]
    fn an_expired_identity_must_join_again() {
        let now = SystemTime::now();
        let expired = || Some((stored("n1"), valid_until(now - 2 * HOUR, HOUR)));
        let mut config = config("n1");
        let err = resolve(&mut config, expired(), now).unwrap_err();
        assert!(err.is_fatal());
        assert!(
            err.to_string().contains("expired") && err.to_string().contains("--join TOKEN"),
            "{err}"
        );
        config.join_token = Some(token());
        assert!(matches!(
            resolve(&mut config, expired(), now),
            Ok(Plan::Join(_))
        ));
    }

    #[test]
    fn with_neither_the_node_connects_as_configured_or_to_the_default() {
        let now = SystemTime::now();
        let mut config = config("n1");
        assert!(matches!(
            resolve(&mut config, None, now),
            Ok(Plan::Anonymous)
        ));
        assert_eq!(config.coordinators, [DEFAULT_COORDINATOR]);
        assert_eq!(config.trust, None);
        let mut insecure = NodeConfig::new("http://c:1");
        resolve(&mut insecure, None, now).unwrap();
        assert_eq!(
            (insecure.coordinators, insecure.trust),
            (vec!["http://c:1".to_owned()], None)
        );
    }
}
