//! Who a connecting node is, when nodes are authenticated: the node id its
//! TLS client certificate names, checked against the identity index with
//! the rules of `crate::identity::rules`. Translation only: the rules
//! decide, this reads the certificate and counts revoked nodes' attempts.

use rustls::pki_types::CertificateDer;
use tonic::Status;

use weft_proto::{NodeId, pb};

use super::NodeApi;
use crate::identity::{ConnectRefusal, admit_connect};
use crate::tls::node_cert::node_id_of;

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
    /// The node id and name a certified node registers with, or the
    /// refusal (a revoked node's is counted).
    pub(super) fn certified(
        &self,
        peer_certs: Option<&Vec<CertificateDer<'static>>>,
        register: &pb::Register,
    ) -> Result<(NodeId, String), Status> {
        let leaf = require_certificate(peer_certs)?;
        let identity = node_id_of(leaf.as_ref()).and_then(|id| self.identities.get(id));
        let admitted = admit_connect(
            identity.as_ref(),
            &register.previous_node_id,
            &register.name,
        );
        admitted.map_err(|refusal| {
            if matches!(refusal, ConnectRefusal::Revoked(_)) {
                self.identities.count_refusal();
            }
            tracing::info!(reason = %refusal, "refused a node's Connect");
            refusal.into()
        })
    }
}
