//! Embeds every file of `assets/` (the dashboard's pages) in the binary:
//! writes `$OUT_DIR/assets.rs`, a table of (file name, bytes) that
//! `src/http/assets.rs` serves. A new file in `assets/` is served without
//! touching the code.

use std::fmt::Write as _;
use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?).join("assets");
    println!("cargo:rerun-if-changed={}", dir.display());
    let mut files = Vec::new();
    for entry in std::fs::read_dir(&dir)? {
        let entry = entry?;
        println!("cargo:rerun-if-changed={}", entry.path().display());
        if !entry.file_type()?.is_file() {
            continue;
        }
        let name = entry
            .file_name()
            .into_string()
            .map_err(|name| format!("asset file name is not UTF-8: {}", name.to_string_lossy()))?;
        if name.starts_with('.') {
            continue;
        }
        files.push((name, entry.path()));
    }
    files.sort();
    let mut out = String::from("/// Every file of `coordinator/assets/`, by name.\n");
    out.push_str("pub(crate) static ASSETS: &[(&str, &[u8])] = &[\n");
    for (name, path) in &files {
        writeln!(
            out,
            "    ({name:?}, include_bytes!({:?})),",
            path.display().to_string()
        )?;
    }
    out.push_str("];\n");
    std::fs::write(
        PathBuf::from(std::env::var("OUT_DIR")?).join("assets.rs"),
        out,
    )?;
    Ok(())
}
