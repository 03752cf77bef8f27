//! The disk as a directory of files, for the log store: [`SimDir`] is a
//! [`LogDir`] whose files are [`SimFile`]s of the same disk. A creation or
//! removal is made in the running process's directory at once, and on the
//! platter at the directory's sync (or, for some, at a power cut: see
//! `State::cut`); the directory's sync counts toward the fuse like a
//! file's.

use std::io;
use std::sync::{Arc, MutexGuard};

use super::{DirChange, Inode, SimDisk, SimFile, State, power_off};
use crate::store::log::fs::{LogDir, LogFile};

/// A handle on a [`SimDisk`]'s directory for one boot: every call fails
/// once the power was cut.
#[derive(Debug)]
pub(crate) struct SimDir {
    pub(super) disk: SimDisk,
    pub(super) boot: u64,
}

impl LogFile for SimFile {
    fn len(&self) -> io::Result<u64> {
        SimFile::len(self)
    }

    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        SimFile::read(self, offset, buf)
    }

    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        SimFile::write(self, offset, buf)
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        SimFile::set_len(self, len)
    }

    fn sync_data(&self) -> io::Result<()> {
        SimFile::sync_data(self)
    }
}

impl SimDir {
    /// The disk's state while this handle's boot is the current one.
    fn live(&self) -> io::Result<MutexGuard<'_, State>> {
        let state = self.disk.lock();
        if state.powered && state.boot == self.boot {
            Ok(state)
        } else {
            Err(power_off())
        }
    }

    fn file(&self, inode: Inode) -> Arc<dyn LogFile> {
        Arc::new(SimFile {
            disk: self.disk.clone(),
            boot: self.boot,
            inode,
        })
    }
}

fn not_found(name: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::NotFound,
        format!("no simulated file {name:?}"),
    )
}

impl LogDir for SimDir {
    fn list(&self) -> io::Result<Vec<String>> {
        Ok(self.live()?.names.keys().cloned().collect())
    }

    fn create(&self, name: &str) -> io::Result<Arc<dyn LogFile>> {
        let mut state = self.live()?;
        if state.names.contains_key(name) {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("the simulated file {name:?} exists"),
            ));
        }
        let inode = state.new_file();
        state.names.insert(name.to_owned(), inode);
        state
            .dir_pending
            .push(DirChange::Create(name.to_owned(), inode));
        Ok(self.file(inode))
    }

    fn open(&self, name: &str) -> io::Result<Arc<dyn LogFile>> {
        let state = self.live()?;
        let inode = *state.names.get(name).ok_or_else(|| not_found(name))?;
        Ok(self.file(inode))
    }

    fn remove(&self, name: &str) -> io::Result<()> {
        let mut state = self.live()?;
        state.names.remove(name).ok_or_else(|| not_found(name))?;
        state.dir_pending.push(DirChange::Remove(name.to_owned()));
        Ok(())
    }

    fn sync(&self) -> io::Result<()> {
        let mut state = self.live()?;
        state.count(None, None)?;
        let state = &mut *state;
        state.dir_pending.clear();
        state.durable_names.clone_from(&state.names);
        state.syncs += 1;
        Ok(())
    }
}
