//! The cluster CA's row (`cluster_ca`, migration 2): read and written as
//! it is; what it holds, and its sealing, are `tls::shared_ca`'s.

use super::PgStore;
use crate::store::StoreError;

/// The cluster CA as the database keeps it (migration 2): every
/// coordinator on the database serves and signs with it.
#[derive(Clone, PartialEq, Eq)]
pub struct StoredCa {
    /// The CA certificate, PEM.
    pub cert_pem: String,
    /// The CA's private key (PKCS#8 PEM), sealed when `sealed`.
    pub key: Vec<u8>,
    /// Whether `key` is sealed under the operator's key.
    pub sealed: bool,
}

impl std::fmt::Debug for StoredCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key, sealed or not.
        f.debug_struct("StoredCa")
            .field("sealed", &self.sealed)
            .finish_non_exhaustive()
    }
}

impl PgStore {
    /// The cluster CA the database keeps, if any.
    pub fn cluster_ca(&self) -> Result<Option<StoredCa>, StoreError> {
        let op = "reading the cluster CA";
        self.read(op, |reader| async move {
            let row = reader
                .query_opt(
                    op,
                    "SELECT cert_pem, key, sealed FROM cluster_ca WHERE id = 1",
                    &[],
                )
                .await?;
            Ok(row.map(|row| StoredCa {
                cert_pem: row.get(0),
                key: row.get(1),
                sealed: row.get(2),
            }))
        })
    }

    /// Keeps `ca` as the cluster CA, replacing the one kept (only the
    /// coordinator holding the database writes it).
    pub fn put_cluster_ca(&self, ca: &StoredCa) -> Result<(), StoreError> {
        let op = "writing the cluster CA";
        let writer = self.writer()?;
        self.run(op, async {
            writer
                .execute(
                    op,
                    "INSERT INTO cluster_ca (id, cert_pem, key, sealed) VALUES (1, $1, $2, $3)
                     ON CONFLICT (id) DO UPDATE SET cert_pem = EXCLUDED.cert_pem,
                        key = EXCLUDED.key, sealed = EXCLUDED.sealed, updated_at = now()",
                    &[&ca.cert_pem, &ca.key, &ca.sealed],
                )
                .await?;
            Ok(())
        })
    }
}
