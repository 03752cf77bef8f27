//! Client-side TLS to a coordinator, shared by `weft-client`, `weft-node`
//! and the `weft` CLI: the CA pin format, how a client decides to trust a
//! coordinator ([`Trust`]), and the connector that dials TCP and runs the
//! TLS handshake for a tonic `Endpoint` ([`TlsConnector`]).
//!
//! The coordinator's certificates come from its own cluster CA (`ca.pem` in
//! its data dir), never from a public CA, so a client trusts either:
//! - that CA's certificate, given as a PEM file ([`Trust::CaFile`]): the
//!   usual WebPKI chain check (signature chain up to the CA, validity
//!   dates, the server name in the leaf's SANs); or
//! - its pin ([`Trust::Pin`], `sha256:` + the hex SHA-256 of the CA
//!   certificate's DER, what [`ca_pin`] computes): the coordinator sends its
//!   chain (leaf, then the CA); the certificate of that chain whose SHA-256
//!   equals the pin becomes the only trust anchor, and the same WebPKI check
//!   as with a file then runs on the leaf (signed by that anchor, within its
//!   dates, valid for the name dialed). A chain with no certificate matching
//!   the pin is refused.
//!
//! Ring is the only crypto provider. Handshake failures are turned into
//! messages that say what to pass instead, with why as a value
//! ([`HandshakeError`], see [`TlsConnector`]).

use std::fmt;
use std::future::Future;
use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use hyper_util::rt::TokioIo;
use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::sign::CertifiedKey;
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
};
use sha2::{Digest, Sha256};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

/// Prefix of a CA pin.
pub const PIN_PREFIX: &str = "sha256:";

/// The pin of a CA certificate: `sha256:` + the lowercase hex SHA-256 of
/// its DER. Join tokens and `--ca-pin` carry this form.
pub fn ca_pin(cert_der: &[u8]) -> String {
    format!("{PIN_PREFIX}{}", hex::encode(Sha256::digest(cert_der)))
}

/// The one crypto provider (ring; rustls marks it deprecated for lacking
/// post-quantum key exchange, which only aws-lc offers, and the project
/// builds without aws-lc).
#[allow(deprecated)]
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Why a trust setting could not be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// The CA file could not be read.
    #[error("reading the CA file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// The CA file holds no usable certificate.
    #[error("the CA file {0} holds no PEM certificate (expected the cluster's ca.pem)")]
    NoCertificate(PathBuf),
    /// A pin that is not `sha256:` + 64 hex digits.
    #[error("invalid CA pin '{0}': expected sha256: followed by 64 hex digits")]
    BadPin(String),
    /// rustls refused the settings.
    #[error("TLS settings: {0}")]
    Rustls(#[from] rustls::Error),
    /// A node's own certificate or key could not be used.
    #[error("the node's certificate: {0}")]
    Identity(String),
    /// An `https://` coordinator with nothing to trust it by.
    #[error(
        "the coordinator at {0} serves TLS: pass the cluster's ca.pem (--ca-file / WEFT_CA) \
         or its pin (--ca-pin / WEFT_CA_PIN); for a coordinator started with --insecure, \
         use http://HOST:PORT"
    )]
    NoTrust(String),
    /// An `http://` coordinator with a CA or pin given: plaintext would
    /// quietly drop the check the trust asks for.
    #[error(
        "{0} is plaintext, but a CA or pin was given: dial https://{1} (or {1}) to check the \
         coordinator's certificate, or drop the CA/pin for a coordinator started with --insecure"
    )]
    PlaintextWithTrust(String, String),
}

/// How a client trusts the coordinator's certificate.
#[derive(Clone, PartialEq, Eq)]
pub enum Trust {
    /// The cluster CA certificate(s) from this PEM file.
    CaFile(PathBuf),
    /// The CA whose certificate has this SHA-256 (raw digest).
    Pin([u8; 32]),
}

impl fmt::Debug for Trust {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Trust::CaFile(path) => write!(f, "CaFile({})", path.display()),
            Trust::Pin(digest) => write!(f, "Pin({PIN_PREFIX}{})", hex::encode(digest)),
        }
    }
}

impl Trust {
    /// Parses a pin (`sha256:HEX`, case-insensitive hex, blanks trimmed).
    pub fn pin(text: &str) -> Result<Trust, TlsError> {
        let bad = || TlsError::BadPin(text.to_owned());
        let trimmed = text.trim();
        let hex_part = trimmed
            .strip_prefix(PIN_PREFIX)
            .or_else(|| trimmed.strip_prefix("SHA256:"))
            .ok_or_else(bad)?;
        let bytes = hex::decode(hex_part).map_err(|_| bad())?;
        let digest: [u8; 32] = bytes.try_into().map_err(|_| bad())?;
        Ok(Trust::Pin(digest))
    }

    /// The pin as text (`sha256:HEX`), for a pin; `None` for a file.
    pub fn pin_text(&self) -> Option<String> {
        match self {
            Trust::Pin(digest) => Some(format!("{PIN_PREFIX}{}", hex::encode(digest))),
            Trust::CaFile(_) => None,
        }
    }

    /// What is trusted, for messages: `the CA in FILE` or `the CA pin sha256:...`.
    pub fn describe(&self) -> String {
        match self {
            Trust::CaFile(path) => format!("the CA in {}", path.display()),
            Trust::Pin(digest) => format!("the CA pin {PIN_PREFIX}{}", hex::encode(digest)),
        }
    }

    /// A rustls client configuration (ALPN h2) trusting this.
    pub fn client_config(&self) -> Result<Arc<ClientConfig>, TlsError> {
        self.client_config_as(None)
    }

    /// [`client_config`](Self::client_config) that also presents
    /// `identity` (a node's certificate) when the server asks for one.
    /// With an identity, sessions are never resumed, so every connection
    /// presents the identity's current certificate.
    pub fn client_config_as(
        &self,
        identity: Option<Arc<ClientIdentity>>,
    ) -> Result<Arc<ClientConfig>, TlsError> {
        let provider = provider();
        let builder = ClientConfig::builder_with_provider(Arc::clone(&provider))
            .with_safe_default_protocol_versions()?;
        // A resumed TLS session carries the client certificate of the one
        // it resumes: after a renewal the node would go on presenting its
        // old certificate (and, once that expired, one the coordinator must
        // refuse). A node's connections therefore always run a full
        // handshake; they are few and long-lived.
        let resume = identity.is_none();
        let mut config = match self {
            Trust::CaFile(path) => {
                let roots = Arc::new(read_roots(path)?);
                let verifier = WebPkiServerVerifier::builder_with_provider(roots, provider)
                    .build()
                    .map_err(|err| TlsError::Rustls(rustls::Error::General(err.to_string())))?;
                let builder = builder.with_webpki_verifier(verifier);
                match identity {
                    Some(identity) => builder.with_client_cert_resolver(identity),
                    None => builder.with_no_client_auth(),
                }
            }
            Trust::Pin(digest) => {
                let builder = builder
                    .dangerous()
                    .with_custom_certificate_verifier(Arc::new(PinVerifier {
                        digest: *digest,
                        provider,
                    }));
                match identity {
                    Some(identity) => builder.with_client_cert_resolver(identity),
                    None => builder.with_no_client_auth(),
                }
            }
        };
        config.alpn_protocols = vec![b"h2".to_vec()];
        if !resume {
            config.resumption = rustls::client::Resumption::disabled();
        }
        Ok(Arc::new(config))
    }
}

/// A node's TLS client certificate and key, presented when the
/// coordinator asks for one. Swappable: after a renewal, [`set_pem`]
/// makes the new certificate the one the next handshakes present, while
/// connections already made keep theirs.
///
/// [`set_pem`]: ClientIdentity::set_pem
pub struct ClientIdentity {
    current: std::sync::RwLock<Arc<CertifiedKey>>,
}

impl fmt::Debug for ClientIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientIdentity").finish_non_exhaustive()
    }
}

/// A certificate chain (PEM, leaf first) and its PKCS#8 key (PEM) as a
/// rustls signing identity.
fn certified_key(chain_pem: &str, key_pem: &str) -> Result<Arc<CertifiedKey>, TlsError> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(chain_pem.as_bytes())
        .collect::<Result<_, _>>()
        .map_err(|err| TlsError::Identity(format!("reading the certificate: {err}")))?;
    if chain.is_empty() {
        return Err(TlsError::Identity("no certificate in the chain".into()));
    }
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())
        .map_err(|err| TlsError::Identity(format!("reading the private key: {err}")))?;
    let signing = provider()
        .key_provider
        .load_private_key(key)
        .map_err(|err| TlsError::Identity(format!("loading the private key: {err}")))?;
    let key = CertifiedKey::new(chain, signing);
    key.keys_match()
        .map_err(|err| TlsError::Identity(format!("the key is not the certificate's: {err}")))?;
    Ok(Arc::new(key))
}

impl ClientIdentity {
    /// An identity from a PEM chain (leaf first) and a PEM private key.
    pub fn from_pem(chain_pem: &str, key_pem: &str) -> Result<Arc<ClientIdentity>, TlsError> {
        Ok(Arc::new(ClientIdentity {
            current: std::sync::RwLock::new(certified_key(chain_pem, key_pem)?),
        }))
    }

    /// Replaces the certificate and key the next handshakes present.
    pub fn set_pem(&self, chain_pem: &str, key_pem: &str) -> Result<(), TlsError> {
        let key = certified_key(chain_pem, key_pem)?;
        match self.current.write() {
            Ok(mut current) => *current = key,
            Err(poisoned) => *poisoned.into_inner() = key,
        }
        Ok(())
    }

    fn get(&self) -> Arc<CertifiedKey> {
        match self.current.read() {
            Ok(current) => Arc::clone(&current),
            Err(poisoned) => Arc::clone(&poisoned.into_inner()),
        }
    }
}

impl rustls::client::ResolvesClientCert for ClientIdentity {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        Some(self.get())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// The certificates of a PEM file as trust anchors.
pub fn read_roots(path: &Path) -> Result<RootCertStore, TlsError> {
    let pem = std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_owned(),
        source,
    })?;
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(&pem).flatten() {
        // A certificate rustls cannot use as an anchor is skipped; none at
        // all is the error below.
        let _ = roots.add(cert);
    }
    if roots.is_empty() {
        return Err(TlsError::NoCertificate(path.to_owned()));
    }
    Ok(roots)
}

/// Trusts the chain's certificate whose SHA-256 is the pin as the only
/// anchor, then checks the leaf against it as WebPKI does.
#[derive(Debug)]
struct PinVerifier {
    digest: [u8; 32],
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for PinVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let pinned = std::iter::once(end_entity)
            .chain(intermediates)
            .find(|cert| Sha256::digest(cert.as_ref()).as_slice() == self.digest)
            .ok_or(rustls::Error::InvalidCertificate(
                CertificateError::ApplicationVerificationFailure,
            ))?;
        let mut roots = RootCertStore::empty();
        roots.add(pinned.clone().into_owned())?;
        let verifier = WebPkiServerVerifier::builder_with_provider(
            Arc::new(roots),
            Arc::clone(&self.provider),
        )
        .build()
        .map_err(|err| rustls::Error::General(err.to_string()))?;
        verifier.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// A tower connector for `Endpoint::connect_with_connector`: dials TCP
/// (no delay), runs the TLS handshake for `host`, and turns a refused
/// certificate into a message that says what to pass. The endpoint's own
/// URL must then be `http://` (tonic would otherwise want its own TLS).
#[derive(Clone)]
pub struct TlsConnector {
    config: Arc<ClientConfig>,
    trust: Arc<Trust>,
    host: String,
    port: u16,
}

impl TlsConnector {
    /// A connector to `addr` trusting `trust`.
    pub fn new(addr: &crate::CoordinatorAddr, trust: &Trust) -> Result<TlsConnector, TlsError> {
        TlsConnector::new_as(addr, trust, None)
    }

    /// A connector to `addr` trusting `trust` that presents `identity` (a
    /// node's certificate) when asked.
    pub fn new_as(
        addr: &crate::CoordinatorAddr,
        trust: &Trust,
        identity: Option<Arc<ClientIdentity>>,
    ) -> Result<TlsConnector, TlsError> {
        Ok(TlsConnector {
            config: trust.client_config_as(identity)?,
            trust: Arc::new(trust.clone()),
            host: addr.host().to_owned(),
            port: addr.port(),
        })
    }

    /// Dials and runs the handshake.
    pub async fn connect(&self) -> io::Result<TlsStream<TcpStream>> {
        let host = self
            .host
            .strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
            .unwrap_or(&self.host);
        let name = ServerName::try_from(host.to_owned()).map_err(|_| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("invalid host name '{host}'"),
            )
        })?;
        let tcp = connect_any_address(host, self.port).await?;
        let _ = tcp.set_nodelay(true);
        tokio_rustls::TlsConnector::from(Arc::clone(&self.config))
            .connect(name, tcp)
            .await
            .map_err(|err| explain(err, &self.trust, host, self.port))
    }
}

/// How long one address of a name that resolves to several has to
/// accept a connection before the next is dialed too (a host that is down
/// answers nothing).
pub const ADDRESS_STAGGER: std::time::Duration = std::time::Duration::from_millis(250);

/// Dials `host:port` over every address the name resolves to, Happy
/// Eyeballs style: the first at once, the next when one is refused or
/// after [`ADDRESS_STAGGER`] without an answer, the first to connect wins
/// (the others are dropped). So one name can stand for several
/// coordinators, of which only the active one accepts connections, and
/// hosts that are down cost a quarter second each, within any connect
/// timeout around this.
async fn connect_any_address(host: &str, port: u16) -> io::Result<TcpStream> {
    let addrs = tokio::net::lookup_host((host, port)).await?;
    race_addresses(addrs, host).await
}

/// [`connect_any_address`] over addresses already resolved from `host`.
async fn race_addresses(
    mut addrs: impl Iterator<Item = std::net::SocketAddr>,
    host: &str,
) -> io::Result<TcpStream> {
    let mut racing = tokio::task::JoinSet::new();
    let mut last = io::Error::new(
        io::ErrorKind::NotFound,
        format!("'{host}' resolves to no address"),
    );
    let mut exhausted = false;
    let mut dial_next = true;
    loop {
        if dial_next && !exhausted {
            match addrs.next() {
                Some(addr) => {
                    racing.spawn(TcpStream::connect(addr));
                }
                None => exhausted = true,
            }
            dial_next = false;
        }
        if racing.is_empty() {
            return Err(last);
        }
        tokio::select! {
            done = racing.join_next() => match done {
                Some(Ok(Ok(tcp))) => return Ok(tcp),
                Some(Ok(Err(err))) => {
                    last = err;
                    dial_next = true;
                }
                Some(Err(join)) => {
                    last = io::Error::other(join);
                    dial_next = true;
                }
                None => {}
            },
            () = tokio::time::sleep(ADDRESS_STAGGER), if !exhausted => dial_next = true,
        }
    }
}

impl fmt::Debug for TlsConnector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsConnector")
            .field("trust", &self.trust)
            .field("host", &self.host)
            .field("port", &self.port)
            .finish()
    }
}

/// How to dial `addr`: the URL to give tonic's `Endpoint` and, for
/// `https://`, the connector that runs TLS trusting `trust` (the URL is
/// then `http://`, since the connector already does TLS). `http://` dials
/// plainly; with a `trust` it is [`TlsError::PlaintextWithTrust`] (the
/// caller asked for a check plaintext cannot make). `https://` without a
/// trust is [`TlsError::NoTrust`].
pub fn dial_plan(
    addr: &crate::CoordinatorAddr,
    trust: Option<&Trust>,
) -> Result<(String, Option<TlsConnector>), TlsError> {
    dial_plan_as(addr, trust, None)
}

/// [`dial_plan`] presenting `identity` (a node's certificate) over
/// `https://`; plaintext has no client certificates, so it is unused
/// there.
pub fn dial_plan_as(
    addr: &crate::CoordinatorAddr,
    trust: Option<&Trust>,
    identity: Option<Arc<ClientIdentity>>,
) -> Result<(String, Option<TlsConnector>), TlsError> {
    match addr.scheme() {
        crate::address::Scheme::Http => match trust {
            None => Ok((addr.url(), None)),
            Some(_) => Err(TlsError::PlaintextWithTrust(
                addr.url(),
                addr.authority().to_string(),
            )),
        },
        crate::address::Scheme::Https => {
            let trust = trust.ok_or_else(|| TlsError::NoTrust(addr.url()))?;
            let connector = TlsConnector::new_as(addr, trust, identity)?;
            Ok((format!("http://{}", addr.authority()), Some(connector)))
        }
    }
}

/// A hint added to a failed plaintext dial: the coordinator probably
/// serves TLS.
pub fn plaintext_hint(addr: &crate::CoordinatorAddr) -> String {
    format!(
        "if the coordinator serves TLS (the default), dial https://{0} (or {0}) and pass \
         its ca.pem (--ca-file / WEFT_CA) or pin (--ca-pin / WEFT_CA_PIN)",
        addr.authority()
    )
}

/// Why a TLS handshake with a coordinator failed, for callers that decide
/// on it (a join gives up on [`HandshakeFailure::Untrusted`] alone).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HandshakeFailure {
    /// The coordinator's chain is not the trusted CA's: an unknown
    /// issuer, a bad signature, or no certificate matching the pin.
    /// Asking again gets the same chain.
    Untrusted,
    /// The certificate does not name the host dialed.
    WrongName,
    /// The certificate is outside its dates here (expired, or not valid
    /// yet): a clock, or a certificate being renewed.
    Dates,
    /// The peer answered with something that is not TLS.
    NotTls,
    /// The connection closed during the handshake (a coordinator
    /// stopping, a proxy dropping it, or one serving plaintext).
    Closed,
    /// Any other refusal of rustls'.
    Other,
}

/// A failed handshake as [`TlsConnector`] reports it: the io error it
/// answers carries this, with a message that says what to do.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct HandshakeError {
    /// Why, as a value.
    pub failure: HandshakeFailure,
    /// What to do, in words (the error's `Display`).
    message: String,
}

impl HandshakeError {
    /// The handshake error somewhere in `error`'s chain of sources (as
    /// tonic and hyper wrap the connector's io error), if any.
    pub fn find<'a>(error: &'a (dyn std::error::Error + 'static)) -> Option<&'a HandshakeError> {
        let mut cause = Some(error);
        while let Some(current) = cause {
            if let Some(found) = current.downcast_ref::<HandshakeError>() {
                return Some(found);
            }
            // An io error's `source()` skips the error it wraps.
            if let Some(found) = current
                .downcast_ref::<io::Error>()
                .and_then(io::Error::get_ref)
                .and_then(|inner| inner.downcast_ref::<HandshakeError>())
            {
                return Some(found);
            }
            cause = current.source();
        }
        None
    }
}

/// A handshake error as a message that says what to do, carried in a
/// [`HandshakeError`] (the io error keeps its kind).
fn explain(err: io::Error, trust: &Trust, host: &str, port: u16) -> io::Error {
    let rustls_error = err
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        .cloned();
    let (failure, message) = match rustls_error {
        Some(rustls::Error::InvalidCertificate(CertificateError::NotValidForName))
        | Some(rustls::Error::InvalidCertificate(CertificateError::NotValidForNameContext {
            ..
        })) => (
            HandshakeFailure::WrongName,
            format!(
                "the coordinator's certificate does not name '{host}': dial a name it was \
                 started with, or restart it with --advertise {host}"
            ),
        ),
        Some(rustls::Error::InvalidCertificate(
            CertificateError::Expired | CertificateError::ExpiredContext { .. },
        )) => (
            HandshakeFailure::Dates,
            "the coordinator's certificate has expired (is this machine's clock right?)".to_owned(),
        ),
        Some(rustls::Error::InvalidCertificate(
            CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. },
        )) => (
            HandshakeFailure::Dates,
            "the coordinator's certificate is not valid yet (is this machine's clock right?)"
                .to_owned(),
        ),
        Some(rustls::Error::InvalidCertificate(
            CertificateError::UnknownIssuer
            | CertificateError::BadSignature
            | CertificateError::ApplicationVerificationFailure,
        )) => (
            HandshakeFailure::Untrusted,
            match trust {
                Trust::CaFile(path) => format!(
                    "the coordinator's certificate is not signed by the CA in {}: pass the \
                     cluster's ca.pem (--ca-file / WEFT_CA) or its pin (--ca-pin / WEFT_CA_PIN)",
                    path.display()
                ),
                Trust::Pin(_) => format!(
                    "the coordinator's certificate chain does not match {}: pass the pin the \
                     coordinator printed (--ca-pin / WEFT_CA_PIN) or its ca.pem (--ca-file / WEFT_CA)",
                    trust.describe()
                ),
            },
        ),
        Some(rustls::Error::InvalidMessage(_)) => (
            HandshakeFailure::NotTls,
            format!(
                "the coordinator at {host}:{port} does not speak TLS: if it was started \
                 with --insecure, dial http://{host}:{port}"
            ),
        ),
        Some(other) => (
            HandshakeFailure::Other,
            format!("TLS handshake with the coordinator failed: {other}"),
        ),
        None if err.kind() == io::ErrorKind::UnexpectedEof => (
            HandshakeFailure::Closed,
            format!(
                "the coordinator at {host}:{port} closed the connection during the TLS handshake \
                 (is it started with --insecure? then dial http://{host}:{port})"
            ),
        ),
        None => return err,
    };
    io::Error::new(err.kind(), HandshakeError { failure, message })
}

impl tower_service::Service<http::Uri> for TlsConnector {
    type Response = TokioIo<TlsStream<TcpStream>>;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<Self::Response>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _uri: http::Uri) -> Self::Future {
        let connector = self.clone();
        Box::pin(async move { connector.connect().await.map(TokioIo::new) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A name standing for a refused address, a silent one (a host that
    /// is down, or no route at all) and the live one: the live one is
    /// reached, within a few staggers, whatever comes first.
    #[tokio::test]
    async fn a_name_for_several_addresses_reaches_the_one_that_accepts() {
        let live = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let live_addr = live.local_addr().unwrap();
        let refused = {
            let gone = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            gone.local_addr().unwrap()
        };
        // TEST-NET-1 (RFC 5737): never routed; silent or unreachable.
        let silent: std::net::SocketAddr = "192.0.2.1:7070".parse().unwrap();
        let started = std::time::Instant::now();
        let addrs = vec![refused, silent, live_addr];
        let tcp = race_addresses(addrs.into_iter(), "coordinators")
            .await
            .expect("the live address is reached");
        assert_eq!(tcp.peer_addr().unwrap(), live_addr);
        assert!(
            started.elapsed() < 4 * ADDRESS_STAGGER,
            "{:?}",
            started.elapsed()
        );
        // Nothing that accepts: the last error, promptly.
        let err = race_addresses(vec![refused].into_iter(), "coordinators")
            .await
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::ConnectionRefused, "{err}");
        let err = race_addresses(std::iter::empty(), "nowhere")
            .await
            .unwrap_err();
        assert!(err.to_string().contains("resolves to no address"), "{err}");
    }

    #[test]
    fn pins_are_sha256_of_the_der_and_parse_back() {
        let pin = ca_pin(b"abc");
        assert_eq!(
            pin,
            "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        let Trust::Pin(digest) = Trust::pin(&pin).unwrap() else {
            panic!("not a pin")
        };
        assert_eq!(format!("sha256:{}", hex::encode(digest)), pin);
        assert_eq!(
            Trust::pin(&pin.to_uppercase().replace("SHA256", "sha256")).unwrap(),
            Trust::Pin(digest)
        );
        for bad in ["", "ba7816bf", "sha256:xyz", "md5:ba78", "sha256:ba78"] {
            let err = Trust::pin(bad).unwrap_err();
            assert!(err.to_string().contains("expected sha256:"), "{err}");
        }
    }

    #[test]
    fn a_ca_file_without_a_certificate_is_refused_by_name() {
        let dir = std::env::temp_dir().join(format!("weft-tls-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("empty.pem");
        std::fs::write(&path, "not a certificate").unwrap();
        let err = Trust::CaFile(path.clone()).client_config().unwrap_err();
        assert!(
            err.to_string().contains("holds no PEM certificate"),
            "{err}"
        );
        let missing = Trust::CaFile(dir.join("missing.pem"))
            .client_config()
            .unwrap_err();
        assert!(missing.to_string().contains("missing.pem"), "{missing}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A CA with rcgen's default name (so a forged CA has the same one).
    fn ca() -> (
        CertificateDer<'static>,
        rcgen::Issuer<'static, rcgen::KeyPair>,
    ) {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::DigitalSignature,
        ];
        let cert = params.self_signed(&key).unwrap();
        (cert.der().clone(), rcgen::Issuer::new(params, key))
    }

    fn leaf(
        name: &str,
        issuer: &rcgen::Issuer<'static, rcgen::KeyPair>,
    ) -> CertificateDer<'static> {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(vec![name.to_owned()]).unwrap();
        params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
        params.signed_by(&key, issuer).unwrap().der().clone()
    }

    fn verify_pinned(
        pinned: &CertificateDer<'_>,
        leaf: &CertificateDer<'_>,
        chain: &[CertificateDer<'_>],
        name: &str,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let Trust::Pin(digest) = Trust::pin(&ca_pin(pinned)).unwrap() else {
            panic!("not a pin")
        };
        let verifier = PinVerifier {
            digest,
            provider: provider(),
        };
        let name = ServerName::try_from(name.to_owned()).unwrap();
        verifier.verify_server_cert(leaf, chain, &name, &[], UnixTime::now())
    }

    #[test]
    fn a_pin_accepts_a_leaf_its_ca_signed_for_the_name() {
        let (ca_der, issuer) = ca();
        let leaf = leaf("coordinator.test", &issuer);
        verify_pinned(
            &ca_der,
            &leaf,
            std::slice::from_ref(&ca_der),
            "coordinator.test",
        )
        .unwrap();
    }

    #[test]
    fn a_pin_refuses_a_leaf_signed_by_another_key_though_the_chain_holds_the_ca() {
        let (ca_der, _issuer) = ca();
        let (_forged_der, forged) = ca();
        let leaf = leaf("coordinator.test", &forged);
        let err = verify_pinned(
            &ca_der,
            &leaf,
            std::slice::from_ref(&ca_der),
            "coordinator.test",
        )
        .expect_err("a leaf the pinned CA did not sign");
        assert!(
            matches!(err, rustls::Error::InvalidCertificate(_)),
            "{err:?}"
        );
    }

    #[test]
    fn a_pin_refuses_a_leaf_for_another_name() {
        let (ca_der, issuer) = ca();
        let leaf = leaf("coordinator.test", &issuer);
        let err = verify_pinned(
            &ca_der,
            &leaf,
            std::slice::from_ref(&ca_der),
            "elsewhere.test",
        )
        .expect_err("a leaf for another name");
        assert!(
            matches!(
                err,
                rustls::Error::InvalidCertificate(CertificateError::NotValidForName)
                    | rustls::Error::InvalidCertificate(
                        CertificateError::NotValidForNameContext { .. }
                    )
            ),
            "{err:?}"
        );
    }

    #[test]
    fn a_pin_refuses_a_chain_without_the_pinned_certificate() {
        let (ca_der, issuer) = ca();
        let (other_der, _) = ca();
        let leaf = leaf("coordinator.test", &issuer);
        verify_pinned(
            &other_der,
            &leaf,
            std::slice::from_ref(&ca_der),
            "coordinator.test",
        )
        .expect_err("the pinned certificate is not in the chain");
    }

    #[test]
    fn http_with_a_ca_or_pin_is_refused() {
        let addr = crate::CoordinatorAddr::parse("http://127.0.0.1:7070").unwrap();
        assert!(dial_plan(&addr, None).unwrap().1.is_none());
        for trust in [
            Trust::CaFile("ca.pem".into()),
            Trust::pin(&ca_pin(b"abc")).unwrap(),
        ] {
            let err = dial_plan(&addr, Some(&trust)).unwrap_err();
            assert!(matches!(err, TlsError::PlaintextWithTrust(..)), "{err}");
            assert!(err.to_string().contains("https://127.0.0.1:7070"), "{err}");
        }
    }
}
