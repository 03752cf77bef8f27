//! `RenewCertificate` on a live session: a new certificate for the
//! session's certified node id, sent back as `NodeCertificate` on the
//! session's own stream. Done by the session's reader, not the driver:
//! signing is the CA's business and touches no scheduler state.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc::error::TrySendError;

use weft_proto::NodeId;

use crate::driver::{NodeTx, ToNode};
use crate::identity::Identities;
use crate::listener::backoff::Throttle;
use crate::tls::ServerTls;

/// What a session needs to answer renewals.
pub(super) struct Renewal {
    /// The session's outgoing stream.
    tx: NodeTx,
    /// The certified node, when the session was authenticated by a node
    /// certificate; `None`: nothing to renew.
    certified: Option<Certified>,
    /// When this session last had a certificate signed.
    last_signed: Option<Instant>,
    /// Refusals are logged at most once per 5 s (a node may ask in a loop).
    refusals: Throttle,
}

/// How long a session waits between two signed renewals: a twentieth of
/// the certificates' lifetime, 1 s to 60 s. A node renews at 2/3 of a
/// certificate's life and retries a failure after a tenth of what is
/// left, so only a node asking in a loop meets it (each answer is a
/// signature, on the session's reader).
fn renewal_gap(lifetime: Duration) -> Duration {
    (lifetime / 20).clamp(Duration::from_secs(1), Duration::from_secs(60))
}

/// `Some(wait)` when a renewal at `now` comes too soon after the one
/// signed at `last`, for certificates of `lifetime`.
fn too_soon(last: Option<Instant>, now: Instant, lifetime: Duration) -> Option<Duration> {
    let since = now.saturating_duration_since(last?);
    renewal_gap(lifetime)
        .checked_sub(since)
        .filter(|wait| !wait.is_zero())
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
    /// Answers the renewals of the session whose outgoing stream is `tx`.
    pub fn new(tx: NodeTx, certified: Option<Certified>) -> Renewal {
        Renewal {
            tx,
            certified,
            last_signed: None,
            refusals: Throttle::new(Duration::from_secs(5)),
        }
    }

    /// Answers one `RenewCertificate`: the new chain, or why not.
    pub fn answer(&mut self, csr_der: &[u8]) {
        let now = Instant::now();
        let answer = match &self.certified {
            None => Err(
                "this session is not authenticated by a node certificate, so there is none to renew (the coordinator does not authenticate nodes)"
                    .to_owned(),
            ),
            Some(certified) => match too_soon(self.last_signed, now, certified.lifetime) {
                Some(wait) => Err(format!(
                    "a certificate was renewed on this session less than {:?} ago; ask again in {wait:?}",
                    renewal_gap(certified.lifetime)
                )),
                None => {
                    let renewed = certified.renew(csr_der);
                    if renewed.is_ok() {
                        self.last_signed = Some(now);
                    }
                    renewed
                }
            },
        };
        if let Err(err) = &answer
            && let Some(refused) = self.refusals.hit(now)
        {
            tracing::info!(error = %err, refused, "refused a certificate renewal");
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_session_gets_one_signed_renewal_per_twentieth_of_the_lifetime_within_1_to_60_s() {
        let start = Instant::now();
        let day = Duration::from_secs(24 * 3600);
        assert_eq!(too_soon(None, start, day), None, "the first is signed");
        let signed = Some(start);
        let at = |secs| start + Duration::from_secs(secs);
        assert_eq!(too_soon(signed, at(1), day), Some(Duration::from_secs(59)));
        assert_eq!(too_soon(signed, at(59), day), Some(Duration::from_secs(1)));
        assert_eq!(too_soon(signed, at(60), day), None);
        // Short lifetimes (tests, a cautious operator) keep renewing.
        let minute = Duration::from_secs(60);
        assert_eq!(
            too_soon(signed, at(2), minute),
            Some(Duration::from_secs(1))
        );
        assert_eq!(too_soon(signed, at(3), minute), None);
        assert_eq!(too_soon(signed, at(1), Duration::from_secs(5)), None);
    }
}
