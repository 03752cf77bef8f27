//! The CA of each test cluster, by URL: a cluster serving TLS (the
//! default) registers its `ca.pem` here when it starts, so helpers that
//! only get a URL (raw channels, [`crate::fake_node`]) trust it as the
//! client, the nodes and the CLI do. Test-only bookkeeping.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use tonic::transport::{Channel, Endpoint};
use weft_proto::CoordinatorAddr;
use weft_proto::tls::Trust;

fn registry() -> &'static Mutex<HashMap<String, PathBuf>> {
    static REGISTRY: OnceLock<Mutex<HashMap<String, PathBuf>>> = OnceLock::new();
    REGISTRY.get_or_init(|| Mutex::new(HashMap::new()))
}

/// Notes that `url` is trusted by the CA in `ca_file`.
pub fn register(url: &str, ca_file: PathBuf) {
    registry()
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(url.to_owned(), ca_file);
}

/// The trust registered for `url`, if any.
pub fn for_url(url: &str) -> Option<Trust> {
    registry()
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .get(url)
        .cloned()
        .map(Trust::CaFile)
}

/// A raw `Channel` to `url` (TLS with the registered CA for `https://`),
/// or the error.
pub async fn try_channel(url: &str) -> Result<Channel, String> {
    let address = CoordinatorAddr::parse(url).map_err(|e| e.to_string())?;
    let trust = for_url(&address.url());
    let (dial, connector) =
        weft_proto::tls::dial_plan(&address, trust.as_ref()).map_err(|e| e.to_string())?;
    let endpoint = Endpoint::from_shared(dial)
        .map_err(|e| e.to_string())?
        .connect_timeout(Duration::from_secs(3));
    let result = match connector {
        Some(connector) => endpoint.connect_with_connector(connector).await,
        None => endpoint.connect().await,
    };
    result.map_err(|e| {
        let mut cause: &(dyn std::error::Error + 'static) = &e;
        while let Some(next) = cause.source() {
            cause = next;
        }
        cause.to_string()
    })
}
