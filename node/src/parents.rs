//! What an exec attempt is given of the tasks it runs after, and where it
//! may leave its own result: a private directory per attempt holding
//! `parents/` (`$WEFT_PARENTS`: one file per parent, named by its ref or
//! else its id, a repeated name suffixed `.2`, `.3`, with its output, and
//! `index.json` listing them in `after` order) and `output` (`$WEFT_OUTPUT`: what the process writes there is
//! read when it exits and reported as the task's output). The directory is
//! removed with the attempt. The contract is proto/README.md's
//! "Dependencies".
//!
//! Plain files and std only; no runtime, no coordinator.

use std::collections::{HashMap, HashSet};
use std::fmt::Write as _;
use std::io::Read as _;
use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _};
use std::path::{Path, PathBuf};

use bytes::Bytes;
use nix::libc;

use weft_proto::{Attempt, TaskId};

use crate::handlers::ParentResult;

/// Environment variable naming the parents' directory.
pub const PARENTS_ENV: &str = "WEFT_PARENTS";
/// Environment variable naming the file an exec task may write its
/// result to.
pub const OUTPUT_ENV: &str = "WEFT_OUTPUT";

/// An attempt's private directory; removed when dropped.
#[derive(Debug)]
pub(crate) struct AttemptDir {
    root: PathBuf,
}

/// The parents' index in `$WEFT_PARENTS`, never a parent's file.
const INDEX: &str = "index.json";

/// A name made only of `A-Z a-z 0-9 _ . : -`, the characters a parent's
/// file name may hold.
fn is_safe_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b':' | b'-'))
}

/// The files the parents' outputs are written to, in order: each one's
/// ref, or its id when it has none or one that is not a safe name (see
/// [`is_safe_name`]; `.`, `..` and `index.json` are not); a name taken by
/// an earlier parent gets `.2`, `.3`, ... (the first free). The Python
/// worker's rule (`weft/worker/parents.py`), so tasks move between
/// workers unchanged.
pub(crate) fn file_names(parents: &[ParentResult]) -> Vec<String> {
    file_names_probing(parents, &mut 0)
}

/// [`file_names`], counting in `probes` the names it tried. Each base
/// name's search goes on from the suffix after the one it last gave: the
/// names it passed were taken then, and names are never given back, so the
/// first free one is the same as a search from `.2` would find. So
/// 10,000 parents of one ref take O(n) tries, not O(n²).
fn file_names_probing(parents: &[ParentResult], probes: &mut usize) -> Vec<String> {
    let mut taken: HashSet<String> = HashSet::with_capacity(parents.len());
    let mut next: HashMap<String, u64> = HashMap::new();
    parents
        .iter()
        .map(|parent| {
            let base = match parent.ref_name.as_str() {
                "." | ".." | INDEX => parent.task_id.to_string(),
                name if is_safe_name(name) => name.to_owned(),
                _ => parent.task_id.to_string(),
            };
            *probes += 1;
            if !taken.contains(&base) && base != INDEX {
                taken.insert(base.clone());
                return base;
            }
            let mut n = next.get(&base).copied().unwrap_or(2);
            let name = loop {
                *probes += 1;
                let name = format!("{base}.{n}");
                if !taken.contains(&name) && name != INDEX {
                    break name;
                }
                n += 1;
            };
            next.insert(base, n + 1);
            taken.insert(name.clone());
            name
        })
        .collect()
}

fn json_str(out: &mut String, text: &str) {
    out.push('"');
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// `index.json`: `[{"task_id", "ref", "state", "file"}, ...]` in order,
/// `names` the parents' files ([`file_names`]).
fn index_json(parents: &[ParentResult], names: &[String]) -> String {
    let mut out = String::from("[");
    for (i, (p, name)) in parents.iter().zip(names).enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push_str("{\"task_id\":");
        json_str(&mut out, &p.task_id.to_string());
        out.push_str(",\"ref\":");
        json_str(&mut out, &p.ref_name);
        out.push_str(",\"state\":");
        json_str(&mut out, p.state.as_str());
        out.push_str(",\"file\":");
        json_str(&mut out, name);
        out.push('}');
    }
    out.push_str("]\n");
    out
}

impl AttemptDir {
    /// Makes the directory (mode 0700) under the system temp dir, with the
    /// parents' files.
    pub(crate) fn create(
        task_id: TaskId,
        attempt: Attempt,
        parents: &[ParentResult],
    ) -> std::io::Result<AttemptDir> {
        let root = std::env::temp_dir().join(format!(
            "weft-{task_id}-{}-{}",
            attempt.0,
            std::process::id()
        ));
        // A leftover of a killed node's earlier run of this attempt.
        let _ = std::fs::remove_dir_all(&root);
        std::fs::DirBuilder::new().mode(0o700).create(&root)?;
        let dir = AttemptDir { root };
        let parents_dir = dir.parents();
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&parents_dir)?;
        let names = file_names(parents);
        for (parent, name) in parents.iter().zip(&names) {
            std::fs::write(parents_dir.join(name), &parent.output)?;
        }
        std::fs::write(parents_dir.join(INDEX), index_json(parents, &names))?;
        Ok(dir)
    }

    /// `$WEFT_PARENTS`.
    pub(crate) fn parents(&self) -> PathBuf {
        self.root.join("parents")
    }

    /// `$WEFT_OUTPUT`.
    pub(crate) fn output(&self) -> PathBuf {
        self.root.join("output")
    }

    /// What the process left in `$WEFT_OUTPUT` (empty when it wrote
    /// nothing), at most `limit` bytes; `Err` says why not. Read on a
    /// blocking thread, never on the runtime's.
    pub(crate) async fn read_output(&self, limit: usize) -> Result<Bytes, String> {
        let path = self.output();
        tokio::task::spawn_blocking(move || read_bounded(&path, limit))
            .await
            .unwrap_or_else(|err| Err(format!("reading ${OUTPUT_ENV}: {err}")))
    }
}

/// Reads the regular file at `path`, at most `limit` bytes. The task
/// chose what is there: a FIFO (whose open would wait for a writer
/// forever), a device or a link elsewhere is refused without being read.
fn read_bounded(path: &Path, limit: usize) -> Result<Bytes, String> {
    let not_regular = || format!("${OUTPUT_ENV} is not a regular file");
    let opened = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOFOLLOW)
        .open(path);
    let file = match opened {
        Ok(file) => file,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(Bytes::new()),
        // O_NOFOLLOW's answer for a symbolic link.
        Err(err) if err.raw_os_error() == Some(libc::ELOOP) => return Err(not_regular()),
        Err(err) => return Err(format!("reading ${OUTPUT_ENV}: {err}")),
    };
    match file.metadata() {
        Ok(meta) if meta.is_file() => {}
        Ok(_) => return Err(not_regular()),
        Err(err) => return Err(format!("reading ${OUTPUT_ENV}: {err}")),
    }
    let mut data = Vec::new();
    let cap = u64::try_from(limit).unwrap_or(u64::MAX).saturating_add(1);
    file.take(cap)
        .read_to_end(&mut data)
        .map_err(|err| format!("reading ${OUTPUT_ENV}: {err}"))?;
    if data.len() > limit {
        return Err(format!(
            "the ${OUTPUT_ENV} file is larger than {limit} bytes, the most a task's output may be"
        ));
    }
    Ok(Bytes::from(data))
}

impl Drop for AttemptDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

#[cfg(test)]
mod tests {
    use weft_proto::TaskState;

    use super::*;

    fn parent(ref_name: &str, output: &str) -> ParentResult {
        ParentResult {
            task_id: TaskId::new(),
            ref_name: ref_name.into(),
            state: TaskState::Succeeded,
            output: Bytes::from(output.to_owned()),
        }
    }

    #[test]
    fn parents_are_files_by_ref_or_id_with_an_index_in_order() {
        let (a, b) = (parent("prep", "data"), parent("", "more"));
        let dir =
            AttemptDir::create(TaskId::new(), Attempt(1), &[a.clone(), b.clone()]).expect("dir");
        let parents = dir.parents();
        assert_eq!(std::fs::read(parents.join("prep")).unwrap(), b"data");
        assert_eq!(
            std::fs::read(parents.join(b.task_id.to_string())).unwrap(),
            b"more"
        );
        let index = std::fs::read_to_string(parents.join("index.json")).unwrap();
        assert_eq!(
            index,
            format!(
                "[{{\"task_id\":\"{}\",\"ref\":\"prep\",\"state\":\"succeeded\",\"file\":\"prep\"}},{{\"task_id\":\"{}\",\"ref\":\"\",\"state\":\"succeeded\",\"file\":\"{}\"}}]\n",
                a.task_id, b.task_id, b.task_id
            )
        );
        let root = dir.root.clone();
        drop(dir);
        assert!(!root.exists(), "removed with the attempt");
    }

    #[tokio::test]
    async fn the_output_file_is_read_within_the_limit() {
        let dir = AttemptDir::create(TaskId::new(), Attempt(1), &[]).expect("dir");
        assert_eq!(dir.read_output(10).await.unwrap(), Bytes::new());
        std::fs::write(dir.output(), b"result").unwrap();
        assert_eq!(&dir.read_output(10).await.unwrap()[..], b"result");
        let err = dir.read_output(3).await.unwrap_err();
        assert!(err.contains("larger than 3 bytes"), "{err}");
    }

    /// Whatever the task left at `$WEFT_OUTPUT` instead of a file, reading
    /// it answers at once: a FIFO with no writer is not waited on, and a
    /// link to another file is not followed.
    #[test]
    fn an_output_that_is_not_a_regular_file_is_refused_at_once() {
        let outside = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(outside.path(), b"not the task's").unwrap();
        for what in ["a FIFO", "a directory", "a symbolic link"] {
            let dir = AttemptDir::create(TaskId::new(), Attempt(1), &[]).expect("dir");
            let path = dir.output();
            match what {
                "a FIFO" => {
                    let made = std::process::Command::new("mkfifo")
                        .arg(&path)
                        .status()
                        .unwrap();
                    assert!(made.success());
                }
                "a directory" => std::fs::create_dir(&path).unwrap(),
                _ => std::os::unix::fs::symlink(outside.path(), &path).unwrap(),
            }
            let err = read_bounded(&path, 1024).unwrap_err();
            assert_eq!(err, "$WEFT_OUTPUT is not a regular file", "{what}");
        }
    }

    #[test]
    fn odd_refs_fall_back_to_the_id() {
        let names = |p: &ParentResult| file_names(std::slice::from_ref(p)).remove(0);
        for odd in ["", ".", "..", "index.json", "a/b", "sp ace", "é"] {
            let p = parent(odd, "");
            assert_eq!(names(&p), p.task_id.to_string(), "{odd:?}");
        }
        assert_eq!(names(&parent("a.b:c-d_E9", "")), "a.b:c-d_E9");
    }

    /// Two parents of one ref (from different Submits) each keep their
    /// output: the later ones are suffixed `.2`, `.3`, as the Python
    /// worker names them, and the index lists each file once.
    #[test]
    fn parents_with_the_same_ref_get_distinct_files() {
        let parents = [
            parent("build", "first"),
            parent("build", "second"),
            parent("build.2", "third"),
            parent("build", "fourth"),
        ];
        let dir = AttemptDir::create(TaskId::new(), Attempt(1), &parents).expect("dir");
        let names = file_names(&parents);
        assert_eq!(names, ["build", "build.2", "build.2.2", "build.3"]);
        for (name, p) in names.iter().zip(&parents) {
            assert_eq!(std::fs::read(dir.parents().join(name)).unwrap(), p.output);
        }
        let index = std::fs::read_to_string(dir.parents().join("index.json")).unwrap();
        for name in &names {
            let file = format!("\"file\":\"{name}\"");
            assert_eq!(index.matches(&file).count(), 1, "{file} in {index}");
        }
    }

    /// Many parents of one ref get the names the first-free search gives
    /// (a literal `build.2` still skipped), each name found in a bounded
    /// number of tries rather than one per earlier parent of that ref.
    #[test]
    fn ten_thousand_parents_of_one_ref_are_named_in_linear_time() {
        let mut parents: Vec<ParentResult> = (0..10_000).map(|_| parent("build", "")).collect();
        parents.insert(1, parent("build.3", ""));
        let mut probes = 0;
        let names = file_names_probing(&parents, &mut probes);
        assert_eq!(
            &names[..5],
            ["build", "build.3", "build.2", "build.4", "build.5"]
        );
        assert_eq!(names.last().map(String::as_str), Some("build.10001"));
        let distinct: HashSet<&String> = names.iter().collect();
        assert_eq!(distinct.len(), names.len());
        assert!(
            probes <= 2 * names.len() + 1,
            "{probes} tries for {} names",
            names.len()
        );
    }
}
