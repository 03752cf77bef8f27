//! The revoked nodes, kept beside the CA that signed their certificates:
//! `revoked-nodes` in the PKI dir (0600), one node id per line, appended
//! and synced by `RevokeNode` before it answers.
//!
//! The store keeps revocations too; this file is what keeps them when the
//! store is lost but the CA is not (a wiped data dir with `--pki-dir`
//! elsewhere, `--in-memory --pki-dir DIR`, a data dir restored from an
//! older backup). A certificate stays valid until it expires, so the list
//! of what it may no longer do must live as long as the CA that signed it.

use std::io::Write;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;

use weft_proto::NodeId;
use weft_proto::ids::ID_LEN;

use super::pki::PkiError;

/// The file's name in the PKI dir.
pub const REVOKED_FILE: &str = "revoked-nodes";

/// Every node id in `dir`'s revocation list (none when there is no file).
/// A line that is not a node id is skipped with a warning: one damaged
/// line must not un-revoke the rest.
pub fn load(dir: &Path) -> Result<Vec<NodeId>, PkiError> {
    let path = dir.join(REVOKED_FILE);
    let text = match std::fs::read_to_string(&path) {
        Ok(text) => text,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => {
            return Err(PkiError::Io {
                what: "reading",
                path,
                source,
            });
        }
    };
    let mut ids = Vec::new();
    for (number, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        match line.parse::<NodeId>() {
            Ok(id) => ids.push(id),
            Err(_) => tracing::warn!(
                file = %path.display(),
                line = number + 1,
                "skipping a line of the revoked-node list that is not a node id"
            ),
        }
    }
    Ok(ids)
}

/// Appends `id` to `dir`'s revocation list and syncs it (and the dir,
/// when the file is new). After a line an earlier append left half
/// written (a crash, a full disk), the id goes on a line of its own: on
/// the torn line it would be skipped with it.
pub fn append(dir: &Path, id: NodeId) -> Result<(), PkiError> {
    let path = dir.join(REVOKED_FILE);
    let io = |what: &'static str| {
        let path = path.clone();
        move |source| PkiError::Io { what, path, source }
    };
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .create(true)
        .append(true)
        .mode(0o600)
        .open(&path)
        .map_err(io("opening"))?;
    let len = file.metadata().map_err(io("reading"))?.len();
    let mut line = String::with_capacity(ID_LEN + 2);
    if len > 0 {
        let mut last = [0u8; 1];
        file.read_exact_at(&mut last, len - 1)
            .map_err(io("reading"))?;
        if last[0] != b'\n' {
            line.push('\n');
        }
    }
    line.push_str(&id.to_string());
    line.push('\n');
    file.write_all(line.as_bytes()).map_err(io("writing"))?;
    file.sync_all().map_err(io("syncing"))?;
    if len == 0 {
        // A new file's name is durable once its dir is synced.
        std::fs::File::open(dir)
            .and_then(|dir| dir.sync_all())
            .map_err(|source| PkiError::Io {
                what: "syncing",
                path: dir.to_owned(),
                source,
            })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    #[test]
    fn revoked_ids_are_kept_in_order_and_a_damaged_line_does_not_lose_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        assert!(load(dir.path()).unwrap().is_empty());
        let (a, b) = (NodeId::new(), NodeId::new());
        append(dir.path(), a).unwrap();
        let path = dir.path().join(REVOKED_FILE);
        let mut text = std::fs::read_to_string(&path).unwrap();
        text.push_str("not-an-id\n\n");
        std::fs::write(&path, text).unwrap();
        append(dir.path(), b).unwrap();
        assert_eq!(load(dir.path()).unwrap(), [a, b]);
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
    }
    #[test]
    fn an_id_appended_after_a_torn_line_is_kept() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (NodeId::new(), NodeId::new());
        append(dir.path(), a).unwrap();
        let path = dir.path().join(REVOKED_FILE);
        let mut text = std::fs::read_to_string(&path).unwrap();
        // An append cut short: half an id, no newline.
        text.push_str(&NodeId::new().to_string()[..10]);
        std::fs::write(&path, text).unwrap();
        append(dir.path(), b).unwrap();
        assert_eq!(load(dir.path()).unwrap(), [a, b]);
    }
}
