//! The cluster CA kept in PostgreSQL (`--database-url`), so that every
//! coordinator on the database signs node certificates, and its own
//! serving certificate, with the same CA: a certificate from any of them
//! is valid on all. Only the coordinator holding the database reads or
//! writes it, at start.
//!
//! The CA key is sealed with ChaCha20-Poly1305 (ring) under the
//! operator's 32-byte key (`--ca-seal-key-file`); the certificate is the
//! additional data, so a sealed key cannot be moved under another
//! certificate. Without that key it is stored as is, with a warning at
//! every start: anyone who can read the database can then mint node
//! certificates. The key never touches the PKI dir here; only `ca.pem`
//! is written there, for the clients and nodes on this machine.

use std::path::{Path, PathBuf};

use ring::aead::{Aad, CHACHA20_POLY1305, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use ring::rand::{SecureRandom, SystemRandom};

use super::pki::{CA_CERT_FILE, CA_KEY_FILE, Ca, PkiError};
use crate::store::StoreError;
use crate::store::pg::{PgStore, StoredCa};

/// Bytes in a seal key file.
pub const SEAL_KEY_LEN: usize = 32;

/// Bound to every sealed key beside its certificate: what it is.
const AAD_LABEL: &[u8] = b"weft cluster CA key v1\0";

/// Why the cluster CA could not be had from the database.
#[derive(Debug, thiserror::Error)]
pub enum SharedCaError {
    /// The seal key file could not be read, or is not 32 bytes.
    #[error("--ca-seal-key-file {path}: {message}")]
    SealKeyFile {
        /// The file.
        path: PathBuf,
        /// Why.
        message: String,
    },
    /// The database's CA key is sealed and no seal key was given.
    #[error(
        "the cluster CA's key in the database is sealed: start with --ca-seal-key-file FILE (env WEFT_CA_SEAL_KEY_FILE) holding the key it was sealed with"
    )]
    NoSealKey,
    /// The seal key given does not open the database's CA key.
    #[error(
        "the cluster CA's key in the database does not open with the --ca-seal-key-file key: it was sealed with another key (or changed in the database)"
    )]
    WrongSealKey,
    /// The database's CA is not a CA this coordinator can read.
    #[error("the cluster CA in the database: {0}")]
    Corrupt(String),
    /// Reading or writing the database.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The PKI dir's CA, or making one.
    #[error(transparent)]
    Pki(#[from] PkiError),
}

/// The operator's key that seals the CA key in the database.
pub struct SealKey(LessSafeKey);

impl std::fmt::Debug for SealKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SealKey(..)")
    }
}

impl SealKey {
    /// The key in `path`: exactly [`SEAL_KEY_LEN`] bytes, as
    /// `head -c 32 /dev/urandom > FILE` makes.
    pub fn read(path: &Path) -> Result<SealKey, SharedCaError> {
        let fail = |message: String| SharedCaError::SealKeyFile {
            path: path.to_owned(),
            message,
        };
        let bytes = std::fs::read(path).map_err(|err| fail(err.to_string()))?;
        let mode = std::fs::metadata(path)
            .map(|meta| std::os::unix::fs::PermissionsExt::mode(&meta.permissions()))
            .unwrap_or(0);
        if mode & 0o077 != 0 {
            tracing::warn!(
                path = %path.display(),
                "the CA seal key file has mode {:o}: others on this machine may read it; make it 0600",
                mode & 0o777
            );
        }
        let bytes: [u8; SEAL_KEY_LEN] = bytes.as_slice().try_into().map_err(|_| {
            fail(format!(
                "holds {} bytes, not {SEAL_KEY_LEN}: make one with `head -c 32 /dev/urandom > FILE`",
                bytes.len()
            ))
        })?;
        Ok(SealKey::from_bytes(&bytes))
    }

    /// The key of these bytes.
    pub fn from_bytes(bytes: &[u8; SEAL_KEY_LEN]) -> SealKey {
        let key = UnboundKey::new(&CHACHA20_POLY1305, bytes)
            .expect("a 32-byte key is what ChaCha20-Poly1305 takes");
        SealKey(LessSafeKey::new(key))
    }

    /// `plain` sealed, bound to `cert_pem`: a random nonce, then the
    /// ciphertext and its tag.
    fn seal(&self, cert_pem: &str, plain: &[u8]) -> Result<Vec<u8>, SharedCaError> {
        let mut nonce = [0u8; NONCE_LEN];
        SystemRandom::new()
            .fill(&mut nonce)
            .map_err(|_| SharedCaError::Corrupt("no randomness for a nonce".into()))?;
        let mut sealed = plain.to_vec();
        self.0
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(aad(cert_pem)),
                &mut sealed,
            )
            .map_err(|_| SharedCaError::Corrupt("sealing the CA key failed".into()))?;
        Ok([&nonce[..], &sealed].concat())
    }

    /// What [`seal`](Self::seal) sealed with this key and `cert_pem`.
    fn open(&self, cert_pem: &str, sealed: &[u8]) -> Result<Vec<u8>, SharedCaError> {
        if sealed.len() < NONCE_LEN {
            return Err(SharedCaError::Corrupt(
                "the sealed CA key is too short".into(),
            ));
        }
        let (nonce, body) = sealed.split_at(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce)
            .map_err(|_| SharedCaError::Corrupt("the sealed CA key's nonce".into()))?;
        let mut body = body.to_vec();
        let plain = self
            .0
            .open_in_place(nonce, Aad::from(aad(cert_pem)), &mut body)
            .map_err(|_| SharedCaError::WrongSealKey)?;
        Ok(plain.to_vec())
    }
}

fn aad(cert_pem: &str) -> Vec<u8> {
    [AAD_LABEL, cert_pem.as_bytes()].concat()
}

/// The cluster CA as PEM: the certificate and its (unsealed) key.
pub struct CaPems {
    /// The CA certificate.
    pub cert: String,
    /// The CA's private key (PKCS#8).
    pub key: String,
}

impl std::fmt::Debug for CaPems {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CaPems").finish_non_exhaustive()
    }
}

/// The cluster CA of the database `store` holds (this coordinator holds
/// it: call only after taking it). When the database has none: the PKI
/// dir's CA if there is one there (uploaded, so a cluster that grew from
/// one coordinator keeps its CA), else a new one; stored sealed under
/// `seal` when given. A CA stored unsealed is sealed now when `seal` is
/// given. Blocks (store calls and files).
pub fn from_database(
    store: &PgStore,
    pki_dir: Option<&Path>,
    seal: Option<&SealKey>,
) -> Result<CaPems, SharedCaError> {
    let pems = match store.cluster_ca()? {
        Some(stored) => {
            let key = match (stored.sealed, seal) {
                (true, Some(seal)) => seal.open(&stored.cert_pem, &stored.key)?,
                (true, None) => return Err(SharedCaError::NoSealKey),
                (false, Some(seal)) => {
                    store.put_cluster_ca(&StoredCa {
                        cert_pem: stored.cert_pem.clone(),
                        key: seal.seal(&stored.cert_pem, &stored.key)?,
                        sealed: true,
                    })?;
                    tracing::info!(
                        "the cluster CA's key in the database was not sealed: sealed it now with --ca-seal-key-file"
                    );
                    stored.key
                }
                (false, None) => stored.key,
            };
            let key = String::from_utf8(key)
                .map_err(|_| SharedCaError::Corrupt("the CA key is not PEM".into()))?;
            CaPems {
                cert: stored.cert_pem,
                key,
            }
        }
        None => {
            let pems = match pki_dir.filter(|dir| has_ca(dir)) {
                Some(dir) => {
                    // Loaded first: its checks (key mode, the pair
                    // matching) before it goes anywhere.
                    Ca::load_or_create(dir)?;
                    let read = |name: &str| {
                        let path = dir.join(name);
                        std::fs::read_to_string(&path).map_err(|source| PkiError::Io {
                            what: "reading",
                            path,
                            source,
                        })
                    };
                    let pems = CaPems {
                        cert: read(CA_CERT_FILE)?,
                        key: read(CA_KEY_FILE)?,
                    };
                    tracing::info!(
                        pki_dir = %dir.display(),
                        "the database had no cluster CA: stored the PKI dir's, which every coordinator on the database now uses"
                    );
                    pems
                }
                None => {
                    let (ca, key) = Ca::generate(PathBuf::from(CA_CERT_FILE))?;
                    tracing::info!(
                        "made a new cluster CA and stored it in the database, for every coordinator on it"
                    );
                    CaPems {
                        cert: ca.pem(),
                        key,
                    }
                }
            };
            let stored = match seal {
                Some(seal) => StoredCa {
                    cert_pem: pems.cert.clone(),
                    key: seal.seal(&pems.cert, pems.key.as_bytes())?,
                    sealed: true,
                },
                None => StoredCa {
                    cert_pem: pems.cert.clone(),
                    key: pems.key.clone().into_bytes(),
                    sealed: false,
                },
            };
            store.put_cluster_ca(&stored)?;
            pems
        }
    };
    if seal.is_none() {
        tracing::warn!(
            "the cluster CA's key is kept unsealed in the database: anyone who can read the database can mint node certificates; seal it with --ca-seal-key-file FILE (make one with `head -c 32 /dev/urandom > FILE`)"
        );
    }
    Ok(pems)
}

fn has_ca(dir: &Path) -> bool {
    dir.join(CA_CERT_FILE).exists() && dir.join(CA_KEY_FILE).exists()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::pg::testdb;

    fn key(byte: u8) -> SealKey {
        SealKey::from_bytes(&[byte; SEAL_KEY_LEN])
    }

    fn pin(pems: &CaPems) -> String {
        let dir = tempfile::tempdir().unwrap();
        Ca::from_pems(
            &pems.cert,
            &pems.key,
            dir.path().join(CA_CERT_FILE),
            Path::new("test"),
        )
        .unwrap()
        .pin()
    }

    #[test]
    fn a_sealed_key_opens_with_its_key_and_certificate_only() {
        let sealed = key(1).seal("cert", b"secret").unwrap();
        assert!(!sealed.windows(6).any(|w| w == b"secret"));
        assert_eq!(key(1).open("cert", &sealed).unwrap(), b"secret");
        assert!(matches!(
            key(2).open("cert", &sealed),
            Err(SharedCaError::WrongSealKey)
        ));
        assert!(matches!(
            key(1).open("another cert", &sealed),
            Err(SharedCaError::WrongSealKey)
        ));
    }

    #[test]
    fn coordinators_on_one_database_share_its_ca_and_a_pki_dirs_ca_is_uploaded() {
        let url = testdb::database();
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        // Coordinator A's PKI dir has a CA from its single-machine days.
        let (local, _) = Ca::load_or_create(a.path()).unwrap();
        let first = {
            let store = PgStore::open(&url).unwrap();
            from_database(&store, Some(a.path()), None).unwrap()
        };
        assert_eq!(pin(&first), local.pin());
        // B, on another machine with an empty PKI dir, gets the same CA,
        // and serves a certificate of its own signed by it.
        let store = PgStore::open(&url).unwrap();
        let second = from_database(&store, Some(b.path()), None).unwrap();
        assert_eq!(pin(&second), local.pin());
        let config = crate::tls::TlsConfig {
            pki_dir: Some(b.path().to_owned()),
            ..crate::tls::TlsConfig::default()
        };
        let listen = "127.0.0.1:7070".parse().unwrap();
        let serving = crate::tls::ServerTls::with_ca(&config, listen, Some(&second)).unwrap();
        assert_eq!(serving.ca_pin(), local.pin());
        assert_eq!(
            std::fs::read_to_string(b.path().join(CA_CERT_FILE)).unwrap(),
            local.pem()
        );
        // Its key never touches B's disk.
        assert!(!b.path().join(CA_KEY_FILE).exists());
    }

    #[test]
    fn a_sealed_ca_needs_its_key_and_a_wrong_key_is_refused() {
        let url = testdb::database();
        let store = PgStore::open(&url).unwrap();
        let made = from_database(&store, None, Some(&key(7))).unwrap();
        let stored = store.cluster_ca().unwrap().unwrap();
        assert!(stored.sealed);
        assert!(!String::from_utf8_lossy(&stored.key).contains("PRIVATE KEY"));
        let again = from_database(&store, None, Some(&key(7))).unwrap();
        assert_eq!((pin(&again), again.key), (pin(&made), made.key));
        let err = from_database(&store, None, Some(&key(8))).unwrap_err();
        assert!(matches!(err, SharedCaError::WrongSealKey), "{err}");
        assert!(err.to_string().contains("--ca-seal-key-file"), "{err}");
        let err = from_database(&store, None, None).unwrap_err();
        assert!(matches!(err, SharedCaError::NoSealKey), "{err}");
    }

    #[test]
    fn an_unsealed_ca_is_sealed_once_a_key_is_given() {
        let store = testdb::store();
        let plain = from_database(&store, None, None).unwrap();
        assert!(!store.cluster_ca().unwrap().unwrap().sealed);
        let sealed = from_database(&store, None, Some(&key(3))).unwrap();
        assert_eq!(pin(&sealed), pin(&plain));
        assert!(store.cluster_ca().unwrap().unwrap().sealed);
        assert!(matches!(
            from_database(&store, None, None),
            Err(SharedCaError::NoSealKey)
        ));
    }
}
