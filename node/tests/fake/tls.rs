//! A fake coordinator over TLS with its own CA: it answers `Join` by
//! signing the node's CSR (or refuses it as told), asks for client
//! certificates (optional, as the real one does), and hands each `Connect`
//! to the test with the certificate the node presented. Enough to test
//! joining, restarting from the state dir, and renewal end to end against
//! the node alone.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rcgen::{CertificateParams, DnType, Issuer, KeyPair, SanType};
use rustls::RootCertStore;
use rustls::pki_types::CertificateDer;
use rustls::server::WebPkiClientVerifier;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use x509_parser::prelude::FromDer;

use weft_proto::pb::node_service_server::{NodeService, NodeServiceServer};
use weft_proto::{JoinToken, NodeId, pb};

use super::Conn;

/// A `Join` the fake received.
#[derive(Clone, Debug)]
pub struct JoinCall {
    pub token: String,
    pub name: String,
    pub node_id: NodeId,
}

/// The cluster CA of the fake.
pub struct Ca {
    pub pem: String,
    pub der: CertificateDer<'static>,
    issuer: Issuer<'static, KeyPair>,
}

impl Ca {
    pub fn new() -> Ca {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params
            .distinguished_name
            .push(DnType::CommonName, "fake cluster CA");
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let cert = params.self_signed(&key).unwrap();
        Ca {
            pem: cert.pem(),
            der: cert.der().clone(),
            issuer: Issuer::new(params, key),
        }
    }

    pub fn pin(&self) -> String {
        weft_proto::tls::ca_pin(&self.der)
    }

    /// A node certificate for the key of `csr_der`, naming `node_id`,
    /// backdated by its lifetime (as the coordinator backdates short
    /// ones); the chain PEM (leaf, CA).
    pub fn sign_csr(&self, csr_der: &[u8], node_id: NodeId, lifetime: Duration) -> String {
        let (_, csr) =
            x509_parser::certification_request::X509CertificationRequest::from_der(csr_der)
                .expect("a CSR");
        let raw = csr
            .certification_request_info
            .subject_pki
            .subject_public_key
            .data
            .to_vec();
        let public = RawP256(raw);
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params
            .distinguished_name
            .push(DnType::CommonName, node_id.to_string());
        params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - lifetime.min(Duration::from_secs(300));
        params.not_after = now + lifetime;
        let leaf = params.signed_by(&public, &self.issuer).unwrap();
        leaf.pem() + &self.pem
    }

    fn server_cert(
        &self,
    ) -> (
        Vec<CertificateDer<'static>>,
        rustls::pki_types::PrivateKeyDer<'static>,
    ) {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.subject_alt_names = vec![SanType::IpAddress("127.0.0.1".parse().unwrap())];
        params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        let key_der = rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into());
        (vec![cert.der().clone(), self.der.clone()], key_der)
    }
}

/// An ECDSA P-256 public key from a CSR, for rcgen to certify.
struct RawP256(Vec<u8>);

impl rcgen::PublicKeyData for RawP256 {
    fn der_bytes(&self) -> &[u8] {
        &self.0
    }

    fn algorithm(&self) -> &'static rcgen::SignatureAlgorithm {
        &rcgen::PKCS_ECDSA_P256_SHA256
    }
}

/// How the fake answers `Join`.
pub struct Joins {
    ca: Arc<Ca>,
    /// Lifetime of the certificates it issues.
    pub lifetime: Duration,
    /// Set: refuse every `Join` with this.
    pub refusal: Mutex<Option<Status>>,
    pub calls: Mutex<Vec<JoinCall>>,
}

struct TlsFake {
    conns: mpsc::UnboundedSender<Conn>,
    joins: Arc<Joins>,
}

#[tonic::async_trait]
impl NodeService for TlsFake {
    type ConnectStream = ReceiverStream<Result<pb::CoordinatorMessage, Status>>;

    async fn connect(
        &self,
        request: Request<Streaming<pb::NodeMessage>>,
    ) -> Result<Response<Self::ConnectStream>, Status> {
        let peer = request
            .peer_certs()
            .and_then(|certs| certs.first().map(|cert| cert.to_vec()));
        let (out, rx) = mpsc::channel(64);
        let conn = Conn {
            inbound: request.into_inner(),
            out,
            peer,
        };
        self.conns
            .send(conn)
            .map_err(|_| Status::unavailable("test over"))?;
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn join(
        &self,
        request: Request<pb::JoinRequest>,
    ) -> Result<Response<pb::JoinResponse>, Status> {
        if request.peer_certs().is_some_and(|certs| !certs.is_empty()) {
            return Err(Status::invalid_argument("Join with a client certificate"));
        }
        let request = request.into_inner();
        if let Some(status) = self.joins.refusal.lock().unwrap().clone() {
            return Err(status);
        }
        let node_id = NodeId::new();
        let chain = self
            .joins
            .ca
            .sign_csr(&request.csr_der, node_id, self.joins.lifetime);
        self.joins.calls.lock().unwrap().push(JoinCall {
            token: request.token,
            name: request.name,
            node_id,
        });
        Ok(Response::new(pb::JoinResponse {
            node_id: node_id.to_string(),
            certificate_chain_pem: chain,
            ca_pem: self.joins.ca.pem.clone(),
            not_after: None,
        }))
    }
}

/// A running TLS fake.
pub struct TlsServer {
    pub addr: SocketAddr,
    pub ca: Arc<Ca>,
    pub joins: Arc<Joins>,
    pub conns: mpsc::UnboundedReceiver<Conn>,
}

impl TlsServer {
    /// Serves on `addr` (port 0 picks one) with the CA `ca`, issuing
    /// certificates of `lifetime`.
    pub async fn start(addr: SocketAddr, ca: Arc<Ca>, lifetime: Duration) -> TlsServer {
        let listener = TcpListener::bind(addr).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let provider = weft_proto::tls::provider();
        let mut roots = RootCertStore::empty();
        roots.add(ca.der.clone()).unwrap();
        let verifier =
            WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
                .allow_unauthenticated()
                .build()
                .unwrap();
        let (chain, key) = ca.server_cert();
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain, key)
            .unwrap();
        config.alpn_protocols = vec![b"h2".to_vec()];
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let (tx, incoming) = mpsc::channel(16);
        tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    return;
                };
                let acceptor = acceptor.clone();
                let tx = tx.clone();
                tokio::spawn(async move {
                    if let Ok(stream) = acceptor.accept(tcp).await {
                        let _ = tx.send(Ok::<_, std::io::Error>(stream)).await;
                    }
                });
            }
        });
        let joins = Arc::new(Joins {
            ca: Arc::clone(&ca),
            lifetime,
            refusal: Mutex::new(None),
            calls: Mutex::new(Vec::new()),
        });
        let (conns, rx) = mpsc::unbounded_channel();
        let service = TlsFake {
            conns,
            joins: Arc::clone(&joins),
        };
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(NodeServiceServer::new(service))
                .serve_with_incoming(ReceiverStream::new(incoming)),
        );
        TlsServer {
            addr,
            ca,
            joins,
            conns: rx,
        }
    }

    /// A join token for this fake.
    pub fn token(&self) -> JoinToken {
        JoinToken {
            address: self.addr.to_string(),
            ca_pin: self.ca.pin(),
            credential: format!("0123456789abcdef_{}", "s".repeat(43)),
        }
    }
}

/// The node id a certificate (DER) names as its common name.
pub fn common_name(der: &[u8]) -> String {
    let (_, cert) = x509_parser::certificate::X509Certificate::from_der(der).unwrap();
    let name = cert.subject().iter_common_name().next().unwrap();
    name.as_str().unwrap().to_owned()
}

/// The first certificate of a PEM chain, as DER.
pub fn first_der(chain_pem: &str) -> Vec<u8> {
    let (_, pem) = x509_parser::pem::parse_x509_pem(chain_pem.as_bytes()).unwrap();
    pem.contents
}
