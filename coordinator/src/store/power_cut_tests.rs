//! Power cuts under the durable stores: the real engine on a simulated
//! disk whose unsynced changes are lost when the power fails
//! (`power_cut.rs`), driven through the [`Store`] trait with the workload
//! of `power_cut_tests/workload.rs` (batches, token writes, retention
//! sweeps). The replay and the bit-rot helpers here serve every engine;
//! the redb store's cases are here, the log store's in
//! `log/power_cut_tests.rs`.
//!
//! Each seed replays one history: a few rounds of writes, each ended by a
//! power cut between two writes or in the middle of one (a fuse that blows
//! at the Nth write, resize or sync), with nothing, everything, an in-order
//! torn prefix, or any set of the unsynced sectors surviving; sometimes the
//! power fails again while the store recovers. An engine that compacts
//! runs compaction steps between the writes, so cuts land in those too.
//! After each cut the store is opened again on what survived and must hold
//! every write that returned `Ok`, and the write that did not return
//! either whole or not at all; `load` must give the same live tasks, counts
//! and secrets. A failing seed is named in the panic;
//! `WEFT_POWER_CUT_SEEDS=N` (and `WEFT_POWER_CUT_FIRST_SEED`) run other
//! seeds than CI's (each engine's [`Engine::seeds`]).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::UNIX_EPOCH;

use bytes::Bytes;

use weft_proto::{OutputStream, TaskId, TaskSpec, TaskState};

use super::power_cut::{Op, Rng, SimDisk, Survivors};
use super::*;

mod workload;

pub(super) use workload::{Model, Writer, holds, task_view};

/// Seeds run by `cargo test` on the redb store.
const SEEDS: u64 = 60;

/// An engine under test as the replay drives it: the [`Store`] trait, and
/// the upkeep the engine runs beside the commits.
pub(super) trait UnderTest: Store {
    /// One compaction step; false when there was nothing worth doing (and
    /// always, for an engine that does not compact).
    fn compact_step(&self) -> Result<bool, StoreError> {
        Ok(false)
    }

    /// How many stored bytes are the latest record of something, for an
    /// engine that keeps count (to decide what to compact): a reopened
    /// store must count what the running one did.
    fn live_bytes(&self) -> Result<Option<u64>, StoreError> {
        Ok(None)
    }
}

impl UnderTest for RedbStore {}

/// Powers `disk` on and opens the engine under test on what it holds;
/// `fresh`: the disk is new, nothing was opened on it before. An engine on
/// one file uses the disk as one ([`SimDisk::attach`]), an engine on a
/// directory of files mounts it ([`SimDisk::mount`]).
pub(super) type Opener = fn(&SimDisk, &Path, bool) -> Result<Box<dyn UnderTest>, String>;

/// An engine, and how the replay cuts power under it.
pub(super) struct Engine {
    pub open: Opener,
    /// About how many writes, resizes and syncs a commit makes: the fuse
    /// is armed within that many per commit, so most cuts land in one.
    pub ops_per_commit: u64,
    /// About how many writes, resizes and syncs opening makes after a
    /// cut: a second cut is armed within that many.
    pub recovery_ops: u64,
    /// Cuts per seed.
    pub rounds: u64,
    /// Seeds `cargo test` runs.
    pub seeds: u64,
}

/// The redb store, on the disk as one file.
const REDB: Engine = Engine {
    open: open_redb,
    ops_per_commit: 30,
    recovery_ops: 20,
    rounds: 3,
    seeds: SEEDS,
};

/// Opens a store with `open`; an error or a panic while opening is the
/// error, saying whether the store called it damage.
pub(super) fn opened<S: UnderTest>(
    open: impl FnOnce() -> Result<S, StoreError>,
) -> Result<Box<dyn UnderTest>, String> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(open)) {
        Ok(Ok(store)) => Ok(Box::new(store)),
        Ok(Err(err)) => Err(format!(
            "the store did not open (damage: {}): {err}",
            err.is_damage()
        )),
        Err(panic) => Err(format!("opening panicked: {}", panic_message(&*panic))),
    }
}

/// The redb store on `disk`.
fn open_redb(disk: &SimDisk, label: &Path, _fresh: bool) -> Result<Box<dyn UnderTest>, String> {
    let file = disk.attach();
    opened(|| RedbStore::open_with_backend(file, label))
}

/// A cut's survivors, and their mode's number (for the tally).
fn survivors(rng: &mut Rng) -> (Survivors, usize) {
    let seed = rng.next_u64();
    let mode = rng.below(4);
    let survivors = match mode {
        0 => Survivors::None,
        1 => Survivors::All,
        2 => Survivors::TornPrefix { seed },
        _ => Survivors::AnySectors { seed },
    };
    (survivors, usize::try_from(mode).unwrap_or(0))
}

/// How the cuts of the seeds run went.
#[derive(Debug, Default)]
pub(super) struct Tally {
    pub cuts: u64,
    /// Cuts by what survived them: none, all, a torn prefix, any sectors.
    pub by_survivors: [u64; 4],
    /// Cuts during a write (which then failed).
    pub mid_commit: u64,
    /// Of those, writes found whole after the cut.
    pub landed: u64,
    /// Cuts while the store recovered from the one before.
    pub cut_in_recovery: u64,
    /// Cuts during a compaction step.
    pub cut_in_compaction: u64,
    /// Cuts by the call the fuse blew in (the others came between calls).
    pub cut_in: BTreeMap<Op, u64>,
    pub commits: u64,
    /// Token writes (each a transaction of its own).
    pub tokens: u64,
    /// Retention sweeps, and the tasks they deleted.
    pub expiries: u64,
    pub expired: u64,
    /// Compaction steps that did something.
    pub compactions: u64,
    /// Writes, resizes and syncs of the writes that returned `Ok`.
    pub ops: u64,
}

/// Replays one seed's history on `engine`; the first broken promise, if
/// any.
pub(super) fn replay(engine: &Engine, seed: u64, tally: &mut Tally) -> Result<(), String> {
    let mut rng = Rng::new(seed);
    let mut writer = Writer::new(rng.next_u64());
    let disk = SimDisk::new();
    let label = PathBuf::from(format!("simulated disk, seed {seed}"));
    let mut store = (engine.open)(&disk, &label, true)?;
    let mut acked = Model::default();
    // Every task ever written: the expired ones must stay gone.
    let mut seen = BTreeSet::new();
    for round in 0..engine.rounds {
        let at = format!("round {round}");
        let commits = 1 + rng.below(8);
        let (cut, mode) = survivors(&mut rng);
        match rng.below(3) {
            // In one of the writes, resizes and syncs of the next commits,
            // or not at all.
            0 => disk.arm(1 + rng.below(engine.ops_per_commit * commits), cut),
            // In a commit's sync, with all its writes in the cache.
            1 => disk.arm_at_sync(1 + rng.below(commits), cut),
            // Between two commits.
            _ => {}
        }
        let mut unacked = None;
        for _ in 0..commits {
            let (syncs, ops) = (disk.syncs(), disk.ops());
            // Whether the write changes anything (a sweep may find nothing
            // due), so must sync before it returns.
            let mut changes = true;
            let (written, next) = if writer.rng.one_in(6) {
                let (token, next) = writer.token(&acked);
                tally.tokens += 1;
                (store.put_token(&token), next)
            } else if writer.rng.one_in(5) {
                let (before, limit, want, next) = writer.expire(&acked);
                tally.expiries += 1;
                changes = !want.is_empty();
                let expired = store.expire(before, limit, &[]).and_then(|mut states| {
                    states.sort_by_key(|s| i32::from(*s));
                    if states == want {
                        tally.expired += states.len() as u64;
                        Ok(())
                    } else {
                        Err(StoreError::Inconsistent(format!(
                            "expire deleted tasks in {states:?}, not {want:?}"
                        )))
                    }
                });
                (expired, next)
            } else {
                let (records, next) = writer.batch(&acked);
                tally.commits += 1;
                (store.commit(&records), next)
            };
            seen.extend(next.tasks.keys().copied());
            match written {
                Ok(()) if changes && disk.syncs() == syncs => {
                    return Err(format!("{at}: a write returned before any sync"));
                }
                Ok(()) => {
                    tally.ops += disk.ops() - ops;
                    acked = next;
                }
                Err(err) if err.is_damage() => {
                    return Err(format!("{at}: a write met damage: {err}"));
                }
                Err(err) if !disk.is_off() => {
                    return Err(format!("{at}: a write failed with the power on: {err}"));
                }
                Err(_) => {
                    unacked = Some(next);
                    break;
                }
            }
            // Compaction between commits: it moves what was acknowledged,
            // so a cut in it must lose nothing.
            if writer.rng.one_in(2) {
                for _ in 0..=writer.rng.below(3) {
                    match store.compact_step() {
                        Ok(true) => tally.compactions += 1,
                        Ok(false) => break,
                        Err(err) if err.is_damage() => {
                            return Err(format!("{at}: compaction met damage: {err}"));
                        }
                        Err(err) if !disk.is_off() => {
                            return Err(format!(
                                "{at}: compaction failed with the power on: {err}"
                            ));
                        }
                        Err(_) => {
                            tally.cut_in_compaction += 1;
                            break;
                        }
                    }
                }
                if disk.is_off() {
                    break;
                }
            }
        }
        // What the running store counted, if the cut leaves it whole.
        let live_bytes = match unacked {
            None if !disk.is_off() => store
                .live_bytes()
                .map_err(|err| format!("{at}: counting live bytes: {err}"))?,
            _ => None,
        };
        if let Some(op) = disk.blown_in() {
            *tally.cut_in.entry(op).or_default() += 1;
        }
        disk.cut(cut);
        tally.cuts += 1;
        tally.by_survivors[mode] += 1;
        drop(store);
        let mut recovered = None;
        if rng.one_in(4) {
            // The power fails again while the store recovers.
            let (again, _) = survivors(&mut rng);
            disk.arm(1 + rng.below(engine.recovery_ops), again);
            match (engine.open)(&disk, &label, false) {
                Ok(store) => {
                    disk.disarm();
                    recovered = Some(store);
                }
                Err(_) if disk.is_off() => tally.cut_in_recovery += 1,
                Err(err) => return Err(format!("{at}, cut {cut:?}, recovering: {err}")),
            }
        }
        store = match recovered {
            Some(store) => store,
            None => (engine.open)(&disk, &label, false)
                .map_err(|err| format!("{at}, cut {cut:?}: {err}"))?,
        };
        if let Err(lost) = holds(&*store, &acked, &seen) {
            let Some(unacked) = unacked else {
                return Err(format!("{at}, cut {cut:?} between writes: {lost}"));
            };
            tally.mid_commit += 1;
            if let Err(half) = holds(&*store, &unacked, &seen) {
                return Err(format!(
                    "{at}, cut {cut:?} in a write: neither the writes acknowledged \
                     ({lost}) nor those and the one cut ({half})"
                ));
            }
            tally.landed += 1;
            acked = unacked;
        } else if unacked.is_some() {
            tally.mid_commit += 1;
        }
        let reopened = store
            .live_bytes()
            .map_err(|err| format!("{at}: counting live bytes: {err}"))?;
        if live_bytes.is_some() && reopened != live_bytes {
            return Err(format!(
                "{at}, cut {cut:?} between writes: the running store counted \
                 {live_bytes:?} live bytes, the reopened one {reopened:?}"
            ));
        }
    }
    // And the store still works: a commit after the last cut, a clean
    // shutdown, everything there.
    let (records, next) = writer.batch(&acked);
    seen.extend(next.tasks.keys().copied());
    store
        .commit(&records)
        .map_err(|err| format!("committing after the cuts: {err}"))?;
    drop(store);
    let store = (engine.open)(&disk, &label, false)?;
    holds(&*store, &next, &seen).map_err(|err| format!("after a clean shutdown: {err}"))
}

fn seeds(default: u64) -> std::ops::Range<u64> {
    let n = std::env::var("WEFT_POWER_CUT_SEEDS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(default);
    let first = std::env::var("WEFT_POWER_CUT_FIRST_SEED")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    first..first + n
}

/// Replays the seeds on `engine` and fails with every seed that broke a
/// promise; the tally of the cuts made.
pub(super) fn replay_seeds(engine: &Engine) -> Tally {
    let mut tally = Tally::default();
    let mut failed = Vec::new();
    for seed in seeds(engine.seeds) {
        if let Err(err) = replay(engine, seed, &mut tally) {
            failed.push(format!("seed {seed}: {err}"));
        }
    }
    eprintln!("power cuts: {tally:?}");
    let runs = seeds(engine.seeds).count() as u64;
    assert!(
        failed.is_empty(),
        "{} of {runs} seeds broke a promise:\n{}",
        failed.len(),
        failed.join("\n")
    );
    // The seeds reach the cases that matter.
    assert!(
        tally.mid_commit * 4 >= runs,
        "few cuts in a commit: {tally:?}"
    );
    assert!(
        tally.landed > 0 || runs < 50,
        "no cut commit ever landed: {tally:?}"
    );
    assert!(
        tally.by_survivors.iter().all(|n| *n > 0) || runs < 20,
        "not every kind of cut was made: {tally:?}"
    );
    assert!(
        tally.expired > 0 || runs < 20,
        "retention never deleted a task: {tally:?}"
    );
    tally
}

#[test]
fn no_acknowledged_commit_is_lost_and_none_is_half_there_after_a_power_cut() {
    replay_seeds(&REDB);
}

/// The task input and the event output [`commit_rot_targets`] writes.
pub(super) const ROT_INPUT: &[u8] = b"ROT-ME-TASK-INPUT-0123456789";
pub(super) const ROT_OUTPUT: &[u8] = b"ROT-ME-EVENT-OUTPUT-0123456789";

/// Flips one bit inside every copy of `marker` in `image` (copy-on-write
/// and compaction leave or make copies); how many there were.
pub(super) fn flip_in(image: &mut [u8], marker: &[u8]) -> usize {
    let at: Vec<usize> = image
        .windows(marker.len())
        .enumerate()
        .filter(|(_, w)| *w == marker)
        .map(|(i, _)| i)
        .collect();
    for i in &at {
        image[i + marker.len() / 2] ^= 0x08;
    }
    at.len()
}

/// Flips one bit inside every copy of `marker` on the platter, in every
/// file; how many there were.
pub(super) fn rot(disk: &SimDisk, marker: &[u8]) -> usize {
    let mut flipped = 0;
    disk.on_platter_each(|_, image| flipped += flip_in(image, marker));
    flipped
}

/// Commits two tasks to `store` for bit-rot tests, returning them: one
/// queued, with [`ROT_INPUT`] as its input, and one running, whose event
/// 3 is output [`ROT_OUTPUT`]; `model` gets them.
pub(super) fn commit_rot_targets(
    store: &dyn Store,
    writer: &mut Writer,
    model: &mut Model,
) -> (TaskId, TaskId) {
    let mut records = Vec::new();
    writer.submit(model, &mut records);
    writer.submit(model, &mut records);
    let ids: Vec<TaskId> = model.tasks.keys().copied().collect();
    let (queued, running) = (ids[ids.len() - 2], ids[ids.len() - 1]);
    {
        let task = model.tasks.get_mut(&queued).expect("just submitted");
        let input = Bytes::from_static(ROT_INPUT);
        task.record.spec = Arc::new(TaskSpec::call("noop", input));
        let Some(Record::Task(r)) = records.first_mut() else {
            unreachable!("a submission starts with its record")
        };
        r.spec = Arc::clone(&task.record.spec);
    }
    store.commit(&records).expect("committing the tasks to rot");
    let mut records = Vec::new();
    let task = model.tasks.get_mut(&running).expect("just submitted");
    writer.advance(task, &mut records);
    writer.advance(task, &mut records);
    let body = EventBody::Output {
        stream: OutputStream::Stdout,
        data: Bytes::from_static(ROT_OUTPUT),
        chunk: Some(0),
    };
    let event = writer.event(task, body);
    task.events.push(event.clone());
    records.push(Record::Event(event));
    store.commit(&records).expect("committing the event to rot");
    (queued, running)
}

pub(super) fn damaged_at(err: &StoreError) -> Option<(&'static str, String)> {
    match err {
        StoreError::Damaged { table, key, .. } => Some((table, key.clone())),
        _ => None,
    }
}

#[test]
fn bit_rot_on_the_platter_in_a_committed_task_or_event_is_reported_never_served() {
    // After a clean shutdown, and after a power cut with everything synced
    // (the store then opens through redb's crash recovery); the rotten
    // values in the newest commit, or under later ones.
    for (clean, later) in [(true, 0), (true, 3), (false, 0), (false, 3)] {
        let at = if clean { "clean shutdown" } else { "power cut" };
        let at = format!("{at}, {later} commits after the rotten ones");
        let disk = SimDisk::new();
        let label = PathBuf::from(format!("simulated disk, bit rot after a {at}"));
        let store = open_redb(&disk, &label, false).unwrap();
        let mut writer = Writer::new(7);
        let mut model = Model::default();
        let (queued, running) = commit_rot_targets(&*store, &mut writer, &mut model);
        // Later batches of other tasks: the two stay queued and running.
        let mut others = Model::default();
        for _ in 0..later {
            let (records, next) = writer.batch(&others);
            store.commit(&records).unwrap();
            others = next;
        }
        model.tasks.extend(others.tasks);
        if clean {
            drop(store);
        }
        disk.cut(Survivors::None);
        assert!(rot(&disk, ROT_INPUT) > 0, "{at}: no task input");
        assert!(rot(&disk, ROT_OUTPUT) > 0, "{at}: no event");

        let store = match open_redb(&disk, &label, false) {
            Ok(store) => store,
            Err(err) => panic!("{at}: {err}"),
        };
        let err = store.task(queued).expect_err("a rotten task was served");
        assert_eq!(
            damaged_at(&err),
            Some(("tasks", queued.to_string())),
            "{at}: {err}"
        );
        let err = store
            .events(running, 0, 100)
            .expect_err("a rotten event was served");
        assert_eq!(
            damaged_at(&err),
            Some(("events", format!("{running} event 3"))),
            "{at}: {err}"
        );
        let err = store
            .load(UNIX_EPOCH)
            .expect_err("a rotten live task was loaded");
        assert!(err.is_damage(), "{at}: {err}");
        // What did not rot still reads.
        let sound = store.task(running).unwrap().map(|t| t.state);
        assert_eq!(sound, Some(TaskState::Running), "{at}");
        for (id, task) in &model.tasks {
            if *id != queued && *id != running {
                let got = store.task(*id).unwrap().map(|t| task_view(&t));
                assert_eq!(got, Some(task_view(&task.record)), "{at}");
            }
        }
    }
}

/// Bit rot in an index the seal does not cover: `tasks_by_state` keys
/// (state, id) have no value to seal, so a flipped bit in a key names
/// another (or no) task. `load` checks each entry against the sealed
/// record it names and the entries against the state counts, so the
/// restart reports the damage instead of losing a queued task.
#[test]
fn bit_rot_in_the_state_index_of_a_queued_task_is_reported_at_load() {
    let disk = SimDisk::new();
    let label = PathBuf::from("simulated disk, rot in the state index");
    let store = open_redb(&disk, &label, false).unwrap();
    let mut writer = Writer::new(9);
    let mut model = Model::default();
    let mut records = Vec::new();
    writer.submit(&mut model, &mut records);
    writer.submit(&mut model, &mut records);
    store.commit(&records).unwrap();
    drop(store);
    disk.cut(Survivors::None);
    let queued = *model.tasks.keys().next().unwrap();
    // The index key as redb lays it out: the state byte, then the id
    // (little-endian); the same id elsewhere is a `tasks` or `events` key.
    let state = u8::try_from(i32::from(TaskState::Queued)).unwrap();
    let mut key = vec![state];
    key.extend_from_slice(&queued.as_u128().to_le_bytes());
    let flipped = disk.on_platter(|image| {
        let at: Vec<usize> = image
            .windows(key.len())
            .enumerate()
            .filter(|(_, w)| *w == key.as_slice())
            .map(|(i, _)| i)
            .collect();
        for i in &at {
            image[i + 9] ^= 0x10;
        }
        at.len()
    });
    assert!(flipped > 0, "the index key is not on the platter");

    let store = open_redb(&disk, &label, false).unwrap();
    // The record itself is sound and still reads.
    let state = store.task(queued).unwrap().map(|t| t.state);
    assert_eq!(state, Some(TaskState::Queued));
    match store.load(UNIX_EPOCH) {
        Err(err) => assert!(err.is_damage(), "{err}"),
        Ok(loaded) => {
            let live: Vec<TaskId> = loaded.live.iter().map(|t| t.id).collect();
            assert!(
                live.contains(&queued),
                "the restart lost queued task {queued} and said nothing (it loads {live:?})"
            );
        }
    }
}
