//! Who a connecting node is, when nodes are authenticated: the node id its
//! TLS client certificate names, checked against the identity index with
//! the rules of `crate::identity::rules`. Translation only: the rules
//! decide, this reads the certificate and counts revoked nodes' attempts.

use rustls::pki_types::CertificateDer;
use tonic::Status;

use weft_proto::{NodeId, pb};

use super::NodeApi;
use crate::identity::{ConnectRefusal, admit_connect};
use crate::store::NodeIdentityRecord;
use crate::tls::node_cert::{node_id_of, node_of};

/// The node's certificate (leaf first), or UNAUTHENTICATED saying how to
/// join. rustls already checked that it chains to the cluster CA.
pub(super) fn require_certificate<'a>(
    peer_certs: Option<&'a Vec<CertificateDer<'static>>>,
) -> Result<&'a CertificateDer<'static>, Status> {
    peer_certs
        .and_then(|chain| chain.first())
        .ok_or_else(|| ConnectRefusal::NoCertificate.into())
}

impl NodeApi {
    /// The identity of a certificate this coordinator's CA signed for a
    /// node it has no record of (its store was wiped, or it keeps none:
    /// `--in-memory`): the signature is the proof the node joined, so it
    /// is recorded (in memory; `RevokeNode` stores it) from the
    /// certificate's node id and name. `Ok(None)` when the certificate
    /// names no name, or its name is held by another node; UNAVAILABLE
    /// (the node retries) while a `Join` or `RevokeNode` is writing, so a
    /// name is never taken twice.
    fn adopt(&self, leaf: &[u8]) -> Result<Option<NodeIdentityRecord>, Status> {
        let Some((id, name)) = node_of(leaf) else {
            return Ok(None);
        };
        let Ok(_writer) = self.identities.write.try_lock() else {
            return Err(Status::unavailable(
                "the coordinator is recording a join or a revocation; connect again",
            ));
        };
        if let Some(holder) = self.identities.holder(&name)
            && holder.id != id
        {
            return Ok(None);
        }
        let record = NodeIdentityRecord {
            id,
            name,
            created: std::time::SystemTime::now(),
            token_id: String::new(),
            revoked: None,
        };
        tracing::warn!(node_id = %record.id, node_name = %record.name, "a node certificate of this cluster's CA names a node not on record (the store was lost, or is in memory); recorded it");
        self.identities.put(record.clone());
        Ok(Some(record))
    }

    /// The node id and name a certified node registers with, or the
    /// refusal (a revoked node's is counted).
    pub(super) fn certified(
        &self,
        peer_certs: Option<&Vec<CertificateDer<'static>>>,
        register: &pb::Register,
    ) -> Result<(NodeId, String), Status> {
        let leaf = require_certificate(peer_certs)?;
        let identity = match node_id_of(leaf.as_ref()) {
            Some(id) => match self.identities.get(id) {
                Some(identity) => Some(identity),
                None => self.adopt(leaf.as_ref())?,
            },
            None => None,
        };
        let admitted = admit_connect(
            identity.as_ref(),
            &register.previous_node_id,
            &register.name,
        );
        let (id, name) = admitted.map_err(|refusal| {
            if matches!(refusal, ConnectRefusal::Revoked(_)) {
                self.identities.count_refusal();
            }
            tracing::info!(reason = %refusal, "refused a node's Connect");
            Status::from(refusal)
        })?;
        // It has its certificate: its join is not to be repeated.
        self.identities.note_connected(id);
        Ok((id, name))
    }
}
