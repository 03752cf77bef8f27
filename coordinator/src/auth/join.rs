//! Node join tokens: making one (a [`TokenRecord`] of kind
//! [`TokenKind::NodeJoin`] with a number of uses) and checking a join
//! credential for `NodeService.Join`. Never a bearer token: the edge's
//! [`TokenIndex::authenticate`] refuses every join token.

use std::time::{Duration, SystemTime};

use tonic::Status;

use super::{
    Scopes, TOKEN_PREFIX, TokenIndex, TokenKind, TokenRecord, constant_time_eq, hash_secret,
    new_token, parse_token,
};

/// Makes a new node join token allowing `uses` joins (0: no limit): its
/// record (to store) and its credential `<id>_<secret>` (to put in the
/// `weftjoin_...` token, shown once).
pub fn new_join_token(
    name: &str,
    ttl: Option<Duration>,
    uses: u32,
    now: SystemTime,
) -> Result<(TokenRecord, String), Status> {
    let (mut record, token) = new_token(name, Scopes::default(), ttl, now)?;
    record.kind = TokenKind::NodeJoin;
    record.uses = uses;
    let credential = token
        .strip_prefix(TOKEN_PREFIX)
        .unwrap_or(&token)
        .to_owned();
    Ok((record, credential))
}

/// Why a join credential was refused (`UNAUTHENTICATED`); the message
/// says how to get a good one.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum JoinRefused {
    /// Malformed, unknown id, wrong secret, or not a join token (not told
    /// apart).
    #[error(
        "invalid join token: it is not one this coordinator issued; an admin makes one with `weft token create --role node`"
    )]
    Invalid,
    /// Past its expiry.
    #[error(
        "join token {0} has expired; an admin makes a new one with `weft token create --role node`"
    )]
    Expired(String),
    /// Revoked by an admin.
    #[error(
        "join token {0} was revoked; an admin makes a new one with `weft token create --role node`"
    )]
    Revoked(String),
    /// Every use taken.
    #[error(
        "join token {id} is used up ({uses} of {uses} joins); an admin makes a new one with `weft token create --role node [--uses N]`"
    )]
    UsedUp {
        /// The token's id.
        id: String,
        /// How many joins it allowed.
        uses: u32,
    },
}

impl From<JoinRefused> for Status {
    fn from(err: JoinRefused) -> Status {
        Status::unauthenticated(err.to_string())
    }
}

impl TokenIndex {
    /// Checks a join credential (`<id>_<secret>`, or with a `weft_` prefix)
    /// at `now`: a node join token, not revoked, not expired, with a use
    /// left. Answers its record (the caller stores `used + 1` when the join
    /// succeeds, holding [`TokenIndex::write`] across both).
    pub fn check_join(
        &self,
        credential: &str,
        now: SystemTime,
    ) -> Result<TokenRecord, JoinRefused> {
        let credential = credential.trim();
        let with_prefix;
        let token = if credential.starts_with(TOKEN_PREFIX) {
            credential
        } else {
            with_prefix = format!("{TOKEN_PREFIX}{credential}");
            &with_prefix
        };
        let (id, secret) = parse_token(token).ok_or(JoinRefused::Invalid)?;
        let id = id.to_ascii_lowercase();
        let tokens = self.tokens.read().map_err(|_| JoinRefused::Invalid)?;
        let record = tokens.get(&id).ok_or(JoinRefused::Invalid)?;
        if !constant_time_eq(&record.secret_hash, &hash_secret(secret))
            || record.kind != TokenKind::NodeJoin
        {
            return Err(JoinRefused::Invalid);
        }
        if record.revoked.is_some() {
            return Err(JoinRefused::Revoked(record.id.clone()));
        }
        if record.expires.is_some_and(|at| at <= now) {
            return Err(JoinRefused::Expired(record.id.clone()));
        }
        if record.uses != 0 && record.used >= record.uses {
            return Err(JoinRefused::UsedUp {
                id: record.id.clone(),
                uses: record.uses,
            });
        }
        Ok(record.clone())
    }
}
