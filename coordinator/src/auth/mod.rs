//! Client tokens: the token model, the in-memory index the server's edge
//! checks, and the typed [`Caller`] each service method asks for its scope.
//!
//! A client token reads `weft_<id>_<secret>`: `id` (16 hex digits) is looked
//! up, `secret` (256 random bits, URL-safe base64) is checked against the
//! SHA-256 stored for that id, in constant time. Only the hash is stored
//! (see [`TokenRecord`]); the token string exists once, in the answer to
//! `CreateToken` (or in `admin.token`).
//!
//! Node join tokens (role `node`) are records of the same index with kind
//! [`TokenKind::NodeJoin`], a number of uses, and no scopes: their
//! credential `<id>_<secret>` travels inside a `weftjoin_...` token and is
//! checked only by `NodeService.Join` ([`TokenIndex::check_join`]); the
//! edge never accepts one as a bearer token. The node service (`Connect`)
//! is not checked by client tokens: nodes authenticate with their
//! certificates (see `crate::identity`).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use base64::Engine;
use sha2::{Digest, Sha256};
use tonic::{Request, Status};

mod join;

pub use join::{JoinRefused, new_join_token};

/// What a client token allows. `Admin` implies every other scope.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Scope {
    /// Get, List, Watch, WaitMany, ListNodes, ClusterInfo.
    Read,
    /// Submit, Run.
    Submit,
    /// Cancel.
    Cancel,
    /// DrainNode, the token rpcs.
    Admin,
}

impl Scope {
    /// Every scope, in display order.
    pub const ALL: [Scope; 4] = [Scope::Read, Scope::Submit, Scope::Cancel, Scope::Admin];

    /// Its name on the command line and in the proto.
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Read => "read",
            Scope::Submit => "submit",
            Scope::Cancel => "cancel",
            Scope::Admin => "admin",
        }
    }

    fn bit(self) -> u8 {
        match self {
            Scope::Read => 1,
            Scope::Submit => 2,
            Scope::Cancel => 4,
            Scope::Admin => 8,
        }
    }
}

impl std::str::FromStr for Scope {
    type Err = String;

    fn from_str(text: &str) -> Result<Scope, String> {
        Scope::ALL
            .into_iter()
            .find(|s| s.as_str() == text.trim())
            .ok_or_else(|| format!("unknown scope '{text}' (known: read, submit, cancel, admin)"))
    }
}

/// A set of scopes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Scopes(u8);

impl Scopes {
    /// Every scope (what the admin token has).
    pub const ADMIN: Scopes = Scopes(15);

    /// From a list of scopes.
    pub fn of(scopes: impl IntoIterator<Item = Scope>) -> Scopes {
        Scopes(scopes.into_iter().fold(0, |bits, s| bits | s.bit()))
    }

    /// From the stored bits (unknown bits dropped).
    pub fn from_bits(bits: u8) -> Scopes {
        Scopes(bits & 15)
    }

    /// The stored bits.
    pub fn bits(self) -> u8 {
        self.0
    }

    /// Whether `scope` is allowed: held directly, or through `admin`.
    pub fn allows(self, scope: Scope) -> bool {
        self.0 & (scope.bit() | Scope::Admin.bit()) != 0
    }

    /// The scopes held, by name.
    pub fn names(self) -> Vec<String> {
        Scope::ALL
            .into_iter()
            .filter(|s| self.0 & s.bit() != 0)
            .map(|s| s.as_str().to_owned())
            .collect()
    }

    /// Parses `read,submit` (names, comma separated; at least one).
    pub fn parse_list<S: AsRef<str>>(names: &[S]) -> Result<Scopes, String> {
        let mut scopes = Scopes::default();
        for name in names.iter().flat_map(|n| n.as_ref().split(',')) {
            if name.trim().is_empty() {
                continue;
            }
            scopes.0 |= name.parse::<Scope>()?.bit();
        }
        if scopes.0 == 0 {
            return Err("no scope given (read, submit, cancel, admin)".into());
        }
        Ok(scopes)
    }
}

/// What a token is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TokenKind {
    /// A client (CLI, SDK): bearer token with scopes.
    Client,
    /// A node's join token: traded once per use for a node certificate
    /// (`NodeService.Join`); never a bearer token.
    NodeJoin,
    /// A kind a later version stored: usable for nothing here (neither a
    /// bearer token nor a join token), kept as it was.
    Unknown(u8),
}

impl TokenKind {
    /// Stored form.
    pub fn to_u8(self) -> u8 {
        match self {
            TokenKind::Client => 0,
            TokenKind::NodeJoin => 1,
            TokenKind::Unknown(value) => value,
        }
    }

    /// From the stored form; a kind this build does not know is
    /// [`TokenKind::Unknown`], which every check refuses.
    pub fn from_u8(value: u8) -> TokenKind {
        match value {
            0 => TokenKind::Client,
            1 => TokenKind::NodeJoin,
            other => TokenKind::Unknown(other),
        }
    }
}

/// A stored token: everything but the secret, of which only the SHA-256
/// is kept.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenRecord {
    /// Public id (16 hex digits), the part of the token that is looked up.
    pub id: String,
    /// A name for people (`weft token list`).
    pub name: String,
    /// Client or node join token.
    pub kind: TokenKind,
    /// What it allows.
    pub scopes: Scopes,
    /// When it was made.
    pub created: SystemTime,
    /// When it stops working; `None`: never.
    pub expires: Option<SystemTime>,
    /// When it was revoked; `None`: not revoked.
    pub revoked: Option<SystemTime>,
    /// SHA-256 of the secret.
    pub secret_hash: [u8; 32],
    /// Join tokens: how many joins it allows; 0: no limit (client tokens: 0).
    pub uses: u32,
    /// Join tokens: how many nodes joined with it.
    pub used: u32,
}

/// The prefix of every client token.
pub const TOKEN_PREFIX: &str = "weft_";

/// Why a token was not accepted. The message says how to get one.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// No `authorization: Bearer` metadata.
    #[error(
        "no token: pass --token / WEFT_TOKEN (or --token-file); an admin creates one with `weft token create --scope ...`; on the coordinator's machine the admin token is in DATA_DIR/admin.token"
    )]
    Missing,
    /// Malformed, unknown id, or wrong secret (not told apart).
    #[error(
        "invalid token: it is not one this coordinator issued; an admin creates one with `weft token create --scope ...`"
    )]
    Invalid,
    /// Past its expiry.
    #[error(
        "token {0} has expired; an admin creates a new one with `weft token create --scope ...`"
    )]
    Expired(String),
    /// Revoked by an admin.
    #[error(
        "token {0} was revoked; an admin creates a new one with `weft token create --scope ...`"
    )]
    Revoked(String),
}

impl From<AuthError> for Status {
    fn from(err: AuthError) -> Status {
        Status::unauthenticated(err.to_string())
    }
}

/// SHA-256 of a secret.
pub fn hash_secret(secret: &str) -> [u8; 32] {
    Sha256::digest(secret.as_bytes()).into()
}

/// Compares two hashes without an early exit.
pub fn constant_time_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Splits `weft_<id>_<secret>` into id and secret.
pub fn parse_token(token: &str) -> Option<(&str, &str)> {
    let rest = token.trim().strip_prefix(TOKEN_PREFIX)?;
    let (id, secret) = rest.split_once('_')?;
    if id.len() != 16 || !id.bytes().all(|b| b.is_ascii_hexdigit()) || secret.len() < 32 {
        return None;
    }
    Some((id, secret))
}

fn random_bytes<const N: usize>() -> Result<[u8; N], Status> {
    let mut buf = [0u8; N];
    getrandom::fill(&mut buf)
        .map_err(|err| Status::internal(format!("no randomness for a token: {err}")))?;
    Ok(buf)
}

/// Makes a new client token: its record (to store) and the token string
/// (to show once). A zero `ttl` is INVALID_ARGUMENT (a token born
/// expired), as is one whose expiry overflows.
pub fn new_token(
    name: &str,
    scopes: Scopes,
    ttl: Option<Duration>,
    now: SystemTime,
) -> Result<(TokenRecord, String), Status> {
    let expires = match ttl {
        None => None,
        // A token born expired is refused by every call: surely a mistake.
        Some(ttl) if ttl.is_zero() => {
            return Err(Status::invalid_argument(
                "ttl: must be more than 0 (e.g. 1h); leave it unset for a token that never expires",
            ));
        }
        Some(ttl) => Some(now.checked_add(ttl).ok_or_else(|| {
            Status::invalid_argument(format!(
                "ttl: {}s is too long (its expiry overflows)",
                ttl.as_secs()
            ))
        })?),
    };
    let id = hex::encode(random_bytes::<8>()?);
    let secret = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(random_bytes::<32>()?);
    let record = TokenRecord {
        name: name.to_owned(),
        kind: TokenKind::Client,
        scopes,
        created: now,
        expires,
        revoked: None,
        secret_hash: hash_secret(&secret),
        id: id.clone(),
        uses: 0,
        used: 0,
    };
    Ok((record, format!("{TOKEN_PREFIX}{id}_{secret}")))
}

/// The record of an existing admin token (e.g. read from `admin.token`),
/// or `None` when `text` is not a well-formed token.
pub fn adopt_token(text: &str, name: &str, now: SystemTime) -> Option<TokenRecord> {
    let (id, secret) = parse_token(text)?;
    Some(TokenRecord {
        id: id.to_ascii_lowercase(),
        name: name.to_owned(),
        kind: TokenKind::Client,
        scopes: Scopes::ADMIN,
        created: now,
        expires: None,
        revoked: None,
        secret_hash: hash_secret(secret),
        uses: 0,
        used: 0,
    })
}

/// Who made a request: put in the request's extensions by the server's
/// edge ([`Authenticator`]); each service method asks it for its one scope.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Caller {
    /// The token's id (`None` with `--no-auth`).
    pub token_id: Option<String>,
    /// What it may do.
    pub scopes: Scopes,
}

impl Caller {
    /// `PERMISSION_DENIED` naming the scope when the caller lacks it.
    pub fn require(&self, scope: Scope) -> Result<(), Status> {
        if self.scopes.allows(scope) {
            return Ok(());
        }
        Err(Status::permission_denied(format!(
            "this token (id {}, scopes: {}) lacks the '{}' scope; an admin creates one with `weft token create --scope {}`",
            self.token_id.as_deref().unwrap_or("-"),
            self.scopes.names().join(","),
            scope.as_str(),
            scope.as_str(),
        )))
    }
}

/// Checks that the request's [`Caller`] (set by the [`Authenticator`]) has
/// `scope`. A request without one (the edge did not run) is refused.
pub fn require<T>(request: &Request<T>, scope: Scope) -> Result<(), Status> {
    match request.extensions().get::<Caller>() {
        Some(caller) => caller.require(scope),
        None => Err(AuthError::Missing.into()),
    }
}

/// Checks what submitting `specs` needs beyond the `submit` scope: a spec
/// whose concurrency key cancels the key's oldest tasks to make room
/// (`OVER_LIMIT_CANCEL_OLDEST`) cancels tasks others may have submitted,
/// so it needs the `cancel` scope too.
pub fn require_for_specs<'a, T>(
    request: &Request<T>,
    specs: impl IntoIterator<Item = &'a weft_proto::pb::TaskSpec>,
) -> Result<(), Status> {
    let cancels = specs.into_iter().any(|spec| {
        spec.concurrency
            .as_ref()
            .is_some_and(|limit| limit.on_limit == weft_proto::pb::OverLimit::CancelOldest as i32)
    });
    match cancels {
        true => require(request, Scope::Cancel),
        false => Ok(()),
    }
}

/// Whether the request's [`Caller`] has `scope` (no caller: no).
pub fn allows<T>(request: &Request<T>, scope: Scope) -> bool {
    request
        .extensions()
        .get::<Caller>()
        .is_some_and(|caller| caller.scopes.allows(scope))
}

/// Every token by id, as the edge checks them. Writers (`CreateToken`,
/// `RevokeToken`) commit to the store first and update this before they
/// answer, so a revocation holds from the moment it is acknowledged.
#[derive(Debug, Default)]
pub struct TokenIndex {
    tokens: RwLock<HashMap<String, TokenRecord>>,
    /// Serializes writers (read-modify-write of one record).
    pub(crate) write: tokio::sync::Mutex<()>,
}

impl TokenIndex {
    /// An index of `records`.
    pub fn new(records: Vec<TokenRecord>) -> TokenIndex {
        TokenIndex {
            tokens: RwLock::new(records.into_iter().map(|r| (r.id.clone(), r)).collect()),
            write: tokio::sync::Mutex::new(()),
        }
    }

    /// Whether no token exists yet (first start).
    pub fn is_empty(&self) -> bool {
        self.tokens.read().map(|t| t.is_empty()).unwrap_or(false)
    }

    /// Adds or replaces a record.
    pub fn put(&self, record: TokenRecord) {
        if let Ok(mut tokens) = self.tokens.write() {
            tokens.insert(record.id.clone(), record);
        }
    }

    /// One record.
    pub fn get(&self, id: &str) -> Option<TokenRecord> {
        self.tokens.read().ok()?.get(id).cloned()
    }

    /// Every record, oldest first.
    pub fn list(&self) -> Vec<TokenRecord> {
        let mut all: Vec<TokenRecord> = self
            .tokens
            .read()
            .map(|t| t.values().cloned().collect())
            .unwrap_or_default();
        all.sort_by(|a, b| a.created.cmp(&b.created).then(a.id.cmp(&b.id)));
        all
    }

    /// Checks a bearer token at `now`.
    pub fn authenticate(&self, token: &str, now: SystemTime) -> Result<Caller, AuthError> {
        let (id, secret) = parse_token(token).ok_or(AuthError::Invalid)?;
        // Ids are stored lower-case (adopt_token); the hex may come in
        // either case.
        let id = id.to_ascii_lowercase();
        let tokens = self.tokens.read().map_err(|_| AuthError::Invalid)?;
        let record = tokens.get(&id).ok_or(AuthError::Invalid)?;
        if !constant_time_eq(&record.secret_hash, &hash_secret(secret))
            || record.kind != TokenKind::Client
        {
            return Err(AuthError::Invalid);
        }
        if record.revoked.is_some() {
            return Err(AuthError::Revoked(record.id.clone()));
        }
        if record.expires.is_some_and(|at| at <= now) {
            return Err(AuthError::Expired(record.id.clone()));
        }
        Ok(Caller {
            token_id: Some(record.id.clone()),
            scopes: record.scopes,
        })
    }
}

/// The server's edge for `TaskService` and `AdminService`: reads
/// `authorization: Bearer <token>`, checks it against the [`TokenIndex`]
/// and puts the [`Caller`] into the request's extensions; no token, or a
/// wrong, expired or revoked one, is `UNAUTHENTICATED` here. With
/// `--no-auth` every caller is admin.
#[derive(Clone, Debug)]
pub struct Authenticator {
    /// The tokens; `None`: authentication is off (`--no-auth`).
    pub index: Option<Arc<TokenIndex>>,
}

impl tonic::service::Interceptor for Authenticator {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        let caller = match &self.index {
            None => Caller {
                token_id: None,
                scopes: Scopes::ADMIN,
            },
            Some(index) => {
                let token = request
                    .metadata()
                    .get("authorization")
                    .ok_or(AuthError::Missing)?
                    .to_str()
                    .map_err(|_| AuthError::Invalid)?;
                let token = bearer_token(token).ok_or(AuthError::Invalid)?;
                index.authenticate(token, SystemTime::now())?
            }
        };
        request.extensions_mut().insert(caller);
        Ok(request)
    }
}

/// The token of an `Authorization` value `Bearer TOKEN`. The scheme is
/// matched whatever its case (HTTP's auth schemes are case-insensitive:
/// `BEARER x` is `Bearer x`); `None` for another scheme or none.
pub(crate) fn bearer_token(value: &str) -> Option<&str> {
    let (scheme, token) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim_start_matches(' '))
}

/// The admin token's file name in the data dir.
pub const ADMIN_TOKEN_FILE: &str = "admin.token";

/// Writes `token` to `path` (mode 0600), replacing any old file. A missing
/// parent dir is created 0700; an existing one (e.g. `/tmp`) is left as it
/// is.
pub fn write_token_file(path: &Path, token: &str) -> std::io::Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty())
        && !dir.exists()
    {
        let mut builder = std::fs::DirBuilder::new();
        builder.recursive(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::DirBuilderExt;
            builder.mode(0o700);
        }
        builder.create(dir)?;
    }
    let _ = std::fs::remove_file(path);
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut file = options.open(path)?;
    std::io::Write::write_all(&mut file, format!("{token}\n").as_bytes())?;
    file.sync_all()
}

/// The text of an existing admin token file to adopt: `Ok(None)` when
/// there is none; an error when it is not a regular file owned by this
/// user with no group/other permissions (another local user could have
/// planted it).
pub fn read_own_token_file(path: &Path) -> Result<Option<String>, String> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(meta) => meta,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(err) => return Err(err.to_string()),
    };
    if !meta.file_type().is_file() {
        return Err("an existing admin token file must be a regular file (not a link); remove it or choose another --admin-token-file".into());
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        let me = nix::unistd::geteuid().as_raw();
        if meta.uid() != me {
            return Err(format!(
                "refusing to adopt an admin token file owned by uid {} (this process runs as uid {me}); remove it or choose another --admin-token-file",
                meta.uid()
            ));
        }
        if meta.mode() & 0o077 != 0 {
            return Err(format!(
                "refusing to adopt an admin token file with mode {:o} (group or others may read or write it); make it 0600 or remove it",
                meta.mode() & 0o777
            ));
        }
    }
    std::fs::read_to_string(path)
        .map(Some)
        .map_err(|err| err.to_string())
}

/// Where the admin token goes: `explicit`, else `DATA_DIR/admin.token`,
/// else a fresh private temp dir (in-memory store).
pub fn admin_token_path(explicit: Option<&Path>, data_dir: Option<&Path>) -> PathBuf {
    if let Some(path) = explicit {
        return path.to_owned();
    }
    match data_dir {
        Some(dir) => dir.join(ADMIN_TOKEN_FILE),
        None => std::env::temp_dir()
            .join(format!(
                "weft-{}-{}",
                std::process::id(),
                SystemTime::now()
                    .duration_since(SystemTime::UNIX_EPOCH)
                    .unwrap_or_default()
                    .as_nanos()
            ))
            .join(ADMIN_TOKEN_FILE),
    }
}

#[cfg(test)]
mod tests;
