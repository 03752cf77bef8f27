//! The schema, versioned: each migration is a SQL file applied once, in
//! order, and recorded in `weft_migrations` with its checksum. Opening a
//! store applies what is missing in one transaction under an advisory
//! lock, so two coordinators starting together never race. A database at
//! a newer version than this binary knows, or a migration whose text
//! changed since it was applied, is refused rather than guessed at.

use sha2::{Digest, Sha256};
use tokio_postgres::Client;

use super::{Target, backend};
use crate::store::StoreError;

/// Every migration: version (from 1, no gaps), name, SQL.
pub(super) const MIGRATIONS: &[(i32, &str, &str)] = &[
    (1, "init", include_str!("sql/0001_init.sql")),
    (2, "cluster_ca", include_str!("sql/0002_cluster_ca.sql")),
];

/// The advisory lock opening takes: "weft" in ASCII.
const LOCK_KEY: i64 = 0x7765_6674;

/// Brings the database to the latest version, in one transaction.
pub(super) async fn migrate(client: &mut Client, target: &Target) -> Result<(), StoreError> {
    let op = "migrating the schema";
    let tx = client.transaction().await.map_err(|e| backend(op, &e))?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&LOCK_KEY])
        .await
        .map_err(|e| backend(op, &e))?;
    tx.batch_execute(
        "CREATE TABLE IF NOT EXISTS weft_migrations (
            version integer PRIMARY KEY,
            name text NOT NULL,
            checksum bytea NOT NULL,
            applied_at timestamptz NOT NULL DEFAULT now())",
    )
    .await
    .map_err(|e| backend(op, &e))?;
    let applied = tx
        .query(
            "SELECT version, checksum FROM weft_migrations ORDER BY version",
            &[],
        )
        .await
        .map_err(|e| backend(op, &e))?;
    let latest = MIGRATIONS.last().map_or(0, |m| m.0);
    let mut done = 0;
    for row in &applied {
        let (version, checksum): (i32, Vec<u8>) = (row.get(0), row.get(1));
        let Some((_, name, sql)) = MIGRATIONS.iter().find(|m| m.0 == version) else {
            return Err(target.refused(format!(
                "its schema is at version {version}, newer than this coordinator's {latest}: run a newer coordinator"
            )));
        };
        if checksum != checksum_of(sql) {
            return Err(target.refused(format!(
                "migration {version} ({name}) was applied with other SQL than this coordinator's"
            )));
        }
        done = done.max(version);
    }
    for (version, name, sql) in MIGRATIONS.iter().filter(|m| m.0 > done) {
        tx.batch_execute(sql).await.map_err(|e| backend(op, &e))?;
        tx.execute(
            "INSERT INTO weft_migrations (version, name, checksum) VALUES ($1, $2, $3)",
            &[version, name, &checksum_of(sql)],
        )
        .await
        .map_err(|e| backend(op, &e))?;
        tracing::info!(version, name, "database schema migrated");
    }
    tx.commit().await.map_err(|e| backend(op, &e))
}

fn checksum_of(sql: &str) -> Vec<u8> {
    Sha256::digest(sql.as_bytes()).to_vec()
}
