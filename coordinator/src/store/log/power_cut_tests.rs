//! Power cuts and bit rot under the log store, on a simulated directory
//! whose unsynced writes, creations and removals are lost when the power
//! fails (`store/power_cut.rs`).
//!
//! The replay is the one the redb store gets (`store/power_cut_tests.rs`:
//! batches, token writes and retention sweeps checked against a model of
//! what was acknowledged), here with 4 KiB segments so commits cross
//! segment rolls, and compaction steps between the writes, so cuts land in
//! a roll (create, header, sync, directory sync), in a commit, and in a
//! compaction (copy, sync, remove, directory sync). `WEFT_POWER_CUT_SEEDS`
//! and `WEFT_POWER_CUT_FIRST_SEED` pick other seeds than CI's. Apart from
//! it: a cut while a new log is made, and a torn commit whose data holds
//! a valid frame (which recovery must not take for a later commit).
//!
//! Bit rot: a changed byte in an acknowledged record with later commits
//! after it is damage. Found at open (every frame is checked), the open
//! fails; under a running store, the read of that record fails. Never is
//! the changed record served as data.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::UNIX_EPOCH;

use weft_proto::{TaskId, TaskSpec, TaskState};

use super::LogStore;
use super::frame::{self, FRAME_HEADER, Key, Kind};
use crate::store::power_cut::{Op, SECTOR, SimDisk, Survivors};
use crate::store::power_cut_tests::{
    Engine, Model, ROT_INPUT, ROT_OUTPUT, UnderTest, Writer, commit_rot_targets, damaged_at,
    flip_in, holds, opened, replay_seeds, rot, task_view,
};
use crate::store::{Record, Store, StoreError};

/// The store id the simulated logs are made with.
const STORE_ID: u64 = 0x5EED_0F10;

/// Small segments: a few commits fill one.
const SEGMENT_BYTES: u64 = 4096;

impl UnderTest for LogStore {
    fn compact_step(&self) -> Result<bool, StoreError> {
        LogStore::compact_step(self)
    }

    fn live_bytes(&self) -> Result<Option<u64>, StoreError> {
        Ok(Some(self.sizes()?.1))
    }
}

/// The log store on `disk` mounted as a directory, with small segments; a
/// new disk gets a new log, a later open refuses an empty directory (as a
/// data dir with its marker does).
fn open_log(disk: &SimDisk, label: &Path, fresh: bool) -> Result<Box<dyn UnderTest>, String> {
    open_log_with(disk, label, fresh, SEGMENT_BYTES)
}

/// [`open_log`] with segments of `segment_bytes`.
fn open_log_with(
    disk: &SimDisk,
    label: &Path,
    fresh: bool,
    segment_bytes: u64,
) -> Result<Box<dyn UnderTest>, String> {
    let dir = Arc::new(disk.mount());
    opened(|| {
        let store = LogStore::open_on(dir, label, fresh.then_some(STORE_ID))?;
        store.set_segment_bytes(segment_bytes);
        Ok(store)
    })
}

/// Segments big enough that the zeros written ahead of a segment's end go
/// out in several writes (`write_zeros`' chunks) and a commit may land
/// partly on zeros and partly past the file's end.
const WIDE_SEGMENT_BYTES: u64 = 320 << 10;

/// The log store on `disk` with [`WIDE_SEGMENT_BYTES`] segments.
fn open_wide_log(disk: &SimDisk, label: &Path, fresh: bool) -> Result<Box<dyn UnderTest>, String> {
    open_log_with(disk, label, fresh, WIDE_SEGMENT_BYTES)
}

/// The log store with wide segments: a commit that refills the zeros
/// writes a few more chunks.
const WIDE_LOG: Engine = Engine {
    open: open_wide_log,
    ops_per_commit: 6,
    recovery_ops: 4,
    rounds: 4,
    seeds: 100,
};

/// The log store: a commit is a write and a sync, more at a roll.
const LOG: Engine = Engine {
    open: open_log,
    ops_per_commit: 5,
    recovery_ops: 4,
    rounds: 4,
    seeds: 300,
};

#[test]
fn no_acknowledged_commit_is_lost_after_a_power_cut_in_a_log_writing_zeros_in_chunks() {
    let tally = replay_seeds(&WIDE_LOG);
    assert!(tally.mid_commit > 0, "no cut in a commit: {tally:?}");
}

#[test]
fn no_acknowledged_commit_is_lost_and_none_is_half_there_after_a_power_cut_in_the_log() {
    let tally = replay_seeds(&LOG);
    assert!(tally.compactions > 0, "nothing was compacted: {tally:?}");
    assert!(
        tally.cut_in_compaction > 0 || tally.cuts < 60,
        "no cut in a compaction: {tally:?}"
    );
    // Directory syncs come at segment rolls and compaction's removals.
    assert!(
        tally.cut_in.get(&Op::DirSync).is_some_and(|n| *n > 0) || tally.cuts < 60,
        "no cut in a directory sync: {tally:?}"
    );
}

#[test]
fn a_cut_while_a_new_log_is_made_leaves_no_log_or_an_empty_one_that_opens() {
    // Making a log: the first segment created, its header written and
    // synced, the directory synced; the power fails in each of those.
    for (n, survivors) in (1..=4).flat_map(|n| {
        [
            Survivors::None,
            Survivors::All,
            Survivors::TornPrefix { seed: n },
            Survivors::AnySectors { seed: n },
        ]
        .map(|s| (n, s))
    }) {
        let at = format!("cut in call {n} of making the log, {survivors:?} surviving");
        let disk = SimDisk::new();
        let label = PathBuf::from(format!("simulated disk, {at}"));
        disk.arm(n, survivors);
        match open_log(&disk, &label, true) {
            Ok(_) if !disk.is_off() => {
                // Made before the fuse blew: nothing more to cut.
                disk.disarm();
                continue;
            }
            Ok(_) => panic!("{at}: the log opened without power"),
            Err(_) => assert!(disk.is_off(), "{at}: failed with the power on"),
        }
        // Opened as a data dir's store is after a crash in its making:
        // either nothing is there (and a new log is made), or the log.
        let store = open_log(&disk, &label, true).unwrap_or_else(|err| panic!("{at}: {err}"));
        let mut writer = Writer::new(n);
        let (records, model) = writer.batch(&Model::default());
        store.commit(&records).expect("a commit on the new log");
        drop(store);
        let store = open_log(&disk, &label, false).unwrap_or_else(|err| panic!("{at}: {err}"));
        let seen = model.tasks.keys().copied().collect();
        holds(&*store, &model, &seen).unwrap_or_else(|err| panic!("{at}: {err}"));
    }
}

/// A log on a new disk with the two tasks to rot, then `later` batches
/// of other tasks (each synced after the rotten records; the two stay
/// queued and running), then `compactions` compaction steps; the store,
/// and what it holds.
fn rot_targets(
    disk: &SimDisk,
    label: &Path,
    later: usize,
    compactions: usize,
) -> (Box<dyn UnderTest>, Model, TaskId, TaskId) {
    let store = open_log(disk, label, true).expect("a new log opens");
    let mut writer = Writer::new(11);
    let mut model = Model::default();
    let (queued, running) = commit_rot_targets(&*store, &mut writer, &mut model);
    let mut others = Model::default();
    for _ in 0..later {
        let (records, next) = writer.batch(&others);
        store
            .commit(&records)
            .expect("a commit after the rotten ones");
        others = next;
    }
    model.tasks.extend(others.tasks);
    for _ in 0..compactions {
        store.compact_step().expect("a compaction step");
    }
    (store, model, queued, running)
}

#[test]
fn bit_rot_in_an_acknowledged_log_record_with_commits_after_it_fails_the_open_as_damage() {
    // The rotten records in the active segment with a frame after them,
    // in sealed segments, and moved by compaction; after a clean shutdown
    // and after a power cut.
    for (later, compactions) in [(1, 0), (12, 0), (12, 4)] {
        for clean in [true, false] {
            let at = format!(
                "{later} commits after the rotten ones, {compactions} compaction steps, {}",
                if clean { "clean shutdown" } else { "power cut" }
            );
            let disk = SimDisk::new();
            let label = PathBuf::from(format!("simulated disk, bit rot, {at}"));
            let (store, _, _, _) = rot_targets(&disk, &label, later, compactions);
            if clean {
                drop(store);
            }
            disk.cut(Survivors::None);
            assert!(rot(&disk, ROT_INPUT) > 0, "{at}: no task input");
            assert!(rot(&disk, ROT_OUTPUT) > 0, "{at}: no event");
            let dir = Arc::new(disk.mount());
            match LogStore::open_on(dir, &label, None) {
                Ok(_) => panic!("{at}: a log with rotten records opened"),
                Err(err) => assert!(err.is_damage(), "{at}: not damage: {err}"),
            }
        }
    }
}

#[test]
fn bit_rot_under_a_running_log_store_is_a_damaged_read_never_data() {
    for (later, compactions) in [(1, 0), (12, 4)] {
        let at = format!("{later} commits after the rotten ones, {compactions} compaction steps");
        let disk = SimDisk::new();
        let label = PathBuf::from(format!("simulated disk, bit rot under power, {at}"));
        let (store, model, queued, running) = rot_targets(&disk, &label, later, compactions);
        let mut flipped = (0, 0);
        disk.rot_under_power(|_, image| {
            flipped.0 += flip_in(image, ROT_INPUT);
            flipped.1 += flip_in(image, ROT_OUTPUT);
        });
        assert!(flipped.0 > 0 && flipped.1 > 0, "{at}: flipped {flipped:?}");

        // The input is in the task's spec, which the log keeps apart.
        let err = store.task(queued).expect_err("a rotten task was served");
        assert_eq!(
            damaged_at(&err),
            Some(("specs", queued.to_string())),
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
        match store.load(UNIX_EPOCH) {
            Ok(_) => panic!("{at}: a rotten live task was loaded"),
            Err(err) => assert!(err.is_damage(), "{at}: {err}"),
        }
        // What did not rot still reads.
        let sound = store.task(running).expect("a sound task").map(|t| t.state);
        assert_eq!(sound, Some(TaskState::Running), "{at}");
        for (id, task) in &model.tasks {
            if *id != queued && *id != running {
                let got = store
                    .task(*id)
                    .expect("a sound task")
                    .map(|t| task_view(&t));
                assert_eq!(got, Some(task_view(&task.record)), "{at}");
            }
        }
    }
}

/// The filler around the frame in [`input_holding_a_frame`].
const FILLER: usize = 2 * SECTOR as usize;

/// A valid frame of one token record, as the store's own log holds it
/// (its store id, an early frame number): what a task's input holds when it
/// copies a segment file.
fn a_frame() -> Vec<u8> {
    let mut frame = vec![0u8; FRAME_HEADER];
    frame::put(&mut frame, Kind::Token, Key::Name("inner"), &[b"a token"]);
    frame::seal_frame(&mut frame, STORE_ID, 2);
    frame
}

/// A task input that holds a whole, valid log frame (a task that copies
/// a segment file, say) between sectors of filler.
fn input_holding_a_frame() -> Vec<u8> {
    let mut input = vec![b'.'; FILLER];
    input.extend_from_slice(&a_frame());
    input.extend_from_slice(&[b'.'; FILLER]);
    input
}

#[test]
fn a_torn_commit_whose_data_holds_a_valid_frame_is_cut_off_not_called_damage() {
    // The power fails in the sync of a commit whose task input holds a
    // valid frame, and the commit is torn around it: an in-order prefix
    // of its sectors landed, up to just past the inner frame (the outer
    // frame is short); or a reordering cache wrote back every sector but
    // those before the inner frame (the outer frame's header is missing).
    // The commit was never acknowledged: the log must open without it.
    for prefix in [true, false] {
        let at = if prefix {
            "an in-order prefix landed"
        } else {
            "the first sectors did not land"
        };
        let disk = SimDisk::new();
        let label = PathBuf::from(format!(
            "simulated disk, a torn commit holding a frame, {at}"
        ));
        let store = LogStore::open_on(Arc::new(disk.mount()), &label, Some(STORE_ID)).unwrap();
        let mut writer = Writer::new(5);
        let (records, acked) = writer.batch(&Model::default());
        store.commit(&records).unwrap();
        drop(store);
        disk.cut(Survivors::None);
        let mut end = 0;
        disk.on_platter_each(|_, image| end = super::tests::frames_end(image));

        let store = LogStore::open_on(Arc::new(disk.mount()), &label, None).unwrap();
        let mut next = acked.clone();
        let mut records = Vec::new();
        writer.submit(&mut next, &mut records);
        let torn = *next.tasks.keys().next_back().unwrap();
        let spec = Arc::new(TaskSpec::call("noop", input_holding_a_frame()));
        next.tasks.get_mut(&torn).unwrap().record.spec = Arc::clone(&spec);
        let Some(Record::Task(r)) = records.first_mut() else {
            unreachable!("a submission starts with its record")
        };
        r.spec = spec;
        disk.arm_at_sync(1, Survivors::All);
        store
            .commit(&records)
            .expect_err("a commit acknowledged without power");
        drop(store);
        let inner = a_frame();
        let mut found = false;
        disk.on_platter_each(|_, image| {
            let Some(start) = image.windows(inner.len()).position(|w| w == inner) else {
                return;
            };
            found = true;
            if prefix {
                let landed = (start + inner.len()).next_multiple_of(SECTOR as usize);
                image.truncate(landed);
            } else {
                // Those sectors read as before the commit.
                let first = start / SECTOR as usize * SECTOR as usize;
                image[end..first].fill(0);
            }
        });
        assert!(found, "{at}: the inner frame is not on the platter");

        let store = match LogStore::open_on(Arc::new(disk.mount()), &label, None) {
            Ok(store) => store,
            Err(err) => panic!("{at}: an unacknowledged torn commit failed the open: {err}"),
        };
        let seen = next.tasks.keys().copied().collect();
        holds(&store, &acked, &seen).unwrap_or_else(|err| panic!("{at}: {err}"));
    }
}

/// A log on `disk` with small segments and a history of `seed` that left
/// most of its older segments dead (finished tasks swept away): what a
/// compaction step has work on. The store, and what it holds.
fn log_due_for_compaction(disk: &SimDisk, label: &Path, seed: u64) -> (LogStore, Model) {
    let store = LogStore::open_on(Arc::new(disk.mount()), label, Some(STORE_ID)).unwrap();
    store.set_segment_bytes(SEGMENT_BYTES);
    let mut writer = Writer::new(seed);
    let mut model = Model::default();
    for _ in 0..25 {
        let (records, next) = writer.batch(&model);
        store.commit(&records).unwrap();
        model = next;
        for _ in 0..3 {
            let (before, limit, _, next) = writer.expire(&model);
            store.expire(before, limit, &[]).unwrap();
            model = next;
        }
    }
    (store, model)
}

/// How many compaction steps of [`log_due_for_compaction`]'s log only
/// remove dead segments before one copies (a removal is one call, the
/// directory's sync; a copy writes and syncs too).
fn removals_before_a_copy(seed: u64) -> usize {
    let disk = SimDisk::new();
    let (store, _) = log_due_for_compaction(&disk, Path::new("simulated disk, dry run"), seed);
    for removals in 0..1000 {
        let ops = disk.ops();
        assert!(store.compact_step().unwrap(), "no compaction step copied");
        if disk.ops() - ops > 1 {
            return removals;
        }
    }
    unreachable!("a thousand removals of a small log")
}

#[test]
fn a_cut_in_any_call_of_a_compaction_step_that_copies_loses_nothing_acknowledged() {
    let seed = 21;
    let removals = removals_before_a_copy(seed);
    for survivors in [
        Survivors::None,
        Survivors::All,
        Survivors::TornPrefix { seed: 3 },
        Survivors::AnySectors { seed: 3 },
    ] {
        let mut cut_in = BTreeSet::new();
        for n in 1.. {
            let at = format!("cut in call {n} of a compaction step, {survivors:?} surviving");
            let disk = SimDisk::new();
            let label = PathBuf::from(format!("simulated disk, {at}"));
            let (store, model) = log_due_for_compaction(&disk, &label, seed);
            let seen = model.tasks.keys().copied().collect();
            for _ in 0..removals {
                store.compact_step().unwrap();
            }
            disk.arm(n, survivors);
            match store.compact_step() {
                Ok(copied) => {
                    assert!(copied, "{at}: nothing to compact");
                    // The step ran to its end before the fuse blew: each
                    // of its calls was cut in once.
                    let all = BTreeSet::from([Op::Write, Op::FileSync, Op::DirSync]);
                    assert_eq!(cut_in, all, "{at}: not cut in each kind of call");
                    break;
                }
                Err(err) => assert!(disk.is_off(), "{at}: failed with the power on: {err}"),
            }
            cut_in.extend(disk.blown_in());
            drop(store);
            let store = open_log(&disk, &label, false).unwrap_or_else(|err| panic!("{at}: {err}"));
            holds(&*store, &model, &seen).unwrap_or_else(|err| panic!("{at}: {err}"));
            // And compaction goes on from where the cut left it.
            while store
                .compact_step()
                .unwrap_or_else(|err| panic!("{at}: {err}"))
            {}
            holds(&*store, &model, &seen)
                .unwrap_or_else(|err| panic!("{at}, compacted after the cut: {err}"));
        }
    }
}

#[test]
fn after_a_failed_sync_the_log_acknowledges_nothing_until_reopened_and_loses_nothing_acknowledged()
{
    // The disk fails a sync (its writes are lost) with the power on: in a
    // commit, or in a compaction's copy. Nothing written after it may be
    // acknowledged on top of the hole it left; after a cut and a reopen,
    // the log holds what was acknowledged.
    for compacting in [false, true] {
        let at = if compacting {
            "in a compaction"
        } else {
            "in a commit"
        };
        let disk = SimDisk::new();
        let label = PathBuf::from(format!("simulated disk, a failed sync {at}"));
        let (store, mut acked) = log_due_for_compaction(&disk, &label, 21);
        let mut writer = Writer::new(22);
        let mut seen: BTreeSet<TaskId> = acked.tasks.keys().copied().collect();
        let failed = if compacting {
            for _ in 0..removals_before_a_copy(21) {
                store.compact_step().unwrap();
            }
            // The copy's sync.
            disk.fail_at_sync(1);
            store
                .compact_step()
                .expect_err("a compaction step went on after its sync failed")
        } else {
            disk.fail_at_sync(1);
            let (records, next) = writer.batch(&acked);
            seen.extend(next.tasks.keys().copied());
            store
                .commit(&records)
                .expect_err("a commit acknowledged after its sync failed")
        };
        assert!(!disk.is_off() && !failed.is_damage(), "{at}: {failed}");
        for _ in 0..3 {
            let (records, next) = writer.batch(&acked);
            seen.extend(next.tasks.keys().copied());
            if store.commit(&records).is_ok() {
                acked = next;
            }
        }
        disk.cut(Survivors::All);
        drop(store);
        let store = open_log(&disk, &label, false).unwrap_or_else(|err| panic!("{at}: {err}"));
        holds(&*store, &acked, &seen).unwrap_or_else(|err| panic!("{at}: {err}"));
    }
}
