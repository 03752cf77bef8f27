//! `RenewCertificate` on a live session: a new certificate for the
//! session's certified node id, sent back as `NodeCertificate` on the
//! session's own stream. Done by the session's reader, not the driver:
//! signing is the CA's business and touches no scheduler state.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc::error::TrySendError;

use weft_proto::NodeId;

use crate::driver::{NodeTx, ToNode};
use crate::identity::Identities;
use crate::tls::ServerTls;

/// What a session needs to answer renewals.
pub(super) struct Renewal {
    /// The session's outgoing stream.
    pub tx: NodeTx,
    /// The certified node, when the session was authenticated by a node
    /// certificate; `None`: nothing to renew.
    pub certified: Option<Certified>,
}

/// A session authenticated by a node certificate.
pub(super) struct Certified {
    /// The node id its certificate names.
    pub node_id: NodeId,
    /// The CA that signs the new certificate.
    pub tls: Arc<ServerTls>,
    /// To check that the node was not revoked meanwhile.
    pub identities: Arc<Identities>,
    /// Lifetime of the new certificate.
    pub lifetime: Duration,
}

impl Renewal {
    /// Answers one `RenewCertificate`: the new chain, or why not.
    pub fn answer(&self, csr_der: &[u8]) {
        let answer = match &self.certified {
            None => Err(
                "this session is not authenticated by a node certificate, so there is none to renew (the coordinator does not authenticate nodes)"
                    .to_owned(),
            ),
            Some(certified) => certified.renew(csr_der),
        };
        if let Err(err) = &answer {
            tracing::info!(error = %err, "refused a certificate renewal");
        }
        if let Err(TrySendError::Full(_)) = self.tx.try_send(ToNode::Certificate(answer)) {
            // A node that does not read its stream gets its session ended
            // by the driver soon; it may ask again on its next session.
            tracing::warn!("node session full; dropped its renewed certificate");
        }
    }
}

impl Certified {
    fn renew(&self, csr_der: &[u8]) -> Result<(String, std::time::SystemTime), String> {
        let name = match self.identities.get(self.node_id) {
            None => return Err(format!("node {} is not known; join again", self.node_id)),
            Some(identity) if identity.revoked.is_some() => {
                self.identities.count_refusal();
                return Err(format!(
                    "node {} was revoked by an admin; no certificate for it",
                    self.node_id
                ));
            }
            Some(identity) => identity.name,
        };
        let cert = self
            .tls
            .ca()
            .issue_node(csr_der, (self.node_id, &name), self.lifetime)
            .map_err(|err| err.to_string())?;
        tracing::info!(node_id = %self.node_id, "renewed a node certificate");
        Ok((cert.chain_pem, cert.not_after))
    }
}
