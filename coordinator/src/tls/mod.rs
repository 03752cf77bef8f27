//! TLS on the coordinator's listener: the cluster CA and serving
//! certificates ([`pki`]; on PostgreSQL the CA kept in the database,
//! [`shared_ca`]), the rustls server configuration with a
//! certificate that rotates without a restart ([`RotatingCert`]), and the
//! acceptor the listener (`crate::listener`) runs each handshake with.
//!
//! Clients are asked for a certificate but not required to give one; one
//! that is given must chain to the cluster CA (and, for rustls's client
//! verifier, have the clientAuth usage). Node certificates ([`node_cert`],
//! issued on join) are read from `Request::peer_certs()` by the node
//! service: the listener hands tonic `tokio_rustls` server streams, for
//! which tonic records the peer's chain.

pub mod interfaces;
pub mod node_cert;
pub mod pki;
pub mod revoked;
pub mod shared_ca;

use std::fmt;
use std::io;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use rcgen::SanType;
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{RootCertStore, ServerConfig};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

use pki::{Ca, PkiError};

/// Default lifetime of a serving certificate.
pub const DEFAULT_CERT_LIFETIME: Duration = Duration::from_secs(7 * 24 * 60 * 60);

/// TLS settings of a coordinator.
#[derive(Clone, Debug)]
pub struct TlsConfig {
    /// Where `ca.pem` and `ca.key` live (made if missing). `None`: a
    /// private temp dir removed when the coordinator stops (a CA that
    /// lives as long as the process: `weft local`, tests).
    pub pki_dir: Option<PathBuf>,
    /// More names (DNS or IP) for the serving certificate, besides the
    /// listen address, the host name and the loopback names.
    pub advertise: Vec<String>,
    /// Lifetime of each serving certificate; the next is issued at 2/3 of it.
    pub cert_lifetime: Duration,
}

impl Default for TlsConfig {
    fn default() -> Self {
        TlsConfig {
            pki_dir: None,
            advertise: Vec::new(),
            cert_lifetime: DEFAULT_CERT_LIFETIME,
        }
    }
}

/// The serving certificate new handshakes get; swapped by the rotation
/// task. Live connections keep the certificate they were made with.
pub struct RotatingCert {
    current: RwLock<Arc<CertifiedKey>>,
}

impl fmt::Debug for RotatingCert {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RotatingCert").finish_non_exhaustive()
    }
}

impl RotatingCert {
    fn new(key: Arc<CertifiedKey>) -> RotatingCert {
        RotatingCert {
            current: RwLock::new(key),
        }
    }

    fn set(&self, key: Arc<CertifiedKey>) {
        match self.current.write() {
            Ok(mut current) => *current = key,
            Err(poisoned) => *poisoned.into_inner() = key,
        }
    }

    fn get(&self) -> Arc<CertifiedKey> {
        match self.current.read() {
            Ok(current) => Arc::clone(&current),
            Err(poisoned) => Arc::clone(&poisoned.into_inner()),
        }
    }
}

impl ResolvesServerCert for RotatingCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.get())
    }
}

/// The coordinator's PKI while it runs: the CA, the rotating serving
/// certificate, and the temp dir that holds a throw-away CA.
pub struct ServerTls {
    ca: Ca,
    names: Vec<SanType>,
    lifetime: Duration,
    cert: Arc<RotatingCert>,
    acceptor: TlsAcceptor,
    /// The HTTP listener's (dashboard, `/metrics`): the same certificate,
    /// no client certificate asked for (a browser would prompt for one),
    /// and HTTP/1.1 offered beside HTTP/2.
    http_acceptor: TlsAcceptor,
    _temp: Option<tempfile::TempDir>,
}

impl fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerTls")
            .field("ca", &self.ca)
            .field("lifetime", &self.lifetime)
            .finish_non_exhaustive()
    }
}

/// Why TLS could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TlsSetupError {
    /// The CA or a certificate.
    #[error(transparent)]
    Pki(#[from] PkiError),
    /// rustls refused the configuration.
    #[error("TLS configuration: {0}")]
    Rustls(String),
    /// The temp dir for a throw-away CA.
    #[error("creating a temp dir for the CA: {0}")]
    TempDir(io::Error),
}

impl ServerTls {
    /// Loads or makes the CA, issues the first serving certificate for the
    /// names of `listen`, and builds the rustls configuration.
    pub fn new(
        config: &TlsConfig,
        listen: std::net::SocketAddr,
    ) -> Result<ServerTls, TlsSetupError> {
        Self::with_ca(config, listen, None)
    }

    /// [`new`](Self::new), with the CA given (`Some`: the cluster CA the
    /// database keeps, [`shared_ca`]) instead of the PKI dir's: only its
    /// certificate is written there (`ca.pem`, for clients and nodes on
    /// this machine); its key stays in memory.
    pub fn with_ca(
        config: &TlsConfig,
        listen: std::net::SocketAddr,
        shared: Option<&shared_ca::CaPems>,
    ) -> Result<ServerTls, TlsSetupError> {
        let (dir, temp) = match &config.pki_dir {
            Some(dir) => (dir.clone(), None),
            None => {
                let temp = tempfile::Builder::new()
                    .prefix("weft-pki-")
                    .tempdir()
                    .map_err(TlsSetupError::TempDir)?;
                (temp.path().to_owned(), Some(temp))
            }
        };
        let ca = match shared {
            None => {
                let (ca, created) = Ca::load_or_create(&dir)?;
                if created {
                    tracing::info!(ca_file = %ca.cert_path().display(), "made a new cluster CA");
                }
                ca
            }
            Some(pems) => {
                let ca = Ca::from_pems(
                    &pems.cert,
                    &pems.key,
                    dir.join(pki::CA_CERT_FILE),
                    std::path::Path::new("the database's cluster CA key"),
                )?;
                ca.write_cert()?;
                ca
            }
        };
        // On every address: each interface's address too, so a node that
        // joins through any of them can check the name.
        let mut advertise = config.advertise.clone();
        advertise.extend(interfaces::names_for_listen(listen));
        let names = pki::server_names(listen, pki::host_name().as_deref(), &advertise);
        let lifetime = config.cert_lifetime.max(Duration::from_secs(1));
        let first = ca.issue_server(&names, lifetime)?;
        let cert = Arc::new(RotatingCert::new(first.key));
        let provider = weft_proto::tls::provider();
        let mut roots = RootCertStore::empty();
        roots
            .add(ca.cert_der().clone())
            .map_err(|err| TlsSetupError::Rustls(err.to_string()))?;
        let verifier =
            WebPkiClientVerifier::builder_with_provider(Arc::new(roots), Arc::clone(&provider))
                .allow_unauthenticated()
                .build()
                .map_err(|err| TlsSetupError::Rustls(err.to_string()))?;
        let mut http = ServerConfig::builder_with_provider(Arc::clone(&provider))
            .with_safe_default_protocol_versions()
            .map_err(|err| TlsSetupError::Rustls(err.to_string()))?
            .with_no_client_auth()
            .with_cert_resolver(Arc::clone(&cert) as Arc<dyn ResolvesServerCert>);
        http.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        let mut server = ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|err| TlsSetupError::Rustls(err.to_string()))?
            .with_client_cert_verifier(verifier)
            .with_cert_resolver(Arc::clone(&cert) as Arc<dyn ResolvesServerCert>);
        server.alpn_protocols = vec![b"h2".to_vec()];
        // No session resumption: a resumed session would carry the client
        // certificate of the session it resumes, unchecked against its
        // dates, so every connection shows its certificate afresh (node
        // and client connections are long-lived; a full handshake each
        // costs nothing that matters).
        server.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
        server.send_tls13_tickets = 0;
        Ok(ServerTls {
            ca,
            names,
            lifetime,
            cert,
            acceptor: TlsAcceptor::from(Arc::new(server)),
            http_acceptor: TlsAcceptor::from(Arc::new(http)),
            _temp: temp,
        })
    }

    /// Where `ca.pem` is.
    pub fn ca_file(&self) -> PathBuf {
        self.ca.cert_path().to_owned()
    }

    /// The CA pin (`sha256:HEX`).
    pub fn ca_pin(&self) -> String {
        self.ca.pin()
    }

    /// The cluster CA, which signs node certificates.
    pub fn ca(&self) -> &Ca {
        &self.ca
    }

    /// The node ids revoked in this CA's PKI dir (see [`revoked`]).
    pub fn revoked_nodes(&self) -> Result<Vec<weft_proto::NodeId>, PkiError> {
        revoked::load(self.pki_dir())
    }

    /// Adds `id` to this CA's revoked nodes, durably.
    pub fn record_revoked(&self, id: weft_proto::NodeId) -> Result<(), PkiError> {
        revoked::append(self.pki_dir(), id)
    }

    fn pki_dir(&self) -> &std::path::Path {
        self.ca
            .cert_path()
            .parent()
            .unwrap_or(std::path::Path::new("."))
    }

    /// The CA certificate as PEM.
    pub fn ca_pem(&self) -> String {
        node_cert::pem_certificate(self.ca.cert_der())
    }

    /// Issues the next serving certificate and makes it the one new
    /// handshakes get; answers its expiry.
    pub fn rotate(&self) -> Result<SystemTime, PkiError> {
        let next = self.ca.issue_server(&self.names, self.lifetime)?;
        self.cert.set(next.key);
        Ok(next.not_after)
    }

    /// Rotates the serving certificate at 2/3 of each one's life until
    /// `cancel`; a failure is logged and retried a little later.
    pub async fn rotate_until(self: Arc<Self>, cancel: CancellationToken) {
        let mut wait = self.lifetime * 2 / 3;
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(wait) => {}
            }
            wait = match self.rotate() {
                Ok(not_after) => {
                    tracing::info!(
                        not_after = %humantime_like(not_after),
                        "rotated the serving certificate"
                    );
                    self.lifetime * 2 / 3
                }
                Err(err) => {
                    tracing::error!(error = %err, "rotating the serving certificate failed; retrying");
                    (self.lifetime / 10).max(Duration::from_millis(100))
                }
            };
        }
    }

    /// The TLS acceptor new connections are handshaken with; the accept
    /// loop, its deadline and caps are `crate::listener`'s.
    pub(crate) fn acceptor(&self) -> TlsAcceptor {
        self.acceptor.clone()
    }

    /// The TLS acceptor of the HTTP listener: the same serving
    /// certificate (rotated with it), no client certificate, HTTP/1.1 or
    /// HTTP/2.
    pub(crate) fn http_acceptor(&self) -> TlsAcceptor {
        self.http_acceptor.clone()
    }
}

/// A `SystemTime` as seconds since the epoch (for logs).
fn humantime_like(time: SystemTime) -> String {
    match time.duration_since(SystemTime::UNIX_EPOCH) {
        Ok(since) => format!("unix:{}", since.as_secs()),
        Err(_) => "before 1970".to_owned(),
    }
}
