//! Where the Weft binaries are: `WEFT_BIN_DIR`, else the folder of the
//! running executable (a test executable's `deps/` folder stands for its
//! parent, the cargo target folder). Finding only; starting is in
//! [`crate::child`].

use std::path::{Path, PathBuf};

use crate::error::Error;

/// The folder holding `weft-coordinator`, `weft-node` and `weft`:
/// `WEFT_BIN_DIR` if set, else the folder of the running executable, with
/// a trailing `deps` dropped (`target/debug/deps/<test>` -> `target/debug`).
pub fn bin_dir() -> Result<PathBuf, Error> {
    if let Some(dir) = std::env::var_os("WEFT_BIN_DIR") {
        return Ok(PathBuf::from(dir));
    }
    let exe = std::env::current_exe().map_err(Error::CurrentExe)?;
    Ok(beside(&exe))
}

/// The folder of executable `exe`, `deps/` standing for its parent.
fn beside(exe: &Path) -> PathBuf {
    let mut dir = exe.parent().map(Path::to_path_buf).unwrap_or_default();
    if dir.ends_with("deps") {
        dir.pop();
    }
    dir
}

/// The path of binary `name` in [`bin_dir`]; [`Error::BinaryNotFound`]
/// (which says how to build it) when it is not there.
pub fn bin_path(name: &str) -> Result<PathBuf, Error> {
    let path = bin_dir()?.join(name);
    if !path.is_file() {
        return Err(Error::BinaryNotFound { path });
    }
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_test_executable_in_deps_looks_in_the_target_folder() {
        assert_eq!(
            beside(Path::new("/t/debug/deps/e2e-1234")),
            Path::new("/t/debug")
        );
        assert_eq!(
            beside(Path::new("/t/release/weft")),
            Path::new("/t/release")
        );
    }

    #[test]
    fn a_missing_binary_says_how_to_build_it() {
        let err = bin_path("no-such-weft-binary").unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("not found: run `cargo build --bins` first (or set WEFT_BIN_DIR)"),
            "{text}"
        );
    }
}
