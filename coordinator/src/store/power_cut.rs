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
//! that did not land is back with its durable contents. A fuse armed with
//! [`SimDisk::fail_at_sync`] fails a sync with the power on instead, and
//! the file's unsynced writes are lost (a writeback error).
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

pub(crate) use dir::SimDir;

mod dir;

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
    /// The call the last fuse blew in, until the next power-on.
    blown_in: Option<Op>,
}

/// A call the fuse counts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Op {
    /// A file's write.
    Write,
    /// A file's length change.
    Resize,
    /// A file's sync.
    FileSync,
    /// The directory's sync.
    DirSync,
}

/// A power cut to come.
#[derive(Clone, Copy, Debug)]
struct Fuse {
    /// Calls left until it blows (it blows in the last).
    left: u64,
    /// Only syncs count: the cut comes with every write since the last
    /// sync still in the cache.
    syncs_only: bool,
    /// What it does.
    blow: Blow,
}

/// What a fuse does when it blows.
#[derive(Clone, Copy, Debug)]
enum Blow {
    /// Cuts the power, `Survivors` surviving.
    Cut(Survivors),
    /// Fails the call with an I/O error, the power staying on. A failed
    /// file sync also loses that file's unsynced writes (a writeback
    /// error: the pages are dropped, and a later sync succeeds without
    /// them): the file reads as it was at its last sync.
    Fail,
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
    /// directory when `None`); an error when the armed fuse blew on it:
    /// the power is then off and the change was not made, though a torn
    /// write may have partly landed; or the call failed with the power on.
    fn count(&mut self, inode: Option<Inode>, change: Option<&Pending>) -> io::Result<()> {
        self.ops += 1;
        let Some(fuse) = self.fuse.as_mut() else {
            return Ok(());
        };
        if fuse.syncs_only && change.is_some() {
            return Ok(());
        }
        if fuse.left > 1 {
            fuse.left -= 1;
            return Ok(());
        }
        let blow = fuse.blow;
        self.fuse = None;
        self.blown_in = Some(match (inode, change) {
            (_, Some(Pending::Write { .. })) => Op::Write,
            (_, Some(Pending::SetLen(_))) => Op::Resize,
            (Some(_), None) => Op::FileSync,
            (None, None) => Op::DirSync,
        });
        let image = inode.and_then(|inode| self.files.get_mut(&inode));
        match blow {
            Blow::Cut(survivors) => {
                // The change was under way: it can be the torn one.
                if let (Some(image), Some(change)) = (image, change) {
                    image.pending.push(change.clone());
                }
                self.cut(survivors);
                Err(power_off())
            }
            Blow::Fail => {
                if let (Some(image), None) = (image, change) {
                    image.pending.clear();
                    image.current.clone_from(&image.durable);
                }
                Err(io::Error::other("the simulated disk failed the call"))
            }
        }
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
        state.blown_in = None;
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
            blow: Blow::Cut(survivors),
        });
    }

    /// Cuts the power during the `nth` sync (of a file or the directory)
    /// from now (1: the next one), which then fails, with every change
    /// since the sync before it unsynced.
    pub(crate) fn arm_at_sync(&self, nth: u64, survivors: Survivors) {
        self.lock().fuse = Some(Fuse {
            left: nth.max(1),
            syncs_only: true,
            blow: Blow::Cut(survivors),
        });
    }

    /// Fails the `nth` sync (of a file or the directory) from now (1: the
    /// next one) with an I/O error, the power staying on; a failed file
    /// sync loses the file's unsynced writes (see `Blow::Fail`).
    pub(crate) fn fail_at_sync(&self, nth: u64) {
        self.lock().fuse = Some(Fuse {
            left: nth.max(1),
            syncs_only: true,
            blow: Blow::Fail,
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

    /// The call an armed fuse blew in since power-on, if one did.
    pub(crate) fn blown_in(&self) -> Option<Op> {
        self.lock().blown_in
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

    /// Changes the files of a running disk (a sector going bad under a
    /// running store): `change` gets each file's name and bytes twice,
    /// once as the platter keeps them and once as the process reads them.
    pub(crate) fn rot_under_power(&self, mut change: impl FnMut(&str, &mut Vec<u8>)) {
        let mut state = self.lock();
        assert!(state.powered, "rot a running disk");
        let state = &mut *state;
        for (name, inode) in &state.names {
            if let Some(image) = state.files.get_mut(inode) {
                change(name, &mut image.durable);
                change(name, &mut image.current);
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
        state.count(Some(self.inode), Some(&change))?;
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
        state.count(Some(self.inode), None)?;
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

#[cfg(test)]
mod tests;
