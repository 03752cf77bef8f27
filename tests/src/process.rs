//! The real binaries as child processes, for tests: `weft_cluster`'s
//! finding and spawning, with its errors turned into test failures that
//! say how to fix them. Starting, signalling and reaping is all
//! `weft_cluster`'s [`ChildProcess`].

use std::path::{Path, PathBuf};

pub use weft_cluster::{ChildProcess, Spawn};

/// The folder holding `weft-coordinator`, `weft-node` and `weft`:
/// `WEFT_BIN_DIR` if set, else the cargo target folder this test executable
/// was built into (`target/debug/deps/<test>` -> `target/debug`).
pub fn bin_dir() -> PathBuf {
    weft_cluster::bin_dir().unwrap_or_else(|e| panic!("{e}"))
}

/// The path of binary `name`, failing the test with the fix when it is missing.
pub fn bin_path(name: &str) -> PathBuf {
    weft_cluster::bin_path(name).unwrap_or_else(|e| panic!("{e}"))
}

/// Starts binary `bin` with `args` in `dir`, logging to `<dir>/<label>.log`;
/// fails the test if it cannot.
pub fn spawn(bin: &str, args: &[String], dir: &Path, label: &str) -> ChildProcess {
    Spawn::new(bin_path(bin), dir, label)
        .args(args)
        .spawn()
        .unwrap_or_else(|e| panic!("{e}: {}", source_of(&e)))
}

/// The cause under a `weft_cluster` error, for panic messages.
pub fn source_of(err: &weft_cluster::Error) -> String {
    std::error::Error::source(err).map_or_else(String::new, ToString::to_string)
}
