//! A simulated disk with a volatile write cache, for power-cut tests.
//!
//! [`SimDisk`] holds two images of one file: the *durable* one, what the
//! platter keeps, and the one the running process reads, which also holds
//! every write since the last `sync_data`. Writes and length changes land
//! in the volatile cache and become durable only when synced. A power cut
//! ([`SimDisk::cut`], or a fuse armed with [`SimDisk::arm`] that blows at
//! the Nth write, resize or sync) throws the cache away, except what the
//! chosen [`Survivors`] say reached the platter first: nothing, all of it,
//! an in-order prefix of the unsynced writes with the last one torn at a
//! sector, or any subset of the unsynced sectors (a cache that reorders).
//!
//! After a cut every handle of the old "boot" fails each call with an I/O
//! error, as a dead machine would, so the old store's shutdown writes reach
//! nothing; [`SimDisk::attach`] powers the disk on again and gives a handle
//! on what survived. The durable image is shared (the disk is an `Arc`),
//! so a test cuts power under one store and opens another on the remains.
//!
//! The handle ([`SimFile`]) has plain `read`/`write`/`set_len`/`sync_data`
//! methods, so any engine can sit on it; [`redb::StorageBackend`] is
//! implemented on top for [`RedbStore`](super::RedbStore).

use std::io;
use std::sync::{Arc, Mutex, MutexGuard};

/// The sector size: the unit a torn write keeps or loses.
pub(crate) const SECTOR: u64 = 512;

/// What of the unsynced writes reaches the platter when the power fails.
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

/// One change made since the last sync.
#[derive(Clone, Debug)]
enum Pending {
    Write { offset: u64, data: Vec<u8> },
    SetLen(u64),
}

#[derive(Debug, Default)]
struct State {
    /// What survives a power cut.
    durable: Vec<u8>,
    /// What the running process reads: `durable` with `pending` applied.
    current: Vec<u8>,
    /// Changes since the last sync, oldest first.
    pending: Vec<Pending>,
    /// Bumped at every cut and power-on: handles of an older boot are dead.
    boot: u64,
    /// Whether the power is on (a handle of the current boot works).
    powered: bool,
    /// The armed power cut, if any.
    fuse: Option<Fuse>,
    /// Writes, resizes and syncs made since power-on.
    ops: u64,
    /// Syncs made since power-on.
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

/// A disk holding one file, with a volatile write cache. Cloning shares it.
#[derive(Clone, Debug, Default)]
pub(crate) struct SimDisk {
    state: Arc<Mutex<State>>,
}

/// A handle on a [`SimDisk`]'s file for one boot: every call fails once
/// the power was cut.
#[derive(Debug)]
pub(crate) struct SimFile {
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

impl State {
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

    fn cut(&mut self, survivors: Survivors) {
        self.durable = self.survive(survivors);
        self.current = self.durable.clone();
        self.pending.clear();
        self.powered = false;
        self.fuse = None;
        self.boot += 1;
    }

    /// Counts a write, resize or sync; false when the armed fuse blew on it
    /// (the power is then off and the change was not made, though a torn
    /// write may have partly landed).
    fn count(&mut self, change: Option<&Pending>) -> bool {
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
        if let Some(change) = change {
            self.pending.push(change.clone());
        }
        self.cut(survivors);
        false
    }
}

impl SimDisk {
    /// An empty disk, powered off until [`attach`](Self::attach).
    pub(crate) fn new() -> SimDisk {
        SimDisk::default()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panicking test thread poisons nothing a later test reads.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Powers the disk on (cutting the power first, losing every unsynced
    /// change, if it was on) and gives a handle on the file that survived.
    pub(crate) fn attach(&self) -> SimFile {
        let mut state = self.lock();
        if state.powered {
            state.cut(Survivors::None);
        }
        state.boot += 1;
        state.powered = true;
        state.ops = 0;
        state.syncs = 0;
        SimFile {
            disk: self.clone(),
            boot: state.boot,
        }
    }

    /// Cuts the power now: unsynced changes are lost but for `survivors`.
    pub(crate) fn cut(&self, survivors: Survivors) {
        let mut state = self.lock();
        if state.powered {
            state.cut(survivors);
        }
    }

    /// Cuts the power during the `after`th write, resize or sync from now
    /// (1: the next one), which then fails. Armed while the power is off,
    /// it counts from the next power-on.
    pub(crate) fn arm(&self, after: u64, survivors: Survivors) {
        self.lock().fuse = Some(Fuse {
            left: after.max(1),
            syncs_only: false,
            survivors,
        });
    }

    /// Cuts the power during the `nth` sync from now (1: the next one),
    /// which then fails, with every write since the sync before it unsynced.
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

    /// Changes the durable image of a powered-off disk (bit rot, a bad
    /// sector): `change` gets the bytes the next power-on reads.
    pub(crate) fn on_platter<T>(&self, change: impl FnOnce(&mut Vec<u8>) -> T) -> T {
        let mut state = self.lock();
        assert!(!state.powered, "change the platter with the power off");
        let out = change(&mut state.durable);
        state.current = state.durable.clone();
        out
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

    /// The file's length as the running process sees it.
    pub(crate) fn len(&self) -> io::Result<u64> {
        Ok(self.live()?.current.len() as u64)
    }

    /// Reads `out.len()` bytes at `offset`; past the end is an error.
    pub(crate) fn read(&self, offset: u64, out: &mut [u8]) -> io::Result<()> {
        let state = self.live()?;
        let start = usize::try_from(offset).map_err(|_| eof())?;
        let end = start.checked_add(out.len()).ok_or_else(eof)?;
        let bytes = state.current.get(start..end).ok_or_else(eof)?;
        out.copy_from_slice(bytes);
        Ok(())
    }

    /// Writes `data` at `offset`, into the volatile cache.
    pub(crate) fn write(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        let mut state = self.live()?;
        let change = Pending::Write {
            offset,
            data: data.to_vec(),
        };
        if !state.count(Some(&change)) {
            return Err(power_off());
        }
        apply(&mut state.current, &change);
        state.pending.push(change);
        Ok(())
    }

    /// Sets the length (new bytes read as zeros), in the volatile cache.
    pub(crate) fn set_len(&self, len: u64) -> io::Result<()> {
        let mut state = self.live()?;
        let change = Pending::SetLen(len);
        if !state.count(Some(&change)) {
            return Err(power_off());
        }
        apply(&mut state.current, &change);
        state.pending.push(change);
        Ok(())
    }

    /// Makes every change so far durable.
    pub(crate) fn sync_data(&self) -> io::Result<()> {
        let mut state = self.live()?;
        if !state.count(None) {
            return Err(power_off());
        }
        let pending = std::mem::take(&mut state.pending);
        for change in &pending {
            apply(&mut state.durable, change);
        }
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
}
