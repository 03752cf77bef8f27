//! The cluster CA and the coordinator's serving certificates: plain code,
//! files and `rcgen`, no I/O besides the PKI dir.
//!
//! Files in the PKI dir (the data dir by default; 0700):
//! - `ca.pem`: the CA certificate (0600) — what clients and nodes trust.
//! - `ca.key`: the CA private key (0600). Never sent anywhere; read only here.
//! - `ca.key.new`, `ca.pem.new`: the two while a first start makes them
//!   (see [`Ca::load_or_create`]).
//!
//! The serving certificate is not stored: each start issues a fresh one,
//! and [`Ca::issue_server`] issues the next before the current expires.
//! Node certificates (issued on join) are signed by the same CA
//! (`tls::node_cert`).

use std::io::Write;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::sign::CertifiedKey;
use time::OffsetDateTime;

/// The CA certificate's file name in the PKI dir.
pub const CA_CERT_FILE: &str = "ca.pem";
/// The CA key's file name in the PKI dir.
pub const CA_KEY_FILE: &str = "ca.key";
/// The CA's common name.
const CA_NAME: &str = "Weft cluster CA";
/// How long the CA is valid.
const CA_LIFETIME: Duration = Duration::from_secs(10 * 365 * 24 * 60 * 60);
/// Backdating of `not_before`, for clocks a little behind.
pub(super) const CLOCK_SKEW: Duration = Duration::from_secs(5 * 60);

/// A PKI failure; the message names the file.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    /// A file or dir could not be read, written or created.
    #[error("{what} {path}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The path.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A certificate or key could not be made or parsed.
    #[error("{what}: {source}")]
    Cert {
        /// What was being done.
        what: String,
        /// Why.
        source: rcgen::Error,
    },
    /// rustls refused a key.
    #[error("loading the serving key: {0}")]
    Key(#[from] rustls::Error),
    /// The PKI dir holds one of `ca.pem` and `ca.key` without the other.
    /// Making a new CA over it would silently invalidate every node
    /// certificate and every CA pin handed out, so the start is refused.
    #[error(
        "{} is there but {} is missing: restore {} from a backup; if this cluster never served \
         (its first start was cut short), nothing trusts this CA yet: remove {} to make a new one; \
         otherwise, to start a new cluster CA (every node certificate and CA pin of the old one \
         stops working: nodes join again with new tokens), remove {} too",
        .present.display(),
        .missing.display(),
        .missing.display(),
        .present.display(),
        .present.display()
    )]
    HalfCa {
        /// The file that is there.
        present: PathBuf,
        /// The file that is not.
        missing: PathBuf,
    },
}

fn io_err<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> PkiError + 'a {
    move |source| PkiError::Io {
        what,
        path: path.to_owned(),
        source,
    }
}

/// The cluster CA, loaded or made.
pub struct Ca {
    cert_der: CertificateDer<'static>,
    issuer: Issuer<'static, KeyPair>,
    cert_path: PathBuf,
}

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ca")
            .field("cert_path", &self.cert_path)
            .field("pin", &self.pin())
            .finish_non_exhaustive()
    }
}

/// The CA's fixed parameters: the same on every start, so the issuer made
/// from them and the saved key matches the saved certificate.
fn ca_params() -> CertificateParams {
    let mut params = CertificateParams::default();
    let mut name = DistinguishedName::new();
    name.push(DnType::CommonName, CA_NAME);
    params.distinguished_name = name;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params
}

pub(super) fn to_offset(time: SystemTime) -> OffsetDateTime {
    OffsetDateTime::from(time)
}

/// Makes `dir` (and parents) if missing and sets it to 0700.
pub fn private_dir(dir: &Path) -> Result<(), PkiError> {
    std::fs::create_dir_all(dir).map_err(io_err("creating", dir))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
        .map_err(io_err("setting 0700 on", dir))
}

/// Writes `bytes` to `path` as 0600, through a temp file and a rename,
/// then syncs the dir so that the rename itself survives a crash.
fn write_private(path: &Path, bytes: &[u8]) -> Result<(), PkiError> {
    let tmp = write_temp(path, bytes)?;
    rename_synced(&tmp, path)
}

/// The temp file `path` is written as before it is renamed into place:
/// `ca.pem.new`, `ca.key.new`.
fn pending(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(".new");
    PathBuf::from(name)
}

/// Writes `bytes` whole to `path`'s temp file ([`pending`]), 0600 and
/// synced, replacing one left by an earlier try; answers its path.
fn write_temp(path: &Path, bytes: &[u8]) -> Result<PathBuf, PkiError> {
    let tmp = pending(path);
    let _ = std::fs::remove_file(&tmp);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(io_err("creating", &tmp))?;
    file.write_all(bytes).map_err(io_err("writing", &tmp))?;
    file.sync_all().map_err(io_err("syncing", &tmp))?;
    Ok(tmp)
}

/// Renames `from` to `to` and syncs the dir, so that the rename survives
/// a crash.
fn rename_synced(from: &Path, to: &Path) -> Result<(), PkiError> {
    std::fs::rename(from, to).map_err(io_err("renaming to", to))?;
    let dir = match to.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    std::fs::File::open(dir)
        .and_then(|dir| dir.sync_all())
        .map_err(io_err("syncing", dir))
}

/// Refuses a `ca.pem` whose public key is not `key`'s (the two files were
/// mixed up or one was replaced): certificates signed with the key would
/// not chain to the CA clients trust.
fn check_ca_key_matches(
    cert_der: &CertificateDer<'_>,
    key: &KeyPair,
    cert_path: &Path,
    key_path: &Path,
) -> Result<(), PkiError> {
    use rcgen::PublicKeyData;
    use x509_parser::prelude::{FromDer, X509Certificate};
    let mismatch = |message: String| PkiError::Io {
        what: "checking",
        path: cert_path.to_owned(),
        source: std::io::Error::other(message),
    };
    let (_, cert) = X509Certificate::from_der(cert_der.as_ref())
        .map_err(|err| mismatch(format!("not a certificate: {err}")))?;
    if cert.public_key().raw != key.subject_public_key_info().as_slice() {
        return Err(mismatch(format!(
            "the CA certificate's public key is not the one of {}; restore the matching pair (or move both away to make a new CA)",
            key_path.display()
        )));
    }
    Ok(())
}

impl Ca {
    /// Loads the CA from `dir`, or makes one there (dir 0700, files 0600)
    /// if it has neither `ca.pem` nor `ca.key`. Answers the CA and whether
    /// it was made now. One of the two without the other is refused
    /// ([`PkiError::HalfCa`]): a new CA would replace the one every node
    /// and client trusts. (A coordinator on PostgreSQL writes only
    /// `ca.pem` here, its key staying in the database, and never comes
    /// through here for it; the same dir used later without the database
    /// is refused for the same reason.)
    ///
    /// Making one is crash-safe: both files are written whole as temp
    /// files (`ca.key.new`, `ca.pem.new`, synced), then the key is renamed
    /// into place and the certificate last. A start that finds the key
    /// alone with `ca.pem.new` beside it (a first start cut short between
    /// the renames) finishes the rename; the key alone without it is
    /// refused, the message saying what to do in either case.
    pub fn load_or_create(dir: &Path) -> Result<(Ca, bool), PkiError> {
        private_dir(dir)?;
        let cert_path = dir.join(CA_CERT_FILE);
        let key_path = dir.join(CA_KEY_FILE);
        let exists = |path: &Path| path.try_exists().map_err(io_err("checking for", path));
        match (exists(&cert_path)?, exists(&key_path)?) {
            (true, true) => {}
            (false, false) => {
                let (ca, key_pem) = Ca::generate(cert_path)?;
                let key_tmp = write_temp(&key_path, key_pem.as_bytes())?;
                let cert_tmp = write_temp(&ca.cert_path, ca.pem().as_bytes())?;
                // The key first: nothing can have trusted a certificate
                // whose key was never saved, and a start that finds the
                // key with `ca.pem.new` beside it finishes the rename.
                rename_synced(&key_tmp, &key_path)?;
                rename_synced(&cert_tmp, &ca.cert_path)?;
                return Ok((ca, true));
            }
            (true, false) => {
                return Err(PkiError::HalfCa {
                    present: cert_path,
                    missing: key_path,
                });
            }
            (false, true) => {
                let cert_tmp = pending(&cert_path);
                if !exists(&cert_tmp)? {
                    return Err(PkiError::HalfCa {
                        present: key_path,
                        missing: cert_path,
                    });
                }
                // A first start cut short after the key's rename: the
                // certificate is whole (written and synced before it);
                // checked against the key below, like any ca.pem.
                tracing::warn!(path = %cert_path.display(), "finishing the CA an interrupted first start made");
                rename_synced(&cert_tmp, &cert_path)?;
            }
        }
        let cert_pem =
            std::fs::read_to_string(&cert_path).map_err(io_err("reading", &cert_path))?;
        {
            let mode = std::fs::metadata(&key_path)
                .map_err(io_err("reading", &key_path))?
                .permissions()
                .mode();
            if mode & 0o077 != 0 {
                return Err(PkiError::Io {
                    what: "checking",
                    path: key_path.clone(),
                    source: std::io::Error::other(format!(
                        "the CA key has mode {:o}: group or others may read it; make it 0600 (chmod 600) and consider the CA compromised if others could read it",
                        mode & 0o777
                    )),
                });
            }
        }
        let key_pem = std::fs::read_to_string(&key_path).map_err(io_err("reading", &key_path))?;
        Ok((
            Ca::from_pems(&cert_pem, &key_pem, cert_path, &key_path)?,
            false,
        ))
    }

    /// The CA of `cert_pem` and `key_pem` (read from `key_from`, as errors
    /// name it), whose certificate is to be found at `cert_path`.
    pub fn from_pems(
        cert_pem: &str,
        key_pem: &str,
        cert_path: PathBuf,
        key_from: &Path,
    ) -> Result<Ca, PkiError> {
        let key = KeyPair::from_pem(key_pem).map_err(|source| PkiError::Cert {
            what: format!("parsing {}", key_from.display()),
            source,
        })?;
        let cert_der = rustls::pki_types::pem::PemObject::from_pem_slice(cert_pem.as_bytes())
            .map_err(|err| PkiError::Io {
                what: "parsing",
                path: cert_path.clone(),
                source: std::io::Error::other(err.to_string()),
            })?;
        check_ca_key_matches(&cert_der, &key, &cert_path, key_from)?;
        let issuer = Issuer::new(ca_params(), key);
        Ok(Ca {
            cert_der,
            issuer,
            cert_path,
        })
    }

    /// Makes a new CA, in memory only, whose certificate is to be written
    /// to `cert_path`: the CA and its key as PEM.
    pub fn generate(cert_path: PathBuf) -> Result<(Ca, String), PkiError> {
        let key = KeyPair::generate().map_err(|source| PkiError::Cert {
            what: "making the CA key".into(),
            source,
        })?;
        let now = SystemTime::now();
        let mut params = ca_params();
        params.not_before = to_offset(now - CLOCK_SKEW);
        params.not_after = to_offset(now + CA_LIFETIME);
        let cert = params.self_signed(&key).map_err(|source| PkiError::Cert {
            what: "making the CA certificate".into(),
            source,
        })?;
        let key_pem = key.serialize_pem();
        Ok((
            Ca {
                cert_der: cert.der().clone(),
                issuer: Issuer::new(ca_params(), key),
                cert_path,
            },
            key_pem,
        ))
    }

    /// The CA certificate as PEM.
    pub fn pem(&self) -> String {
        super::node_cert::pem_certificate(self.cert_der.as_ref())
    }

    /// Writes the CA certificate to its path (0600), for clients and
    /// nodes on this machine.
    pub fn write_cert(&self) -> Result<(), PkiError> {
        if let Some(dir) = self.cert_path.parent() {
            private_dir(dir)?;
        }
        write_private(&self.cert_path, self.pem().as_bytes())
    }

    /// The CA certificate (DER).
    pub fn cert_der(&self) -> &CertificateDer<'static> {
        &self.cert_der
    }

    /// The CA as an issuer (signing key and name), for the certificates
    /// `tls::node_cert` issues.
    pub(super) fn issuer(&self) -> &Issuer<'static, KeyPair> {
        &self.issuer
    }

    /// Where `ca.pem` is.
    pub fn cert_path(&self) -> &Path {
        &self.cert_path
    }

    /// `sha256:HEX` of the CA certificate (see [`weft_proto::tls::ca_pin`]).
    pub fn pin(&self) -> String {
        weft_proto::tls::ca_pin(&self.cert_der)
    }

    /// Issues a serving certificate for `names`, valid from a little
    /// before now for `lifetime`, with a random serial. The chain is the
    /// leaf then the CA (so a client can match a pin against it).
    pub fn issue_server(
        &self,
        names: &[SanType],
        lifetime: Duration,
    ) -> Result<IssuedCert, PkiError> {
        let key = KeyPair::generate().map_err(|source| PkiError::Cert {
            what: "making a serving key".into(),
            source,
        })?;
        let now = SystemTime::now();
        let not_after = now + lifetime;
        let mut params = CertificateParams::default();
        let mut name = DistinguishedName::new();
        name.push(DnType::CommonName, "weft-coordinator");
        params.distinguished_name = name;
        params.subject_alt_names = names.to_vec();
        params.not_before = to_offset(now - CLOCK_SKEW.min(lifetime));
        params.not_after = to_offset(not_after);
        params.serial_number = Some(SerialNumber::from_slice(&random_serial()));
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        let cert = params
            .signed_by(&key, &self.issuer)
            .map_err(|source| PkiError::Cert {
                what: "signing the serving certificate".into(),
                source,
            })?;
        let key_der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        let signing_key = weft_proto::tls::provider()
            .key_provider
            .load_private_key(key_der)?;
        let chain = vec![cert.der().clone(), self.cert_der.clone()];
        Ok(IssuedCert {
            key: Arc::new(CertifiedKey::new(chain, signing_key)),
            not_after,
        })
    }
}

/// A serving certificate with its key, ready for rustls.
#[derive(Debug, Clone)]
pub struct IssuedCert {
    /// Chain (leaf, CA) and signing key.
    pub key: Arc<CertifiedKey>,
    /// When it expires.
    pub not_after: SystemTime,
}

/// 16 bytes (a ULID: time and 80 random bits), positive as a DER integer.
pub(super) fn random_serial() -> [u8; 16] {
    let mut bytes = ulid::Ulid::new().to_bytes();
    bytes[0] &= 0x7f;
    bytes[0] |= 0x01;
    bytes
}

/// The names of the serving certificate: the listen address (unless it is
/// the unspecified address), `host_name`, `localhost`/127.0.0.1/::1 when
/// listening on loopback or on every address, and every `advertise`d name
/// (an IP address or a DNS name). No duplicates; order kept.
pub fn server_names(
    listen: SocketAddr,
    host_name: Option<&str>,
    advertise: &[String],
) -> Vec<SanType> {
    let mut names: Vec<SanType> = Vec::new();
    let mut push = |san: SanType| {
        if !names.contains(&san) {
            names.push(san);
        }
    };
    let ip = listen.ip();
    if !ip.is_unspecified() {
        push(SanType::IpAddress(ip));
    }
    if ip.is_loopback() || ip.is_unspecified() {
        push(SanType::DnsName(
            "localhost".try_into().expect("a valid name"),
        ));
        push(SanType::IpAddress(IpAddr::V4(Ipv4Addr::LOCALHOST)));
        push(SanType::IpAddress(IpAddr::V6(Ipv6Addr::LOCALHOST)));
    }
    for name in host_name
        .into_iter()
        .chain(advertise.iter().map(String::as_str))
    {
        let name = name.trim().trim_start_matches('[').trim_end_matches(']');
        if name.is_empty() {
            continue;
        }
        match name.parse::<IpAddr>() {
            Ok(ip) => push(SanType::IpAddress(ip)),
            Err(_) => {
                if let Ok(dns) = name.to_ascii_lowercase().try_into() {
                    push(SanType::DnsName(dns));
                }
            }
        }
    }
    names
}

/// This machine's host name, if it has a usable one.
pub fn host_name() -> Option<String> {
    nix::unistd::gethostname()
        .ok()
        .and_then(|name| name.into_string().ok())
        .filter(|name| !name.is_empty())
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use x509_parser::prelude::*;

    use super::*;

    fn mode(path: &Path) -> u32 {
        std::fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn first_start_makes_a_private_ca_and_later_starts_reuse_it() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("data");
        let (ca, created) = Ca::load_or_create(&dir).unwrap();
        assert!(created);
        assert_eq!(mode(&dir), 0o700);
        assert_eq!(mode(&dir.join(CA_CERT_FILE)), 0o600);
        assert_eq!(mode(&dir.join(CA_KEY_FILE)), 0o600);
        assert!(ca.pin().starts_with("sha256:") && ca.pin().len() == 7 + 64);
        let (again, created) = Ca::load_or_create(&dir).unwrap();
        assert!(!created);
        assert_eq!(again.cert_der(), ca.cert_der());
        assert_eq!(again.pin(), ca.pin());
        // A certificate issued after the restart chains to the saved CA.
        let names = server_names("127.0.0.1:7070".parse().unwrap(), None, &[]);
        let issued = again.issue_server(&names, Duration::from_secs(60)).unwrap();
        let (_, leaf) = X509Certificate::from_der(issued.key.cert[0].as_ref()).unwrap();
        let (_, root) = X509Certificate::from_der(ca.cert_der().as_ref()).unwrap();
        leaf.verify_signature(Some(root.public_key())).unwrap();
        assert_eq!(leaf.issuer(), root.subject());
    }

    #[test]
    fn a_ca_key_others_can_read_or_that_is_not_the_certificates_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
        Ca::load_or_create(&a).unwrap();
        Ca::load_or_create(&b).unwrap();
        let key = a.join(CA_KEY_FILE);
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = Ca::load_or_create(&a).unwrap_err().to_string();
        assert!(err.contains("644") && err.contains(CA_KEY_FILE), "{err}");
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
        Ca::load_or_create(&a).unwrap();
        // b's certificate with a's key: refused, naming the mismatch.
        std::fs::copy(b.join(CA_CERT_FILE), a.join(CA_CERT_FILE)).unwrap();
        let err = Ca::load_or_create(&a).unwrap_err().to_string();
        assert!(err.contains("public key"), "{err}");
    }

    #[test]
    fn one_of_ca_pem_and_ca_key_alone_is_refused_naming_the_missing_file() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("pki");
        let (ca, _) = Ca::load_or_create(&dir).unwrap();
        let (cert, key) = (dir.join(CA_CERT_FILE), dir.join(CA_KEY_FILE));
        let kept_key = std::fs::read(&key).unwrap();

        // The key lost (or a PostgreSQL coordinator's dir, which holds
        // only ca.pem): no new CA over the one everybody trusts.
        std::fs::remove_file(&key).unwrap();
        let err = Ca::load_or_create(&dir).unwrap_err();
        assert!(matches!(err, PkiError::HalfCa { .. }), "{err}");
        let message = err.to_string();
        assert!(
            message.contains(&format!("{} is missing", key.display()))
                && message.contains("restore")
                && message.contains("remove"),
            "{message}"
        );
        assert_eq!(
            std::fs::read_to_string(&cert).unwrap(),
            ca.pem(),
            "ca.pem untouched"
        );

        // The certificate lost.
        std::fs::write(&key, &kept_key).unwrap();
        std::fs::remove_file(&cert).unwrap();
        let message = Ca::load_or_create(&dir).unwrap_err().to_string();
        assert!(
            message.contains(&format!("{} is missing", cert.display())),
            "{message}"
        );
        assert_eq!(std::fs::read(&key).unwrap(), kept_key, "ca.key untouched");

        // Both gone: a new CA, as on a first start.
        std::fs::remove_file(&key).unwrap();
        let (new, created) = Ca::load_or_create(&dir).unwrap();
        assert!(created);
        assert_ne!(new.pin(), ca.pin());
    }

    #[test]
    fn a_first_start_cut_short_after_the_key_is_finished_or_refused_saying_what_to_do() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("pki");
        let (ca, _) = Ca::load_or_create(&dir).unwrap();
        let (cert, key) = (dir.join(CA_CERT_FILE), dir.join(CA_KEY_FILE));
        assert!(!pending(&cert).exists() && !pending(&key).exists());

        // Cut short between the key's rename and the certificate's: the
        // certificate is still the temp file. The next start finishes.
        std::fs::rename(&cert, pending(&cert)).unwrap();
        let (again, created) = Ca::load_or_create(&dir).unwrap();
        assert!(!created);
        assert_eq!(again.pin(), ca.pin());
        assert_eq!(std::fs::read_to_string(&cert).unwrap(), ca.pem());
        assert_eq!(mode(&cert), 0o600);
        assert!(!pending(&cert).exists());

        // The key alone, no temp certificate: refused, saying that a
        // cluster that never served may remove the key.
        std::fs::remove_file(&cert).unwrap();
        let message = Ca::load_or_create(&dir).unwrap_err().to_string();
        assert!(
            message.contains("never served")
                && message.contains(&format!("remove {} to make a new one", key.display())),
            "{message}"
        );
        std::fs::remove_file(&key).unwrap();
        let (new, created) = Ca::load_or_create(&dir).unwrap();
        assert!(created);
        assert_ne!(new.pin(), ca.pin());
    }

    #[test]
    fn a_first_start_cut_short_before_the_key_makes_a_new_ca() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("pki");
        private_dir(&dir).unwrap();
        let (cert, key) = (dir.join(CA_CERT_FILE), dir.join(CA_KEY_FILE));
        // Temp files of a try that never renamed anything (one torn).
        std::fs::write(pending(&key), b"torn").unwrap();
        std::fs::write(pending(&cert), b"torn").unwrap();
        let (ca, created) = Ca::load_or_create(&dir).unwrap();
        assert!(created);
        assert_eq!(std::fs::read_to_string(&cert).unwrap(), ca.pem());
        assert!(!pending(&cert).exists() && !pending(&key).exists());
        assert_eq!(Ca::load_or_create(&dir).unwrap().0.pin(), ca.pin());
    }

    #[test]
    fn serving_names_cover_listen_host_loopback_and_advertised() {
        let tmp = tempfile::tempdir().unwrap();
        let (ca, _) = Ca::load_or_create(tmp.path()).unwrap();
        let names = server_names(
            "0.0.0.0:7070".parse().unwrap(),
            Some("build-7"),
            &[
                "10.1.2.3".into(),
                "weft.example.com".into(),
                "[fd00::1]".into(),
            ],
        );
        let issued = ca.issue_server(&names, Duration::from_secs(3600)).unwrap();
        let (_, leaf) = X509Certificate::from_der(issued.key.cert[0].as_ref()).unwrap();
        let sans = leaf.subject_alternative_name().unwrap().unwrap();
        let mut dns = Vec::new();
        let mut ips = Vec::new();
        for name in &sans.value.general_names {
            match name {
                GeneralName::DNSName(d) => dns.push(d.to_string()),
                GeneralName::IPAddress(b) => ips.push(match b.len() {
                    4 => IpAddr::from(<[u8; 4]>::try_from(*b).unwrap()),
                    _ => IpAddr::from(<[u8; 16]>::try_from(*b).unwrap()),
                }),
                other => panic!("unexpected name {other:?}"),
            }
        }
        assert_eq!(dns, ["localhost", "build-7", "weft.example.com"]);
        assert_eq!(
            ips,
            ["127.0.0.1", "::1", "10.1.2.3", "fd00::1"].map(|ip| ip.parse::<IpAddr>().unwrap())
        );
        let lifetime =
            leaf.validity().not_after.timestamp() - leaf.validity().not_before.timestamp();
        assert!((3600..=3600 + 300).contains(&lifetime), "{lifetime}");

        // A specific listen address names itself, and no loopback names.
        let names = server_names("10.0.0.5:7070".parse().unwrap(), None, &[]);
        assert_eq!(names, [SanType::IpAddress("10.0.0.5".parse().unwrap())]);
    }

    #[test]
    fn each_serving_certificate_has_its_own_serial_and_key() {
        let tmp = tempfile::tempdir().unwrap();
        let (ca, _) = Ca::load_or_create(tmp.path()).unwrap();
        let names = server_names("127.0.0.1:1".parse().unwrap(), None, &[]);
        let a = ca.issue_server(&names, Duration::from_secs(5)).unwrap();
        let b = ca.issue_server(&names, Duration::from_secs(5)).unwrap();
        assert_ne!(a.key.cert[0], b.key.cert[0]);
        let (_, a) = X509Certificate::from_der(a.key.cert[0].as_ref()).unwrap();
        let (_, b) = X509Certificate::from_der(b.key.cert[0].as_ref()).unwrap();
        assert_ne!(a.serial, b.serial);
    }
}
