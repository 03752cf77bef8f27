//! The rules of node identity, as plain functions: what a node name may
//! be, which node id a join gets (and so whether a join repeats an
//! earlier one), and what a node presenting a certificate may claim in
//! its `Register`. No I/O, no state, no clock (the time is an argument);
//! the services call them and send the refusal's status.

use std::time::{Duration, SystemTime};

use sha2::{Digest, Sha256};
use tonic::Status;
use ulid::Ulid;

use weft_proto::NodeId;

use crate::store::NodeIdentityRecord;

/// Longest node name, in bytes.
pub const MAX_NAME_BYTES: usize = 128;

/// How long after a join (the time its node id carries) the join may be
/// repeated: long enough for a node whose answer was lost to ask again
/// (its join timeout, a restart), short enough that the join token and
/// the key it joined with do not stay a way to get certificates for the
/// node long after (its key rotates at each renewal). Until the node
/// first connects, too: see `Identities::connected`.
pub const REPEAT_WINDOW: Duration = Duration::from_secs(10 * 60);

/// The low 80 bits of a node id made by a join: the first 80 bits of
/// SHA-256 over the join's token id, name and public key (each
/// length-prefixed, so that no two joins' inputs run together).
fn join_bits(token_id: &str, name: &str, public_key: &[u8]) -> u128 {
    let mut hash = Sha256::new();
    hash.update(b"weft node join v1\0");
    for part in [token_id.as_bytes(), name.as_bytes(), public_key] {
        hash.update((part.len() as u64).to_be_bytes());
        hash.update(part);
    }
    let digest = hash.finalize();
    let mut bits = [0u8; 16];
    bits[6..].copy_from_slice(&digest[..10]);
    u128::from_be_bytes(bits)
}

/// The node id a join with token `token_id`, as `name`, for the public
/// key `public_key` (the request's DER SubjectPublicKeyInfo) gets when
/// made at `at_ms` (milliseconds since the Unix epoch): a ULID with that
/// time whose 80 other bits are a hash of the three. So the id itself
/// records which token, name and key made it, and a join repeated (its
/// answer was lost: a timeout, a dropped connection, a crash before the
/// node saved it) is recognised by [`repeats_join`] with nothing more
/// stored, across coordinator restarts too.
pub fn join_node_id(at_ms: u64, token_id: &str, name: &str, public_key: &[u8]) -> NodeId {
    NodeId::from_ulid(Ulid::from_parts(
        at_ms,
        join_bits(token_id, name, public_key),
    ))
}

/// Whether a join with token `token_id`, as `name`, for `public_key`
/// at `now` repeats the one that made `record`: same token, same name,
/// the id [`join_node_id`] gave it, and within [`REPEAT_WINDOW`] of that
/// join ([`within_repeat_window`]). A join by the same token and name
/// with another key is not a repeat (it could take the name over). A
/// revoked record is never repeated.
pub fn repeats_join(
    record: &NodeIdentityRecord,
    token_id: &str,
    name: &str,
    public_key: &[u8],
    now: SystemTime,
) -> bool {
    may_repeat(record, token_id, name, now)
        && record.id == join_node_id(record.id.timestamp_ms(), token_id, name, public_key)
}

/// What [`repeats_join`] asks but the key: `record` was made by a join
/// with token `token_id` as `name`, is not revoked, and was made within
/// [`REPEAT_WINDOW`] of `now`. What a join with a used-up token must
/// show before it may wait for the writers' locks.
pub fn may_repeat(
    record: &NodeIdentityRecord,
    token_id: &str,
    name: &str,
    now: SystemTime,
) -> bool {
    record.revoked.is_none()
        && !record.token_id.is_empty()
        && record.token_id == token_id
        && record.name == name
        && within_repeat_window(record.id, now)
}

/// Whether `now` is within [`REPEAT_WINDOW`] of the join time node id
/// `id` carries, either way: a join time ahead of `now` (a clock that
/// went back, or was ahead at the join and was put right) counts as
/// within only up to [`REPEAT_WINDOW`] ahead, so a join is not
/// repeatable for as long as the clock was wrong.
pub fn within_repeat_window(id: NodeId, now: SystemTime) -> bool {
    let joined = SystemTime::UNIX_EPOCH + Duration::from_millis(id.timestamp_ms());
    let apart = match now.duration_since(joined) {
        Ok(since) => since,
        Err(ahead) => ahead.duration(),
    };
    apart < REPEAT_WINDOW
}

/// A node name: 1 to 128 bytes of letters, digits, `.`, `-` and `_`,
/// that is not a node id (admins select a node by id or name, an id
/// first: a name that is another node's id would make `weft nodes revoke
/// NAME` revoke that node). The error names the field and the rule
/// (`INVALID_ARGUMENT`).
pub fn validate_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err(
            "name: empty; give the node a name (1 to 128 bytes of letters, digits, '.', '-', '_')"
                .into(),
        );
    }
    if name.len() > MAX_NAME_BYTES {
        return Err(format!(
            "name: {} bytes, longer than {MAX_NAME_BYTES}",
            name.len()
        ));
    }
    if let Some(bad) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_')))
    {
        return Err(format!(
            "name: {bad:?} is not allowed (only letters, digits, '.', '-', '_')"
        ));
    }
    if name.parse::<NodeId>().is_ok() {
        return Err(format!(
            "name: '{name}' is a node id, which admins could mistake for another node's; choose a name that is not one"
        ));
    }
    Ok(())
}

/// Why a node's `Connect` was refused before it registered. Each says
/// what the node (or its admin) must do.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ConnectRefusal {
    /// No client certificate: the node never joined.
    #[error(
        "this coordinator requires nodes to join: an admin runs `weft token create --role node`, then `weft-node --join TOKEN`"
    )]
    NoCertificate,
    /// A certificate of the cluster CA that names no node (or an
    /// identity this coordinator does not know, e.g. its data was wiped).
    #[error(
        "the node certificate names no node this coordinator knows; join again with a new token (`weft token create --role node`, then `weft-node --join TOKEN`)"
    )]
    Unknown,
    /// An admin revoked the node.
    #[error(
        "node {0} was revoked by an admin; it may not connect again (join as a new node with a new token)"
    )]
    Revoked(NodeId),
    /// `previous_node_id` names another node.
    #[error(
        "previous_node_id {claimed} is not this node's id: its certificate names node {certified}"
    )]
    NotItsId {
        /// The certificate's node id.
        certified: NodeId,
        /// What the node claimed.
        claimed: String,
    },
    /// `Register.name` is not the name the node joined with.
    #[error(
        "name '{claimed}' is not the name this node joined with ('{joined}'); start it with --name {joined} or join again under the new name"
    )]
    NameMismatch {
        /// The name it joined with.
        joined: String,
        /// What it sent.
        claimed: String,
    },
}

impl From<ConnectRefusal> for Status {
    fn from(refusal: ConnectRefusal) -> Status {
        let message = refusal.to_string();
        match refusal {
            ConnectRefusal::NoCertificate | ConnectRefusal::Unknown => {
                Status::unauthenticated(message)
            }
            ConnectRefusal::Revoked(_) | ConnectRefusal::NotItsId { .. } => {
                Status::permission_denied(message)
            }
            ConnectRefusal::NameMismatch { .. } => Status::failed_precondition(message),
        }
    }
}

/// What a node whose certificate names `identity` may register as: its
/// certified id, and its name (the joined one; `name` must be empty or
/// that). `previous_node_id`, when set, must be the certified id.
pub fn admit_connect(
    identity: Option<&NodeIdentityRecord>,
    previous_node_id: &str,
    name: &str,
) -> Result<(NodeId, String), ConnectRefusal> {
    let identity = identity.ok_or(ConnectRefusal::Unknown)?;
    if identity.revoked.is_some() {
        return Err(ConnectRefusal::Revoked(identity.id));
    }
    let previous = previous_node_id.trim();
    if !previous.is_empty() && previous.parse::<NodeId>().ok() != Some(identity.id) {
        return Err(ConnectRefusal::NotItsId {
            certified: identity.id,
            claimed: previous.to_owned(),
        });
    }
    let name = name.trim();
    if !name.is_empty() && name != identity.name {
        return Err(ConnectRefusal::NameMismatch {
            joined: identity.name.clone(),
            claimed: name.to_owned(),
        });
    }
    Ok((identity.id, identity.name.clone()))
}
