//! The data dir's marker file, `STORE_ID`: written once the store's first
//! commit is on disk, it holds the store's random id (which the store
//! repeats). While it exists, a missing or empty store, or one holding
//! another store, is refused at start: a lost store never becomes a new
//! empty cluster that silently forgets every task.
//!
//! Only the stores' opening reads or writes it (and the move of a redb
//! data dir to the log, which keeps its id); nothing here knows an engine.

use std::io::Write;
use std::path::Path;

use super::engine::StoreError;

/// The marker's name inside the data dir.
pub const FILE_NAME: &str = "STORE_ID";

/// The first line's prefix; the id follows in hex.
const PREFIX: &str = "weft store ";

/// The id the marker at `path` names; `None` when there is no marker.
pub(super) fn read(path: &Path) -> Result<Option<u64>, StoreError> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(err) => {
            return Err(StoreError::Open {
                path: path.to_owned(),
                message: format!("reading the store marker: {err}"),
            });
        }
    };
    text.lines()
        .next()
        .and_then(|line| line.strip_prefix(PREFIX))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        .map(Some)
        .ok_or_else(|| StoreError::Unreadable {
            path: path.to_owned(),
            message: "the store marker is not a store id".into(),
        })
}

/// Writes the marker for store `id` at `path` (a temp file renamed over,
/// then the directory synced), so it is either whole or absent.
pub(super) fn write(path: &Path, id: u64) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    {
        let mut file = std::fs::File::create(&tmp)?;
        writeln!(file, "{PREFIX}{id:016x}")?;
        writeln!(
            file,
            "This data dir holds a Weft store. While this file exists, the coordinator \
             refuses to start if the store is missing, empty or another store."
        )?;
        file.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}
