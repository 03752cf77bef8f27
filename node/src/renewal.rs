//! The node's certificate while it runs ([`Credentials`]) and its renewal
//! over the live session.
//!
//! When: at 2/3 of the certificate's lifetime, measured from `not_before`
//! to `not_after` ([`renew_at`]). The request (`RenewCertificate`, a CSR
//! signed with a new key) goes out on the session; the answer
//! (`NodeCertificate`) is saved atomically (key and chain, in the state
//! dir if there is one) and swapped into the [`ClientIdentity`] every dial
//! presents, so the next connection uses it while the live session and
//! its attempts go on untouched. A refusal, an answer that does not fit
//! the key, a failed save, or no answer at all: logged, and tried again at
//! a tenth of the remaining time, at least a second later ([`retry_at`]).
//! The keys of the last few requests are kept ([`PENDING_KEYS`]): near
//! expiry requests go out every second, and an answer that comes after
//! the next request (a congested session) is still taken, while it
//! cannot spoil the answer to that next one either.
//!
//! The timing is plain functions of `now`; `Credentials` holds the state.
//! This module never touches the stream: the session asks for a request
//! when due and hands over the answer (`session.rs`, encoded by
//! `codec.rs`).

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use tracing::{info, warn};

use weft_proto::NodeId;
use weft_proto::tls::ClientIdentity;

use crate::error::Error;
use crate::identity::{StateDir, Stored, Validity, leaf_validity};
use crate::join::key_and_request;

/// The shortest wait before a renewal: a retry, or the next renewal right
/// after one (a certificate whose 2/3 point is already past must not make
/// the node renew in a loop).
pub(crate) const MIN_WAIT: Duration = Duration::from_secs(1);

/// How many requests' keys are kept for their answers: the newest, and
/// the ones before it whose answers may still be on the way.
pub(crate) const PENDING_KEYS: usize = 4;

/// When to renew a certificate: at 2/3 of its lifetime.
pub(crate) fn renew_at(validity: Validity) -> SystemTime {
    let lifetime = validity
        .not_after
        .duration_since(validity.not_before)
        .unwrap_or_default();
    validity.not_before + lifetime * 2 / 3
}

/// When to try again after a renewal failed at `now`: a tenth of the time
/// left before `not_after`, at least [`MIN_WAIT`].
pub(crate) fn retry_at(now: SystemTime, not_after: SystemTime) -> SystemTime {
    let left = not_after.duration_since(now).unwrap_or_default();
    now + (left / 10).max(MIN_WAIT)
}

/// When to renew a certificate received at `now`: at [`renew_at`], but
/// not sooner than [`MIN_WAIT`] from now.
pub(crate) fn next_renewal(now: SystemTime, validity: Validity) -> SystemTime {
    renew_at(validity).max(now + MIN_WAIT)
}

/// The node's identity while it runs: its id and name, the certificate
/// every dial presents (one [`ClientIdentity`], shared for the node's
/// life), where it is kept, and the renewal's state.
pub(crate) struct Credentials {
    node_id: NodeId,
    name: String,
    client: Arc<ClientIdentity>,
    /// `None`: kept in memory only (an embedded node without a state dir).
    store: Option<StateDir>,
    state: Mutex<State>,
}

struct State {
    validity: Validity,
    /// When to send the next request (or, one being out, when to give up
    /// waiting for its answer and send another).
    next: SystemTime,
    /// The new keys of the requests in flight, oldest first, at most
    /// [`PENDING_KEYS`]: an answer must certify one of them.
    pending: VecDeque<rcgen::KeyPair>,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("node_id", &self.node_id)
            .field("name", &self.name)
            .field("store", &self.store)
            .finish_non_exhaustive()
    }
}

impl Credentials {
    /// The credentials of `stored` (whose certificate has `validity`);
    /// renewals are saved in `store`, if any.
    pub(crate) fn new(
        stored: &Stored,
        validity: Validity,
        store: Option<StateDir>,
    ) -> Result<Credentials, Error> {
        let client = ClientIdentity::from_pem(&stored.chain_pem, &stored.key_pem)
            .map_err(|err| Error::Identity(err.to_string()))?;
        Ok(Credentials {
            node_id: stored.node_id,
            name: stored.name.clone(),
            client,
            store,
            state: Mutex::new(State {
                validity,
                next: renew_at(validity),
                pending: VecDeque::new(),
            }),
        })
    }

    /// The node id the certificate names.
    pub(crate) fn node_id(&self) -> NodeId {
        self.node_id
    }

    /// The certificate every dial presents (swapped on renewal).
    pub(crate) fn client(&self) -> Arc<ClientIdentity> {
        Arc::clone(&self.client)
    }

    /// When the current certificate expires.
    pub(crate) fn not_after(&self) -> SystemTime {
        self.state().validity.not_after
    }

    /// Where the identity is kept, if anywhere.
    pub(crate) fn store(&self) -> Option<&StateDir> {
        self.store.as_ref()
    }

    /// When the session should next call [`request`](Self::request).
    pub(crate) fn next_at(&self) -> SystemTime {
        self.state().next
    }

    /// If a renewal is due at `now`: a new key, and the CSR (DER) to send
    /// in `RenewCertificate`. Whatever happens, the next one is due at
    /// [`retry_at`] unless an answer comes first.
    pub(crate) fn request(&self, now: SystemTime) -> Option<Result<Vec<u8>, String>> {
        let mut state = self.state();
        if now < state.next {
            return None;
        }
        state.next = retry_at(now, state.validity.not_after);
        Some(match key_and_request(&self.name) {
            Ok((key, csr)) => {
                if state.pending.len() == PENDING_KEYS {
                    state.pending.pop_front();
                }
                state.pending.push_back(key);
                Ok(csr)
            }
            Err(err) => Err(err.to_string()),
        })
    }

    /// Acts on the coordinator's answer, read at `now`: the new chain
    /// (PEM), or why it refused. Saves and swaps on success; logs either
    /// way.
    pub(crate) fn answer(&self, answer: Result<String, String>, now: SystemTime) {
        let mut state = self.state();
        let result = answer.and_then(|chain_pem| self.install(&mut state, &chain_pem, now));
        match result {
            Ok(validity) => {
                info!(
                    node_id = %self.node_id,
                    not_after = %humantime::format_rfc3339_seconds(validity.not_after),
                    "renewed the node's certificate"
                );
            }
            Err(error) => {
                state.next = retry_at(now, state.validity.not_after);
                let retry = state.next.duration_since(now).unwrap_or_default();
                warn!(
                    node_id = %self.node_id,
                    %error,
                    ?retry,
                    "renewing the node's certificate failed; trying again"
                );
            }
        }
    }

    /// Checks that `chain_pem` certifies one of the pending keys, saves
    /// both, and makes them the ones the next dials present. That key and
    /// older ones are then no longer pending (their answers would be
    /// older); newer ones stay, and nothing changes on failure, so a
    /// stale or foreign answer never costs the one in flight.
    fn install(
        &self,
        state: &mut State,
        chain_pem: &str,
        now: SystemTime,
    ) -> Result<Validity, String> {
        let mut refusal =
            String::from("a certificate this node did not ask for (or already installed)");
        let mut found = None;
        for (index, key) in state.pending.iter().enumerate().rev() {
            match leaf_validity(chain_pem, key.public_key_raw()) {
                Ok(validity) => {
                    found = Some((index, validity));
                    break;
                }
                Err(err) if index + 1 == state.pending.len() => refusal = err,
                Err(_) => {}
            }
        }
        let (index, validity) = found.ok_or(refusal)?;
        let key_pem = state.pending[index].serialize_pem();
        if let Some(store) = &self.store {
            store
                .save_certificate(&key_pem, chain_pem)
                .map_err(|err| format!("saving the new certificate: {err}"))?;
        }
        self.client
            .set_pem(chain_pem, &key_pem)
            .map_err(|err| err.to_string())?;
        state.pending.drain(..=index);
        state.validity = validity;
        state.next = next_renewal(now, validity);
        Ok(validity)
    }

    fn state(&self) -> MutexGuard<'_, State> {
        match self.state.lock() {
            Ok(state) => state,
            Err(poisoned) => poisoned.into_inner(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::tests::{issued, leaf};

    const SECOND: Duration = Duration::from_secs(1);

    fn at(secs: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000 + secs)
    }

    fn validity(from: u64, to: u64) -> Validity {
        Validity {
            not_before: at(from),
            not_after: at(to),
        }
    }

    #[test]
    fn renewal_is_due_at_two_thirds_of_the_lifetime_from_not_before() {
        assert_eq!(renew_at(validity(0, 300)), at(200));
        // A backdated not_before counts: the lifetime is measured from it.
        assert_eq!(renew_at(validity(100, 400)), at(300));
        // Seven days.
        let week = 7 * 24 * 3600;
        assert_eq!(renew_at(validity(0, week)), at(week * 2 / 3));
        // Nonsense (not_after first) renews at once rather than never.
        assert_eq!(renew_at(validity(50, 10)), at(50));
    }

    #[test]
    fn a_failed_renewal_is_retried_at_a_tenth_of_what_is_left_but_not_within_a_second() {
        assert_eq!(retry_at(at(200), at(300)), at(210));
        assert_eq!(retry_at(at(0), at(7 * 24 * 3600)), at(60_480));
        assert_eq!(retry_at(at(295), at(300)), at(295) + SECOND);
        assert_eq!(retry_at(at(400), at(300)), at(400) + SECOND, "expired");
    }

    #[test]
    fn a_renewed_certificate_is_next_renewed_at_its_own_two_thirds_or_a_second_on() {
        assert_eq!(next_renewal(at(200), validity(195, 495)), at(395));
        // Backdated past its 2/3 point (a lifetime shorter than the skew).
        assert_eq!(next_renewal(at(200), validity(100, 203)), at(201));
    }

    fn credentials(lifetime: Duration, store: Option<StateDir>) -> (Credentials, Validity) {
        let (key_pem, chain_pem, ca_pem) = issued(lifetime);
        let public = crate::identity::public_key_of(&key_pem).unwrap();
        let validity = leaf_validity(&chain_pem, &public).unwrap();
        let stored = Stored {
            node_id: NodeId::new(),
            name: "n1".into(),
            coordinator: "c:1".into(),
            key_pem,
            chain_pem,
            ca_pem,
        };
        if let Some(store) = &store {
            store.save(&stored).unwrap();
        }
        (
            Credentials::new(&stored, validity, store).unwrap(),
            validity,
        )
    }

    /// A CA for answers; the node's CSR is not parsed here (rcgen cannot
    /// without x509-parser's feature), so the answer certifies the
    /// pending key directly.
    fn answer_for(credentials: &Credentials, lifetime: Duration) -> String {
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        let issuer = rcgen::Issuer::new(ca, ca_key);
        let state = credentials.state();
        let key = state.pending.back().expect("a request in flight");
        leaf(key, &issuer, lifetime)
    }

    /// The validity of the leaf of `chain`, whatever key it certifies.
    fn validity_of(chain: &str) -> Validity {
        let (_, pem) = x509_parser::pem::parse_x509_pem(chain.as_bytes()).unwrap();
        let public = pem
            .parse_x509()
            .unwrap()
            .public_key()
            .subject_public_key
            .data
            .to_vec();
        leaf_validity(chain, &public).unwrap()
    }

    #[test]
    fn a_request_is_made_only_when_due_and_an_answer_is_saved_and_swapped() {
        let tmp = tempfile::tempdir().unwrap();
        let store = StateDir::new(tmp.path().join("state"));
        let (credentials, validity) = credentials(Duration::from_secs(3000), Some(store.clone()));
        let now = SystemTime::now();
        assert!(credentials.request(now).is_none(), "not due yet");
        let due = renew_at(validity);
        assert_eq!(credentials.next_at(), due);
        let csr = credentials.request(due).expect("due").unwrap();
        assert!(!csr.is_empty());
        // No answer yet: asked again at a tenth of what is left.
        assert_eq!(credentials.next_at(), retry_at(due, validity.not_after));
        let chain = answer_for(&credentials, Duration::from_secs(6000));
        let before = std::fs::read_to_string(store.path().join("node.key")).unwrap();
        credentials.answer(Ok(chain.clone()), now);
        let (stored, renewed) = store.load().unwrap().expect("still an identity");
        assert_eq!(stored.chain_pem, chain);
        assert_ne!(stored.key_pem, before, "a new key");
        assert_eq!(credentials.not_after(), renewed.not_after);
        assert_eq!(credentials.next_at(), next_renewal(now, renewed));
        // A second answer for the same request is not installed.
        credentials.answer(Ok(chain), now);
        assert_eq!(credentials.next_at(), retry_at(now, renewed.not_after));
    }

    #[test]
    fn a_refusal_or_a_certificate_for_another_key_is_retried_and_changes_nothing() {
        let (credentials, validity) = credentials(Duration::from_secs(3000), None);
        let due = renew_at(validity);
        credentials.request(due).unwrap().unwrap();
        credentials.answer(Err("malformed CSR".into()), due + SECOND);
        assert_eq!(
            credentials.next_at(),
            retry_at(due + SECOND, validity.not_after)
        );
        assert_eq!(credentials.not_after(), validity.not_after);

        let later = credentials.next_at();
        credentials.request(later).unwrap().unwrap();
        let (_, foreign, _) = issued(Duration::from_secs(6000));
        credentials.answer(Ok(foreign), later);
        assert_eq!(credentials.not_after(), validity.not_after, "unchanged");
        assert_eq!(credentials.next_at(), retry_at(later, validity.not_after));
    }

    #[test]
    fn late_answers_to_earlier_requests_are_taken_and_a_foreign_one_spoils_none() {
        let (credentials, validity) = credentials(Duration::from_secs(3000), None);
        let due = renew_at(validity);
        credentials.request(due).unwrap().unwrap();
        let first = answer_for(&credentials, Duration::from_secs(5000));
        let again = credentials.next_at();
        credentials.request(again).unwrap().unwrap();
        let second = answer_for(&credentials, Duration::from_secs(6000));
        let (first_validity, second_validity) = (validity_of(&first), validity_of(&second));
        assert_ne!(first_validity.not_after, second_validity.not_after);

        // An answer for no key of this node's: refused, both still pending.
        let (_, foreign, _) = issued(Duration::from_secs(6000));
        credentials.answer(Ok(foreign), again);
        assert_eq!(credentials.not_after(), validity.not_after, "unchanged");
        // The answer to the first request, after the second went out.
        credentials.answer(Ok(first.clone()), again);
        assert_eq!(credentials.not_after(), first_validity.not_after);
        // The answer to the second is taken too.
        let later = again + SECOND;
        credentials.answer(Ok(second), later);
        assert_eq!(credentials.not_after(), second_validity.not_after);
        assert_eq!(credentials.next_at(), next_renewal(later, second_validity));
        // The first again: its key is gone, nothing changes.
        credentials.answer(Ok(first), later);
        assert_eq!(credentials.not_after(), second_validity.not_after);
    }

    #[test]
    fn only_the_last_few_requests_keys_are_kept() {
        let (credentials, validity) = credentials(Duration::from_secs(3000), None);
        let mut now = renew_at(validity);
        let mut answers = Vec::new();
        for _ in 0..=PENDING_KEYS {
            credentials.request(now).unwrap().unwrap();
            answers.push(answer_for(&credentials, Duration::from_secs(5000)));
            now = credentials.next_at();
        }
        let oldest = answers.remove(0);
        credentials.answer(Ok(oldest), now);
        assert_eq!(credentials.not_after(), validity.not_after, "forgotten");
        let newest = answers.pop().unwrap();
        credentials.answer(Ok(newest.clone()), now);
        assert_eq!(credentials.not_after(), validity_of(&newest).not_after);
    }
}
