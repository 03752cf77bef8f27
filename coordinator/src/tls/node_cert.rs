//! Node certificates: checking a node's certificate request (PKCS#10) and
//! issuing its certificate with the cluster CA, and reading the node id
//! back from a certificate a node presents. Plain code and `rcgen`; no I/O.
//!
//! A node certificate names the node id as its subject's common name and
//! the node's name as its organizational unit, has
//! the extended key usage clientAuth only (so it cannot serve), key usage
//! digitalSignature, a random serial, and a `not_before` backdated like
//! serving certificates. The request's subject and extensions are ignored:
//! only its public key, proven by its self-signature, is used.

use std::time::{Duration, SystemTime};

use base64::Engine;
use rcgen::{
    CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, KeyUsagePurpose,
    SerialNumber, SubjectPublicKeyInfo,
};
use x509_parser::prelude::{FromDer, X509CertificationRequest};

use weft_proto::NodeId;

use super::pki::{CLOCK_SKEW, Ca, PkiError, random_serial, to_offset};

/// Largest certificate request accepted, in bytes (a P-256 request is
/// about 250; RSA-4096 about 1,700).
pub const MAX_CSR_BYTES: usize = 16 * 1024;

/// A node's certificate, as `Join` and renewal answer it.
#[derive(Clone, Debug)]
pub struct NodeCert {
    /// The node's certificate then the CA, PEM.
    pub chain_pem: String,
    /// When it expires.
    pub not_after: SystemTime,
}

/// Why no node certificate was issued.
#[derive(Debug, thiserror::Error)]
pub enum NodeCertError {
    /// The request is not a PKCS#10 request signed by its own key, or its
    /// key type is not supported (`INVALID_ARGUMENT`).
    #[error("csr_der: {0}")]
    BadRequest(String),
    /// Signing failed (`INTERNAL`).
    #[error(transparent)]
    Pki(#[from] PkiError),
}

/// The public key of a PKCS#10 request whose self-signature verifies.
fn requested_key(csr_der: &[u8]) -> Result<SubjectPublicKeyInfo, NodeCertError> {
    let csr = verified_request(csr_der)?;
    SubjectPublicKeyInfo::from_der(csr.certification_request_info.subject_pki.raw)
        .map_err(|err| NodeCertError::BadRequest(format!("unsupported key: {err}")))
}

/// The public key (DER SubjectPublicKeyInfo) a PKCS#10 request asks for,
/// as its bytes: what tells one key from another. Its signature is not
/// checked here: issuing a certificate checks it.
pub fn request_key_der(csr_der: &[u8]) -> Result<Vec<u8>, NodeCertError> {
    let csr = parsed_request(csr_der)?;
    Ok(csr.certification_request_info.subject_pki.raw.to_vec())
}

/// A PKCS#10 request of at most [`MAX_CSR_BYTES`], nothing after it,
/// signed by its own key.
fn verified_request(csr_der: &[u8]) -> Result<X509CertificationRequest<'_>, NodeCertError> {
    let csr = parsed_request(csr_der)?;
    csr.verify_signature().map_err(|err| {
        NodeCertError::BadRequest(format!(
            "the request's signature does not verify with its own key: {err}"
        ))
    })?;
    Ok(csr)
}

/// A PKCS#10 request of at most [`MAX_CSR_BYTES`], nothing after it.
fn parsed_request(csr_der: &[u8]) -> Result<X509CertificationRequest<'_>, NodeCertError> {
    let bad = |why: String| NodeCertError::BadRequest(why);
    if csr_der.is_empty() {
        return Err(bad("empty; send a PKCS#10 certificate request (DER)".into()));
    }
    if csr_der.len() > MAX_CSR_BYTES {
        return Err(bad(format!(
            "{} bytes, more than the {MAX_CSR_BYTES} a certificate request may have",
            csr_der.len()
        )));
    }
    let (rest, csr) = X509CertificationRequest::from_der(csr_der)
        .map_err(|err| bad(format!("not a PKCS#10 certificate request (DER): {err}")))?;
    if !rest.is_empty() {
        return Err(bad("trailing bytes after the certificate request".into()));
    }
    Ok(csr)
}

/// `cert_der` as PEM.
pub fn pem_certificate(cert_der: &[u8]) -> String {
    let text = base64::engine::general_purpose::STANDARD.encode(cert_der);
    let mut pem = String::from("-----BEGIN CERTIFICATE-----\n");
    for line in text.as_bytes().chunks(64) {
        pem.push_str(&String::from_utf8_lossy(line));
        pem.push('\n');
    }
    pem.push_str("-----END CERTIFICATE-----\n");
    pem
}

impl Ca {
    /// Issues the certificate of node `node_id` for the key of `csr_der`
    /// (a PKCS#10 request, DER, whose self-signature must verify), valid
    /// from a little before now for `lifetime`.
    pub fn issue_node(
        &self,
        csr_der: &[u8],
        (node_id, node_name): (NodeId, &str),
        lifetime: Duration,
    ) -> Result<NodeCert, NodeCertError> {
        let key = requested_key(csr_der)?;
        let lifetime = lifetime.max(Duration::from_secs(1));
        let now = SystemTime::now();
        let not_after = now + lifetime;
        let mut params = CertificateParams::default();
        let mut name = DistinguishedName::new();
        name.push(DnType::CommonName, node_id.to_string());
        name.push(DnType::OrganizationalUnitName, node_name);
        params.distinguished_name = name;
        params.not_before = to_offset(now - CLOCK_SKEW.min(lifetime));
        params.not_after = to_offset(not_after);
        params.serial_number = Some(SerialNumber::from_slice(&random_serial()));
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.use_authority_key_identifier_extension = true;
        let cert = params
            .signed_by(&key, self.issuer())
            .map_err(|source| PkiError::Cert {
                what: format!("signing the certificate of node {node_id}"),
                source,
            })?;
        let chain_pem = format!("{}{}", cert.pem(), pem_certificate(self.cert_der()));
        Ok(NodeCert {
            chain_pem,
            not_after,
        })
    }
}

/// Whether `cert` says it is for TLS clients (extended key usage
/// clientAuth), as every node certificate does. A certificate without the
/// extension passes rustls's client check; a node certificate must say it.
fn for_clients(cert: &x509_parser::certificate::X509Certificate<'_>) -> bool {
    matches!(cert.extended_key_usage(), Ok(Some(usage)) if usage.value.client_auth)
}

/// The node id a node certificate (DER) names as its subject's common
/// name; `None` when it names none or is not for clients (not a node
/// certificate).
pub fn node_id_of(cert_der: &[u8]) -> Option<NodeId> {
    let (_, cert) = x509_parser::certificate::X509Certificate::from_der(cert_der).ok()?;
    if !for_clients(&cert) {
        return None;
    }
    let cn = cert.subject().iter_common_name().next()?;
    cn.as_str().ok()?.parse::<NodeId>().ok()
}

/// The node id and name a node certificate (DER) names (common name and
/// organizational unit); `None` when it names either not.
pub fn node_of(cert_der: &[u8]) -> Option<(NodeId, String)> {
    let (_, cert) = x509_parser::certificate::X509Certificate::from_der(cert_der).ok()?;
    if !for_clients(&cert) {
        return None;
    }
    let id = cert
        .subject()
        .iter_common_name()
        .next()?
        .as_str()
        .ok()?
        .parse::<NodeId>()
        .ok()?;
    let name = cert
        .subject()
        .iter_organizational_unit()
        .next()?
        .as_str()
        .ok()?
        .to_owned();
    Some((id, name))
}

#[cfg(test)]
mod tests {
    use rcgen::{CertificateParams, KeyPair};
    use x509_parser::extensions::ParsedExtension;
    use x509_parser::prelude::X509Certificate;

    use super::*;

    fn csr(key: &KeyPair) -> Vec<u8> {
        let mut params = CertificateParams::new(vec!["ignored.example".to_owned()]).unwrap();
        params
            .distinguished_name
            .push(DnType::CommonName, "someone-else");
        params.serialize_request(key).unwrap().der().to_vec()
    }

    fn pem_blocks(pem: &str) -> Vec<Vec<u8>> {
        pem.split("-----BEGIN CERTIFICATE-----")
            .skip(1)
            .map(|block| {
                let body: String = block
                    .split("-----END CERTIFICATE-----")
                    .next()
                    .unwrap()
                    .split_whitespace()
                    .collect();
                base64::engine::general_purpose::STANDARD
                    .decode(body)
                    .unwrap()
            })
            .collect()
    }

    #[test]
    fn a_node_certificate_chains_to_the_ca_names_the_node_and_is_for_clients_only() {
        let tmp = tempfile::tempdir().unwrap();
        let (ca, _) = Ca::load_or_create(tmp.path()).unwrap();
        let key = KeyPair::generate().unwrap();
        let id = NodeId::new();
        let issued = ca
            .issue_node(&csr(&key), (id, "gpu-7"), Duration::from_secs(3600))
            .unwrap();
        let chain = pem_blocks(&issued.chain_pem);
        assert_eq!(chain.len(), 2, "leaf then CA");
        assert_eq!(chain[1], ca.cert_der().as_ref());
        let (_, leaf) = X509Certificate::from_der(&chain[0]).unwrap();
        let (_, root) = X509Certificate::from_der(ca.cert_der().as_ref()).unwrap();
        leaf.verify_signature(Some(root.public_key())).unwrap();
        assert_eq!(leaf.issuer(), root.subject());
        // The subject is the node id, whatever the request asked for.
        assert_eq!(node_id_of(&chain[0]), Some(id));
        assert_eq!(node_of(&chain[0]), Some((id, "gpu-7".to_owned())));
        assert_eq!(
            leaf.public_key().raw,
            rcgen::PublicKeyData::subject_public_key_info(&key).as_slice(),
            "the request's key"
        );
        let mut eku = None;
        let mut sans = false;
        for ext in leaf.extensions() {
            match ext.parsed_extension() {
                ParsedExtension::ExtendedKeyUsage(usage) => eku = Some(usage.clone()),
                ParsedExtension::SubjectAlternativeName(_) => sans = true,
                _ => {}
            }
        }
        let eku = eku.expect("an extended key usage");
        assert!(eku.client_auth && !eku.server_auth);
        assert!(!sans, "the request's names are ignored");
        let lifetime =
            leaf.validity().not_after.timestamp() - leaf.validity().not_before.timestamp();
        assert!((3600..=3600 + 300).contains(&lifetime), "{lifetime}");
        let not_after = issued
            .not_after
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64;
        assert!((leaf.validity().not_after.timestamp() - not_after).abs() <= 1);
        // Each certificate has its own serial.
        let again = ca
            .issue_node(&csr(&key), (id, "gpu-7"), Duration::from_secs(3600))
            .unwrap();
        let again = pem_blocks(&again.chain_pem);
        let (_, other) = X509Certificate::from_der(&again[0]).unwrap();
        assert_ne!(leaf.serial, other.serial);
    }

    #[test]
    fn a_request_that_is_not_self_signed_or_not_a_request_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let (ca, _) = Ca::load_or_create(tmp.path()).unwrap();
        let id = NodeId::new();
        let refused = |der: &[u8]| match ca.issue_node(der, (id, "n"), Duration::from_secs(60)) {
            Err(NodeCertError::BadRequest(why)) => why,
            other => panic!("expected a refusal, got {other:?}"),
        };
        assert!(refused(&[]).contains("empty"));
        assert!(refused(b"hello").contains("PKCS#10"));
        // A signature byte flipped: the signature no longer verifies.
        let mut tampered = csr(&KeyPair::generate().unwrap());
        let last = tampered.len() - 1;
        tampered[last] ^= 0x55;
        let why = refused(&tampered);
        assert!(why.contains("signature"), "{why}");
        assert!(refused(&vec![0u8; MAX_CSR_BYTES + 1]).contains("bytes"));
        // The error names the field.
        let err = ca
            .issue_node(b"x", (id, "n"), Duration::from_secs(60))
            .unwrap_err();
        assert!(err.to_string().starts_with("csr_der: "), "{err}");
    }

    #[test]
    fn a_certificate_without_a_node_id_names_no_node() {
        let key = KeyPair::generate().unwrap();
        let cert = CertificateParams::new(vec!["x.example".to_owned()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        assert_eq!(node_id_of(cert.der()), None);
        assert_eq!(node_of(cert.der()), None);
        // A node id and name, but not for clients: not a node certificate.
        let mut params = CertificateParams::default();
        params
            .distinguished_name
            .push(DnType::CommonName, NodeId::new().to_string());
        params
            .distinguished_name
            .push(DnType::OrganizationalUnitName, "n");
        let server_only = params.clone();
        let no_usage = params.self_signed(&key).unwrap();
        assert_eq!(node_id_of(no_usage.der()), None);
        let mut server_only = server_only;
        server_only.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let server_only = server_only.self_signed(&key).unwrap();
        assert_eq!(node_of(server_only.der()), None);
        assert_eq!(node_id_of(b"garbage"), None);
    }
}
