//! The few file operations the log store makes, behind a trait, so the
//! power-cut tests can put the store on a simulated disk that loses what
//! was not synced (`power_cut.rs`), and production on the real one.
//!
//! The contract is the one a real disk gives: a write or a length change
//! is durable once the file's `sync_data` returned; a file's creation or
//! removal is durable once the directory's `sync` returned.

use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// A directory of log files.
pub(crate) trait LogDir: Send + Sync + std::fmt::Debug {
    /// The names of the files in it.
    fn list(&self) -> io::Result<Vec<String>>;
    /// Creates a new, empty file; an error if it exists.
    fn create(&self, name: &str) -> io::Result<Arc<dyn LogFile>>;
    /// Opens an existing file for reading and writing.
    fn open(&self, name: &str) -> io::Result<Arc<dyn LogFile>>;
    /// Removes a file (open handles keep reading it).
    fn remove(&self, name: &str) -> io::Result<()>;
    /// Makes creations and removals so far durable.
    fn sync(&self) -> io::Result<()>;
}

/// One log file: positional reads and writes, so readers and the writer
/// never share a cursor.
pub(crate) trait LogFile: Send + Sync + std::fmt::Debug {
    /// Its length.
    fn len(&self) -> io::Result<u64>;
    /// Fills `buf` from `offset`; an error if the file ends first.
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    /// Writes all of `buf` at `offset`.
    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()>;
    /// Cuts or extends the file to `len`.
    fn set_len(&self, len: u64) -> io::Result<()>;
    /// Makes its data (and length) durable.
    fn sync_data(&self) -> io::Result<()>;
}

/// The real file system.
#[derive(Debug)]
pub(crate) struct RealDir {
    path: PathBuf,
}

impl RealDir {
    /// The directory at `path`, which must exist.
    pub(crate) fn new(path: &Path) -> RealDir {
        RealDir {
            path: path.to_owned(),
        }
    }
}

#[derive(Debug)]
struct RealFile(std::fs::File);

impl LogDir for RealDir {
    fn list(&self) -> io::Result<Vec<String>> {
        let mut names = Vec::new();
        for entry in std::fs::read_dir(&self.path)? {
            if let Ok(name) = entry?.file_name().into_string() {
                names.push(name);
            }
        }
        Ok(names)
    }

    fn create(&self, name: &str) -> io::Result<Arc<dyn LogFile>> {
        use std::os::unix::fs::OpenOptionsExt;
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(self.path.join(name))?;
        Ok(Arc::new(RealFile(file)))
    }

    fn open(&self, name: &str) -> io::Result<Arc<dyn LogFile>> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(self.path.join(name))?;
        Ok(Arc::new(RealFile(file)))
    }

    fn remove(&self, name: &str) -> io::Result<()> {
        std::fs::remove_file(self.path.join(name))
    }

    fn sync(&self) -> io::Result<()> {
        std::fs::File::open(&self.path)?.sync_all()
    }
}

impl LogFile for RealFile {
    fn len(&self) -> io::Result<u64> {
        Ok(self.0.metadata()?.len())
    }

    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.0.read_exact_at(buf, offset)
    }

    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.0.write_all_at(buf, offset)
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.0.set_len(len)
    }

    fn sync_data(&self) -> io::Result<()> {
        self.0.sync_data()
    }
}
