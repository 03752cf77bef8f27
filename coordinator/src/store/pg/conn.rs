//! The store's connections. Each is opened again on the next call once it
//! is lost (PostgreSQL restarted, a network blip), and keeps the
//! statements it has prepared, so a statement is parsed and planned once
//! per connection, not once per call.
//!
//! Every session asks the server for TCP keepalives and a user timeout
//! (`lease.rs` says why and how long): PostgreSQL then ends the session of
//! a coordinator cut off from it, and so frees its coordinator lock,
//! within a bounded time. A session whose `synchronous_commit` is off
//! turns it on: a commit is acknowledged only once it is on the server's
//! disk.
//!
//! Nothing here retries a write: a call that met the loss fails, and a
//! commit whose outcome is unknown (the connection lost mid-`COMMIT`)
//! stops the coordinator as before. Only the next call reconnects; while
//! the server is down, that fails with [`StoreError::Unreachable`].

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};

use tokio_postgres::types::ToSql;
use tokio_postgres::{Client, Config, GenericClient, NoTls, Row, Statement};

use super::lease::{KEEPALIVE_COUNT, KEEPALIVE_IDLE, KEEPALIVE_INTERVAL, SESSION_DEADLINE};
use super::{Target, backend, connect_failed};
use crate::store::StoreError;

/// Where and how connections are opened: the driver's configuration, and
/// the TLS connector when the URL asks for TLS (`tls.rs`).
#[derive(Clone)]
pub(super) struct Connect {
    pub(super) config: Config,
    pub(super) tls: Option<tokio_postgres_rustls::MakeRustlsConnect>,
}

/// Connects with `tls` and spawns the connection's driving task on the
/// current runtime; answers the client.
async fn connect_with<T>(config: &Config, tls: T) -> Result<Client, tokio_postgres::Error>
where
    T: tokio_postgres::tls::MakeTlsConnect<tokio_postgres::Socket>,
    T::Stream: Send + 'static,
{
    let (client, connection) = config.connect(tls).await?;
    tokio::spawn(async move {
        if let Err(err) = connection.await {
            tracing::warn!(error = %err, "PostgreSQL connection lost");
        }
    });
    Ok(client)
}

/// One open connection and what it has prepared.
pub(super) struct Conn {
    pub(super) client: Client,
    pub(super) statements: Statements,
}

impl Conn {
    /// Opens a connection to `config`'s server. Its driving task runs on
    /// the current runtime (the store's own) until the connection closes.
    pub(super) async fn open(connect: &Connect, target: &Target) -> Result<Conn, StoreError> {
        let client = match &connect.tls {
            Some(tls) => connect_with(&connect.config, tls.clone()).await,
            None => connect_with(&connect.config, NoTls).await,
        }
        .map_err(|err| connect_failed(target, &err))?;
        let failed = |err: tokio_postgres::Error| connect_failed(target, &err);
        // Per session (any user may set these; ignored on a Unix socket).
        client
            .batch_execute(&session_settings())
            .await
            .map_err(failed)?;
        // What this coordinator acknowledges must be on the server's disk:
        // with `synchronous_commit` off (a server, database or role
        // setting), COMMIT answers before the write-ahead log is flushed,
        // and a crash of the server loses it. Any other setting (`local`,
        // `on`, the remote ones) waits for at least the local flush and is
        // kept.
        let sync: String = client
            .query_one("SHOW synchronous_commit", &[])
            .await
            .map_err(failed)?
            .get(0);
        if sync == "off" {
            client
                .batch_execute("SET synchronous_commit = on")
                .await
                .map_err(failed)?;
            tracing::warn!(database = %target.0, "synchronous_commit is off for this database; the coordinator's sessions set it to on, so that what it acknowledges survives a crash of the server");
        }
        Ok(Conn {
            client,
            statements: Statements::default(),
        })
    }

    /// Whether the connection is gone: the next call opens another.
    pub(super) fn is_closed(&self) -> bool {
        self.client.is_closed()
    }

    /// `sql` prepared on this connection.
    pub(super) async fn prepared(&self, sql: &str) -> Result<Statement, tokio_postgres::Error> {
        self.statements.get(&self.client, sql).await
    }

    /// The rows of `sql` (prepared once per connection) with `params`;
    /// a driver error is the store error of `op`.
    pub(super) async fn query(
        &self,
        op: &'static str,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Vec<Row>, StoreError> {
        let statement = self.prepared(sql).await.map_err(|e| backend(op, &e))?;
        self.client
            .query(&statement, params)
            .await
            .map_err(|e| backend(op, &e))
    }

    /// The row of `sql`, if any (see [`Conn::query`]).
    pub(super) async fn query_opt(
        &self,
        op: &'static str,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Option<Row>, StoreError> {
        let statement = self.prepared(sql).await.map_err(|e| backend(op, &e))?;
        self.client
            .query_opt(&statement, params)
            .await
            .map_err(|e| backend(op, &e))
    }

    /// Runs `sql` for its effect (see [`Conn::query`]): the rows it changed.
    pub(super) async fn execute(
        &self,
        op: &'static str,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<u64, StoreError> {
        let statement = self.prepared(sql).await.map_err(|e| backend(op, &e))?;
        self.client
            .execute(&statement, params)
            .await
            .map_err(|e| backend(op, &e))
    }
}

/// The `SET`s each session starts with: the server's keepalives and user
/// timeout, so that it ends a silent session within
/// [`SESSION_DEADLINE`].
fn session_settings() -> String {
    format!(
        "SET tcp_keepalives_idle = {}; SET tcp_keepalives_interval = {}; \
         SET tcp_keepalives_count = {}; SET tcp_user_timeout = {}",
        KEEPALIVE_IDLE.as_secs(),
        KEEPALIVE_INTERVAL.as_secs(),
        KEEPALIVE_COUNT,
        SESSION_DEADLINE.as_millis()
    )
}

/// The statements one connection has prepared, by their SQL.
#[derive(Default)]
pub(super) struct Statements(Mutex<HashMap<String, Statement>>);

impl Statements {
    /// `sql` prepared through `client` (the connection, or a transaction
    /// on it): the first time, then from the cache. Two calls racing to
    /// prepare it both do, and one statement is kept.
    pub(super) async fn get(
        &self,
        client: &impl GenericClient,
        sql: &str,
    ) -> Result<Statement, tokio_postgres::Error> {
        let cached = self.lock().get(sql).cloned();
        if let Some(statement) = cached {
            return Ok(statement);
        }
        let statement = client.prepare(sql).await?;
        self.lock().insert(sql.to_owned(), statement.clone());
        Ok(statement)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Statement>> {
        // A map of prepared statements is whole whatever panicked.
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// How many are cached (tests).
    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.lock().len()
    }
}
