//! A simulated disk with a volatile write cache, for power-cut tests.
//!
//! A [`SimDisk`] keeps two images of each file: the *durable* one, what
//! the platter keeps, and the one the running process reads, which also
//! holds every write since the file's last sync. Writes and length changes
//! land in the volatile cache and become durable only when the file is
//! synced; a file's creation or removal becomes durable only when the
//! directory is synced. A power cut ([`SimDisk::cut`], or a fuse armed
//! with [`SimDisk::arm`] that blows at the Nth write, resize, file sync or
//! directory sync, over all files) throws the cache away, except what the
//! chosen [`Survivors`] say reached the platter first: nothing, all of it,
//! an in-order prefix of each file's unsynced writes with the last one
//! torn at a sector, or any subset of each file's unsynced sectors (a
//! cache that reorders). Unsynced creations and removals land as an
//! in-order prefix (file systems journal them in order): none of them with
//! [`Survivors::None`], all with [`Survivors::All`], a seeded prefix
//! otherwise. A created file that did not land is gone; a removed one
//! that did not land is back with its durable contents.
//!
//! After a cut every handle of the old "boot" fails each call with an I/O
//! error, as a dead machine would, so the old store's shutdown writes reach
//! nothing. Powering on again gives new handles on what survived: the
//! disk is an `Arc`, so a test cuts power under one store and opens
//! another on the remains. A disk is used one of two ways:
//! - as one file, for an engine that sits on a single file:
//!   [`SimDisk::attach`] gives a [`SimFile`] with plain
//!   `read`/`write`/`set_len`/`sync_data` methods, and
//!   [`redb::StorageBackend`] is implemented on top for
//!   [`RedbStore`](super::RedbStore);
//! - as a directory of files, for the log store: [`SimDisk::mount`] gives
//!   a [`SimDir`], a [`LogDir`] whose files are [`LogFile`]s.

use std::collections::BTreeMap;
use std::io;
use std::sync::{Arc, Mutex, MutexGuard};

use super::log::fs::{LogDir, LogFile};

/// The sector size: the unit a torn write keeps or loses.
pub(crate) const SECTOR: u64 = 512;

/// The name of the file a disk used as one file holds.
const ONE_FILE: &str = "disk";

/// What of the unsynced changes reaches the platter when the power fails.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Survivors {
    /// Nothing that was not synced.
    None,
    /// Everything: the cache was written back, but the sync under way (if
    /// any) never returned.
    All,
    /// The unsynced writes land in the order they were made, up to one
    /// chosen by `seed`, of which only a whole-sector prefix lands.
    TornPrefix {
        /// Picks where the stream stops.
        seed: u64,
    },
    /// Each unsynced sector independently lands or not (with its latest
    /// contents), and the file keeps its synced length or its latest one:
    /// a cache that writes back in any order.
    AnySectors {
        /// Picks the sectors.
        seed: u64,
    },
}

impl Survivors {
    /// The same mode with the seed mixed with `salt`, so each file (and
    /// the directory) of a disk loses its own choice of changes; salt 0
    /// keeps the seed, so a one-file disk replays as it always did.
    fn salted(self, salt: u64) -> Survivors {
        let mix = |seed: u64| seed.wrapping_add(salt.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        match self {
            Survivors::None | Survivors::All => self,
            Survivors::TornPrefix { seed } => Survivors::TornPrefix { seed: mix(seed) },
            Survivors::AnySectors { seed } => Survivors::AnySectors { seed: mix(seed) },
        }
    }
}

/// One change made to a file since its last sync.
#[derive(Clone, Debug)]
enum Pending {
    Write { offset: u64, data: Vec<u8> },
    SetLen(u64),
}

/// One change made to the directory since its last sync.
#[derive(Clone, Debug)]
enum DirChange {
    Create(String, Inode),
    Remove(String),
}

/// A file, apart from the names it has.
type Inode = u64;

/// One file's contents.
#[derive(Debug, Default)]
struct Image {
    /// What survives a power cut.
    durable: Vec<u8>,
    /// What the running process reads: `durable` with `pending` applied.
    current: Vec<u8>,
    /// Changes since the last sync, oldest first.
    pending: Vec<Pending>,
}

#[derive(Debug, Default)]
struct State {
    /// Every file, named or not (a removed file lives on while a handle
    /// of this boot may read it; a cut drops the ones no durable name
    /// keeps).
    files: BTreeMap<Inode, Image>,
    /// The directory as the running process sees it.
    names: BTreeMap<String, Inode>,
    /// The directory as the platter keeps it.
    durable_names: BTreeMap<String, Inode>,
    /// Creations and removals since the last directory sync, oldest first.
    dir_pending: Vec<DirChange>,
    next_inode: Inode,
    /// Bumped at every cut and power-on: handles of an older boot are dead.
    boot: u64,
    /// Whether the power is on (a handle of the current boot works).
    powered: bool,
    /// The armed power cut, if any.
    fuse: Option<Fuse>,
    /// Writes, resizes and syncs made since power-on.
    ops: u64,
    /// Syncs (of files and of the directory) made since power-on.
    syncs: u64,
}

/// A power cut to come.
#[derive(Clone, Copy, Debug)]
struct Fuse {
    /// Calls left until it blows (it blows in the last).
    left: u64,
    /// Only syncs count: the cut comes with every write since the last
    /// sync still in the cache.
    syncs_only: bool,
    /// What survives it.
    survivors: Survivors,
}

/// A disk with a volatile write cache. Cloning shares it.
#[derive(Clone, Debug, Default)]
pub(crate) struct SimDisk {
    state: Arc<Mutex<State>>,
}

/// A handle on one of a [`SimDisk`]'s files for one boot: every call fails
/// once the power was cut.
#[derive(Debug)]
pub(crate) struct SimFile {
    disk: SimDisk,
    boot: u64,
    inode: Inode,
}

/// A handle on a [`SimDisk`]'s directory for one boot: every call fails
/// once the power was cut.
#[derive(Debug)]
pub(crate) struct SimDir {
    disk: SimDisk,
    boot: u64,
}

fn power_off() -> io::Error {
    io::Error::other("the simulated disk lost power")
}

/// A small deterministic generator (splitmix64), so a seed replays a cut.
#[derive(Clone, Debug)]
pub(crate) struct Rng(u64);

impl Rng {
    pub(crate) fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    pub(crate) fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A number in `0..n` (0 when `n` is 0).
    pub(crate) fn below(&mut self, n: u64) -> u64 {
        if n == 0 { 0 } else { self.next_u64() % n }
    }

    /// True one time in `n`.
    pub(crate) fn one_in(&mut self, n: u64) -> bool {
        self.below(n) == 0
    }
}

fn apply(image: &mut Vec<u8>, change: &Pending) {
    match change {
        Pending::Write { offset, data } => write_at(image, *offset, data),
        Pending::SetLen(len) => resize(image, *len),
    }
}

fn resize(image: &mut Vec<u8>, len: u64) {
    image.resize(
        usize::try_from(len).expect("a simulated file fits in memory"),
        0,
    );
}

/// Writes `data` at `offset`, growing the image (with zeros) as a write
/// past the end of a file does.
fn write_at(image: &mut Vec<u8>, offset: u64, data: &[u8]) {
    let start = usize::try_from(offset).expect("a simulated file fits in memory");
    let end = start + data.len();
    if image.len() < end {
        image.resize(end, 0);
    }
    image[start..end].copy_from_slice(data);
}

impl Image {
    /// The image after a power cut now: the durable one plus what of the
    /// pending changes `survivors` lets through.
    fn survive(&self, survivors: Survivors) -> Vec<u8> {
        let mut image = self.durable.clone();
        match survivors {
            Survivors::None => {}
            Survivors::All => image.clone_from(&self.current),
            Survivors::TornPrefix { seed } => {
                let mut rng = Rng::new(seed);
                let stop =
                    usize::try_from(rng.below(self.pending.len() as u64 + 1)).unwrap_or(usize::MAX);
                for change in self.pending.iter().take(stop) {
                    apply(&mut image, change);
                }
                if let Some(Pending::Write { offset, data }) = self.pending.get(stop) {
                    // The write being made when the power failed: the
                    // sectors before some boundary inside it landed.
                    let end = offset + data.len() as u64;
                    let first = offset.div_ceil(SECTOR);
                    let last = end / SECTOR;
                    if last >= first {
                        let boundary = (first + rng.below(last - first + 1)) * SECTOR;
                        let kept = usize::try_from(boundary.saturating_sub(*offset))
                            .unwrap_or(0)
                            .min(data.len());
                        write_at(&mut image, *offset, &data[..kept]);
                    }
                }
            }
            Survivors::AnySectors { seed } => {
                let mut rng = Rng::new(seed);
                let len = if rng.one_in(2) {
                    self.current.len()
                } else {
                    self.durable.len()
                };
                image.resize(len, 0);
                let mut sectors: Vec<u64> = self
                    .pending
                    .iter()
                    .filter_map(|change| match change {
                        Pending::Write { offset, data } if !data.is_empty() => {
                            let end = offset + data.len() as u64;
                            Some(offset / SECTOR..end.div_ceil(SECTOR))
                        }
                        _ => None,
                    })
                    .flatten()
                    .collect();
                sectors.sort_unstable();
                sectors.dedup();
                for sector in sectors {
                    if !rng.one_in(2) {
                        continue;
                    }
                    let start = usize::try_from(sector * SECTOR).unwrap_or(usize::MAX);
                    let end = (start + SECTOR as usize).min(self.current.len()).min(len);
                    if start < end {
                        image[start..end].copy_from_slice(&self.current[start..end]);
                    }
                }
            }
        }
        image
    }

    /// Loses the cache, but for what `survivors` let through.
    fn cut(&mut self, survivors: Survivors) {
        self.durable = self.survive(survivors);
        self.current = self.durable.clone();
        self.pending.clear();
    }

    /// Makes a change in the cache.
    fn change(&mut self, change: Pending) {
        apply(&mut self.current, &change);
        self.pending.push(change);
    }

    /// Makes every change so far durable.
    fn sync(&mut self) {
        for change in std::mem::take(&mut self.pending) {
            apply(&mut self.durable, &change);
        }
    }
}

/// Salts the directory's survivors apart from every file's.
const DIR_SALT: u64 = u64::MAX;

impl State {
    fn cut(&mut self, survivors: Survivors) {
        // The directory's unsynced changes land as an in-order prefix.
        let landed = match survivors.salted(DIR_SALT) {
            Survivors::None => 0,
            Survivors::All => self.dir_pending.len(),
            Survivors::TornPrefix { seed } | Survivors::AnySectors { seed } => {
                usize::try_from(Rng::new(seed).below(self.dir_pending.len() as u64 + 1))
                    .unwrap_or(0)
            }
        };
        for change in self.dir_pending.drain(..).take(landed) {
            match change {
                DirChange::Create(name, inode) => self.durable_names.insert(name, inode),
                DirChange::Remove(name) => self.durable_names.remove(&name),
            };
        }
        self.names.clone_from(&self.durable_names);
        let named: std::collections::BTreeSet<Inode> =
            self.durable_names.values().copied().collect();
        self.files.retain(|inode, _| named.contains(inode));
        for (inode, image) in &mut self.files {
            image.cut(survivors.salted(*inode));
        }
        self.powered = false;
        self.fuse = None;
        self.boot += 1;
    }

    /// Counts a write, resize or sync (of `inode`'s file, or of the
    /// directory when `None`); false when the armed fuse blew on it (the
    /// power is then off and the change was not made, though a torn write
    /// may have partly landed).
    fn count(&mut self, inode: Option<Inode>, change: Option<&Pending>) -> bool {
        self.ops += 1;
        let Some(fuse) = self.fuse.as_mut() else {
            return true;
        };
        if fuse.syncs_only && change.is_some() {
            return true;
        }
        if fuse.left > 1 {
            fuse.left -= 1;
            return true;
        }
        let survivors = fuse.survivors;
        // The change was under way: it can be the torn one.
        if let (Some(inode), Some(change)) = (inode, change)
            && let Some(image) = self.files.get_mut(&inode)
        {
            image.pending.push(change.clone());
        }
        self.cut(survivors);
        false
    }

    /// A new, empty file (not named yet).
    fn new_file(&mut self) -> Inode {
        let inode = self.next_inode;
        self.next_inode += 1;
        self.files.insert(inode, Image::default());
        inode
    }
}

impl SimDisk {
    /// An empty disk, powered off until [`attach`](Self::attach) or
    /// [`mount`](Self::mount).
    pub(crate) fn new() -> SimDisk {
        SimDisk::default()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panicking test thread poisons nothing a later test reads.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Powers the disk on (cutting the power first, losing every unsynced
    /// change, if it was on); the new boot's number.
    fn power_on(state: &mut State) -> u64 {
        if state.powered {
            state.cut(Survivors::None);
        }
        state.boot += 1;
        state.powered = true;
        state.ops = 0;
        state.syncs = 0;
        state.boot
    }

    /// Powers the disk on (see [`mount`](Self::mount)) and gives a handle
    /// on its one file (made, empty and durable, on a new disk).
    pub(crate) fn attach(&self) -> SimFile {
        let mut state = self.lock();
        let boot = SimDisk::power_on(&mut state);
        let inode = match state.names.get(ONE_FILE) {
            Some(inode) => *inode,
            None => {
                let inode = state.new_file();
                state.names.insert(ONE_FILE.to_owned(), inode);
                state.durable_names.insert(ONE_FILE.to_owned(), inode);
                inode
            }
        };
        SimFile {
            disk: self.clone(),
            boot,
            inode,
        }
    }

    /// Powers the disk on (cutting the power first, losing every unsynced
    /// change, if it was on) and gives a handle on its directory as it
    /// survived.
    pub(crate) fn mount(&self) -> SimDir {
        let boot = SimDisk::power_on(&mut self.lock());
        SimDir {
            disk: self.clone(),
            boot,
        }
    }

    /// Cuts the power now: unsynced changes are lost but for `survivors`.
    pub(crate) fn cut(&self, survivors: Survivors) {
        let mut state = self.lock();
        if state.powered {
            state.cut(survivors);
        }
    }

    /// Cuts the power during the `after`th write, resize or sync (of any
    /// file, or of the directory) from now (1: the next one), which then
    /// fails. Armed while the power is off, it counts from the next
    /// power-on.
    pub(crate) fn arm(&self, after: u64, survivors: Survivors) {
        self.lock().fuse = Some(Fuse {
            left: after.max(1),
            syncs_only: false,
            survivors,
        });
    }

    /// Cuts the power during the `nth` sync (of a file or the directory)
    /// from now (1: the next one), which then fails, with every change
    /// since the sync before it unsynced.
    pub(crate) fn arm_at_sync(&self, nth: u64, survivors: Survivors) {
        self.lock().fuse = Some(Fuse {
            left: nth.max(1),
            syncs_only: true,
            survivors,
        });
    }

    /// Takes back an armed fuse that has not blown.
    pub(crate) fn disarm(&self) {
        self.lock().fuse = None;
    }

    /// Whether the power is off (cut, or the fuse blew).
    pub(crate) fn is_off(&self) -> bool {
        !self.lock().powered
    }

    /// Writes, resizes and syncs since power-on.
    pub(crate) fn ops(&self) -> u64 {
        self.lock().ops
    }

    /// Syncs since power-on.
    pub(crate) fn syncs(&self) -> u64 {
        self.lock().syncs
    }

    /// Changes the durable image of a powered-off one-file disk (bit rot,
    /// a bad sector): `change` gets the bytes the next power-on reads.
    pub(crate) fn on_platter<T>(&self, change: impl FnOnce(&mut Vec<u8>) -> T) -> T {
        let mut change = Some(change);
        let mut out = None;
        self.on_platter_each(|name, image| {
            if name == ONE_FILE
                && let Some(change) = change.take()
            {
                out = Some(change(image));
            }
        });
        out.expect("a one-file disk holds its file")
    }

    /// Changes the durable images of a powered-off disk's files: `change`
    /// gets each file's name and the bytes the next power-on reads.
    pub(crate) fn on_platter_each(&self, mut change: impl FnMut(&str, &mut Vec<u8>)) {
        let mut state = self.lock();
        assert!(!state.powered, "change the platter with the power off");
        let state = &mut *state;
        for (name, inode) in &state.durable_names {
            if let Some(image) = state.files.get_mut(inode) {
                change(name, &mut image.durable);
                image.current.clone_from(&image.durable);
            }
        }
    }
}

impl SimFile {
    /// The disk's state while this handle's boot is the current one.
    fn live(&self) -> io::Result<MutexGuard<'_, State>> {
        let state = self.disk.lock();
        if state.powered && state.boot == self.boot {
            Ok(state)
        } else {
            Err(power_off())
        }
    }

    fn image<'a>(&self, state: &'a mut State) -> io::Result<&'a mut Image> {
        // A handle's file outlives its name until the power goes, and a
        // handle never outlives the power.
        state
            .files
            .get_mut(&self.inode)
            .ok_or_else(|| io::Error::other("the simulated file is gone"))
    }

    /// Makes a change in the cache, counted by the fuse.
    fn change(&self, change: Pending) -> io::Result<()> {
        let mut state = self.live()?;
        self.image(&mut state)?;
        if !state.count(Some(self.inode), Some(&change)) {
            return Err(power_off());
        }
        self.image(&mut state)?.change(change);
        Ok(())
    }

    /// The file's length as the running process sees it.
    pub(crate) fn len(&self) -> io::Result<u64> {
        let mut state = self.live()?;
        Ok(self.image(&mut state)?.current.len() as u64)
    }

    /// Reads `out.len()` bytes at `offset`; past the end is an error.
    pub(crate) fn read(&self, offset: u64, out: &mut [u8]) -> io::Result<()> {
        let mut state = self.live()?;
        let image = self.image(&mut state)?;
        let start = usize::try_from(offset).map_err(|_| eof())?;
        let end = start.checked_add(out.len()).ok_or_else(eof)?;
        let bytes = image.current.get(start..end).ok_or_else(eof)?;
        out.copy_from_slice(bytes);
        Ok(())
    }

    /// Writes `data` at `offset`, into the volatile cache.
    pub(crate) fn write(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        self.change(Pending::Write {
            offset,
            data: data.to_vec(),
        })
    }

    /// Sets the length (new bytes read as zeros), in the volatile cache.
    pub(crate) fn set_len(&self, len: u64) -> io::Result<()> {
        self.change(Pending::SetLen(len))
    }

    /// Makes every change so far to this file durable.
    pub(crate) fn sync_data(&self) -> io::Result<()> {
        let mut state = self.live()?;
        self.image(&mut state)?;
        if !state.count(Some(self.inode), None) {
            return Err(power_off());
        }
        self.image(&mut state)?.sync();
        state.syncs += 1;
        Ok(())
    }
}

fn eof() -> io::Error {
    io::Error::new(
        io::ErrorKind::UnexpectedEof,
        "read past the end of the file",
    )
}

impl redb::StorageBackend for SimFile {
    fn len(&self) -> Result<u64, io::Error> {
        SimFile::len(self)
    }

    fn read(&self, offset: u64, out: &mut [u8]) -> Result<(), io::Error> {
        SimFile::read(self, offset, out)
    }

    fn set_len(&self, len: u64) -> Result<(), io::Error> {
        SimFile::set_len(self, len)
    }

    fn sync_data(&self) -> Result<(), io::Error> {
        SimFile::sync_data(self)
    }

    fn write(&self, offset: u64, data: &[u8]) -> Result<(), io::Error> {
        SimFile::write(self, offset, data)
    }
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
        if !state.count(None, None) {
            return Err(power_off());
        }
        let state = &mut *state;
        state.dir_pending.clear();
        state.durable_names.clone_from(&state.names);
        state.syncs += 1;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn disk_with(synced: &[u8], unsynced: &[(u64, &[u8])]) -> (SimDisk, SimFile) {
        let disk = SimDisk::new();
        let file = disk.attach();
        file.write(0, synced).unwrap();
        file.sync_data().unwrap();
        for (offset, data) in unsynced {
            file.write(*offset, data).unwrap();
        }
        (disk, file)
    }

    fn image(disk: &SimDisk) -> Vec<u8> {
        let file = disk.attach();
        let mut out = vec![0; usize::try_from(file.len().unwrap()).unwrap()];
        file.read(0, &mut out).unwrap();
        out
    }

    #[test]
    fn a_cut_keeps_what_was_synced_and_drops_the_rest() {
        let (disk, file) = disk_with(&[1; 1024], &[(0, &[2; 512]), (1024, &[3; 512])]);
        let mut read = [0; 4];
        file.read(1020, &mut read).unwrap();
        assert_eq!(read, [1, 1, 1, 1], "the process reads its own writes");
        assert_eq!(file.len().unwrap(), 1536);
        disk.cut(Survivors::None);
        assert!(
            file.read(0, &mut read).is_err(),
            "a dead handle still reads"
        );
        assert!(file.write(0, &[9]).is_err(), "a dead handle still writes");
        assert_eq!(image(&disk), vec![1; 1024]);
    }

    #[test]
    fn the_fuse_blows_on_the_chosen_call_and_fails_it() {
        let (disk, file) = disk_with(&[1; 512], &[]);
        disk.arm(2, Survivors::None);
        file.write(0, &[2; 512]).unwrap();
        assert_eq!((disk.ops(), disk.syncs()), (3, 1));
        assert!(file.sync_data().is_err(), "the sync the power failed in");
        assert_eq!(disk.syncs(), 1, "a failed sync counted");
        assert!(disk.is_off());
        assert_eq!(image(&disk), vec![1; 512]);

        let file = disk.attach();
        disk.arm_at_sync(2, Survivors::None);
        for byte in [3, 4] {
            file.write(0, &[byte; 512]).unwrap();
        }
        file.sync_data().unwrap();
        file.write(0, &[5; 512]).unwrap();
        assert!(file.sync_data().is_err(), "the second sync went through");
        assert_eq!(image(&disk), vec![4; 512]);
    }

    #[test]
    fn a_torn_write_keeps_a_whole_sector_prefix_of_itself() {
        for seed in 0..64 {
            let (disk, _file) = disk_with(&[0; 2048], &[(0, &[7; 2048])]);
            disk.cut(Survivors::TornPrefix { seed });
            let after = image(&disk);
            let kept = after.iter().take_while(|b| **b == 7).count();
            assert_eq!(
                kept % SECTOR as usize,
                0,
                "seed {seed}: torn inside a sector"
            );
            assert!(
                after[kept..].iter().all(|b| *b == 0),
                "seed {seed}: not a prefix"
            );
        }
    }

    #[test]
    fn a_reordering_cache_keeps_any_set_of_whole_sectors() {
        let mut seen = std::collections::BTreeSet::new();
        for seed in 0..64 {
            let (disk, _file) = disk_with(&[0; 2048], &[(0, &[7; 2048])]);
            disk.cut(Survivors::AnySectors { seed });
            let after = image(&disk);
            let kept: Vec<bool> = after.chunks(SECTOR as usize).map(|s| s[0] == 7).collect();
            for sector in after.chunks(SECTOR as usize) {
                assert!(
                    sector.iter().all(|b| *b == sector[0]),
                    "seed {seed}: torn sector"
                );
            }
            seen.insert(kept);
        }
        assert!(
            seen.len() > 4,
            "only {} sector sets in 64 seeds",
            seen.len()
        );
    }

    /// The names on a mounted directory and each file's contents.
    fn files(dir: &SimDir) -> Vec<(String, Vec<u8>)> {
        let mut out = Vec::new();
        for name in dir.list().unwrap() {
            let file = dir.open(&name).unwrap();
            let mut bytes = vec![0; usize::try_from(file.len().unwrap()).unwrap()];
            file.read_exact_at(&mut bytes, 0).unwrap();
            out.push((name, bytes));
        }
        out
    }

    #[test]
    fn a_created_file_lasts_a_cut_only_once_the_directory_was_synced() {
        let disk = SimDisk::new();
        let dir = disk.mount();
        let kept = dir.create("kept").unwrap();
        kept.write_all_at(b"kept", 0).unwrap();
        kept.sync_data().unwrap();
        dir.sync().unwrap();
        let lost = dir.create("lost").unwrap();
        lost.write_all_at(b"lost", 0).unwrap();
        lost.sync_data().unwrap();
        assert!(dir.create("lost").is_err(), "created twice");
        disk.cut(Survivors::None);
        assert!(dir.list().is_err(), "a dead directory handle still lists");
        assert!(kept.sync_data().is_err(), "a dead file handle still syncs");
        let dir = disk.mount();
        assert_eq!(files(&dir), [("kept".to_owned(), b"kept".to_vec())]);
    }

    #[test]
    fn a_removed_file_is_back_with_its_durable_contents_after_a_cut_before_the_directory_sync() {
        let disk = SimDisk::new();
        let dir = disk.mount();
        let file = dir.create("old").unwrap();
        file.write_all_at(b"synced", 0).unwrap();
        file.sync_data().unwrap();
        dir.sync().unwrap();
        file.write_all_at(b"cached", 0).unwrap();
        dir.remove("old").unwrap();
        assert!(dir.list().unwrap().is_empty());
        let mut read = [0; 6];
        file.read_exact_at(&mut read, 0).unwrap();
        assert_eq!(&read, b"cached", "an open handle reads a removed file");
        disk.cut(Survivors::None);
        let dir = disk.mount();
        assert_eq!(files(&dir), [("old".to_owned(), b"synced".to_vec())]);

        dir.remove("old").unwrap();
        dir.sync().unwrap();
        disk.cut(Survivors::All);
        assert!(disk.mount().list().unwrap().is_empty());
    }

    #[test]
    fn unsynced_creations_and_removals_land_as_an_in_order_prefix() {
        let mut seen = std::collections::BTreeSet::new();
        for seed in 0..32 {
            let disk = SimDisk::new();
            let dir = disk.mount();
            for name in ["a", "b", "c"] {
                dir.create(name).unwrap();
            }
            dir.remove("a").unwrap();
            disk.cut(Survivors::AnySectors { seed });
            let names = disk.mount().list().unwrap();
            let names: Vec<&str> = names.iter().map(String::as_str).collect();
            let prefixes = [&[][..], &["a"], &["a", "b"], &["a", "b", "c"], &["b", "c"]];
            assert!(
                prefixes.contains(&names.as_slice()),
                "seed {seed}: {names:?} is not a prefix"
            );
            seen.insert(names.join(","));
        }
        assert!(seen.len() > 2, "only {seen:?} in 32 seeds");
    }

    #[test]
    fn the_fuse_counts_the_writes_and_syncs_of_every_file_and_the_directory() {
        let disk = SimDisk::new();
        let dir = disk.mount();
        let a = dir.create("a").unwrap();
        let b = dir.create("b").unwrap();
        disk.arm(4, Survivors::All);
        a.write_all_at(&[1; 512], 0).unwrap();
        b.write_all_at(&[2; 512], 0).unwrap();
        a.sync_data().unwrap();
        assert_eq!((disk.ops(), disk.syncs()), (3, 1));
        assert!(
            dir.sync().is_err(),
            "the directory sync the power failed in"
        );
        assert!(disk.is_off());
        // Everything in the cache landed, the directory's changes too.
        let dir = disk.mount();
        assert_eq!(
            files(&dir),
            [
                ("a".to_owned(), vec![1; 512]),
                ("b".to_owned(), vec![2; 512])
            ]
        );

        disk.arm_at_sync(2, Survivors::None);
        let a = dir.open("a").unwrap();
        a.write_all_at(&[3; 512], 0).unwrap();
        dir.sync().unwrap();
        a.write_all_at(&[4; 512], 0).unwrap();
        assert!(a.sync_data().is_err(), "the second sync went through");
        let dir = disk.mount();
        assert_eq!(files(&dir)[0], ("a".to_owned(), vec![1; 512]));
    }
}
