//! Cron schedules: firing with `Now` advanced, overlap and catch-up
//! policies, pausing, exactly once by fire time across restarts.

use std::sync::Arc;

use weft_proto::limits::SpecLimits;
use weft_proto::{TaskKind, pb};

use super::*;
use crate::scheduler::cron::{LIST_PAGE_BYTES, MAX_CATCH_UP, ParsedSchedule};
use crate::store::ScheduleRecord;

const LIMITS: SpecLimits = SpecLimits {
    max_slots: 1024,
    max_spec_bytes: 1 << 20,
};

fn spec(
    name: &str,
    cron: &str,
    overlap: pb::OverlapPolicy,
    catch_up: pb::CatchUp,
) -> pb::ScheduleSpec {
    pb::ScheduleSpec {
        name: name.into(),
        cron: cron.into(),
        time_zone: String::new(),
        task: Some(TaskSpec::exec(["true"]).into()),
        overlap: overlap.into(),
        catch_up: catch_up.into(),
    }
}

fn parse(spec: pb::ScheduleSpec) -> Result<ParsedSchedule, Error> {
    ParsedSchedule::parse(spec, Some(&LIMITS))
}

fn secs(n: u64) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(n)
}

/// A harness whose wall clock reads 100.5 s after the epoch.
fn at_100_5() -> Harness {
    let mut h = Harness::new();
    h.now.wall = SystemTime::UNIX_EPOCH + Duration::from_millis(100_500);
    h
}

/// Creates an every-second schedule `tick` with these policies.
fn every_second(h: &mut Harness, overlap: pb::OverlapPolicy, catch_up: pb::CatchUp) {
    let parsed = parse(spec("tick", "* * * * * *", overlap, catch_up)).expect("parses");
    h.s.create_schedule(parsed, h.now).expect("created");
    h.effects();
}

/// The tasks fired so far, in order: (id, name).
fn fired(h: &Harness) -> Vec<(TaskId, String)> {
    let mut seen = std::collections::HashSet::new();
    h.records
        .iter()
        .filter_map(|r| match r {
            Record::Task(t) if t.spec.name.contains('@') && seen.insert(t.id) => {
                Some((t.id, t.spec.name.clone()))
            }
            _ => None,
        })
        .collect()
}

fn fire_names(h: &Harness) -> Vec<String> {
    fired(h).into_iter().map(|(_, name)| name).collect()
}

/// The schedule's latest record written.
fn schedule(h: &Harness, name: &str) -> ScheduleRecord {
    h.records
        .iter()
        .rev()
        .find_map(|r| match r {
            Record::Schedule(s) if s.name() == name => Some(ScheduleRecord::clone(s)),
            _ => None,
        })
        .expect("schedule record")
}

#[test]
fn each_fire_time_submits_one_task_carrying_its_fire_time() {
    let mut h = at_100_5();
    every_second(&mut h, pb::OverlapPolicy::Queue, pb::CatchUp::One);
    // The next fire is in the wakeup: no polling.
    assert_eq!(
        h.s.next_wakeup(),
        Some(h.now.instant + Duration::from_millis(500))
    );
    h.advance(Duration::from_millis(499));
    h.effects();
    assert!(fired(&h).is_empty(), "nothing before the fire time");
    h.advance(Duration::from_millis(1));
    let batch = h.effects();
    // The task and the schedule's new last_fire are in the same batch.
    assert!(
        batch
            .records
            .iter()
            .any(|r| matches!(r, Record::Task(t) if t.spec.name.contains('@')))
    );
    assert!(
        batch
            .records
            .iter()
            .any(|r| matches!(r, Record::Schedule(s) if s.last_fire == Some(secs(101))))
    );
    // Ticking again at the same time fires nothing more.
    h.s.tick(h.now);
    h.effects();
    h.advance(Duration::from_secs(1));
    h.effects();
    assert_eq!(
        fire_names(&h),
        ["tick@1970-01-01T00:01:41Z", "tick@1970-01-01T00:01:42Z"]
    );
    let (id, _) = fired(&h)[0];
    let TaskKind::Exec(exec) = &h.record(id).spec.kind else {
        panic!("an exec task");
    };
    assert_eq!(exec.env["WEFT_FIRE_TIME"], "1970-01-01T00:01:41Z");
    assert_eq!(exec.env["WEFT_SCHEDULE"], "tick");
    let record = schedule(&h, "tick");
    assert_eq!((record.fired, record.skipped), (2, 0));
    assert_eq!(h.s.gauges(h.now.instant).schedule_fires, 2);
    assert_eq!(record.last_fire, Some(secs(102)));
    // Each fired task is its own job.
    assert!(
        fired(&h)
            .iter()
            .all(|(id, _)| h.record(*id).job_id.is_none())
    );
}

#[test]
fn overlap_skip_records_the_fire_as_skipped_while_the_previous_task_is_live() {
    let mut h = at_100_5();
    every_second(&mut h, pb::OverlapPolicy::Skip, pb::CatchUp::One);
    // No node: the first fire's task stays queued.
    for _ in 0..3 {
        h.advance(Duration::from_secs(1));
        h.effects();
    }
    assert_eq!(fire_names(&h), ["tick@1970-01-01T00:01:41Z"]);
    let record = schedule(&h, "tick");
    assert_eq!((record.fired, record.skipped), (1, 2));
    assert_eq!(record.last_fire, Some(secs(103)));
    assert_eq!(
        (
            h.s.gauges(h.now.instant).schedule_fires,
            h.s.gauges(h.now.instant).schedule_skips
        ),
        (1, 2)
    );
    // Once it is final, the next fire submits again.
    let (first, _) = fired(&h)[0];
    h.s.cancel(first, "", h.now);
    h.advance(Duration::from_secs(1));
    h.effects();
    assert_eq!(fired(&h).len(), 2);
}

#[test]
fn overlap_queue_submits_every_fire() {
    let mut h = at_100_5();
    every_second(&mut h, pb::OverlapPolicy::Queue, pb::CatchUp::One);
    for _ in 0..3 {
        h.advance(Duration::from_secs(1));
        h.effects();
    }
    assert_eq!(fired(&h).len(), 3);
    assert_eq!(schedule(&h, "tick").skipped, 0);
}

#[test]
fn overlap_cancel_running_cancels_the_previous_task_then_submits() {
    let mut h = at_100_5();
    h.node(S1, reg("n1", 1), 1);
    every_second(&mut h, pb::OverlapPolicy::CancelRunning, pb::CatchUp::One);
    h.advance(Duration::from_secs(1));
    let e = h.effects();
    let (first, _) = fired(&h)[0];
    assert_eq!(assigned(&e, S1), [(first, Attempt(1))]);
    h.event(S1, first, 1, NodeEventBody::Started);
    h.advance(Duration::from_secs(1));
    let e = h.effects();
    assert_eq!(cancels(&e, S1), [(first, Attempt(1))]);
    assert_eq!(fired(&h).len(), 2);
    // The node reports the cancel: the first ends CANCELLED.
    h.event(
        S1,
        first,
        1,
        NodeEventBody::Finished {
            outcome: Outcome::Cancelled,
            exit_code: None,
            output: Bytes::new(),
            error: String::new(),
        },
    );
    h.effects();
    assert_eq!(h.record(first).state, TaskState::Cancelled);
}

#[test]
fn a_paused_schedule_does_not_fire_nor_catch_up_what_passed_while_paused() {
    let mut h = at_100_5();
    every_second(&mut h, pb::OverlapPolicy::Queue, pb::CatchUp::All);
    h.s.pause_schedule("tick", true, h.now).expect("paused");
    h.effects();
    assert_eq!(h.s.next_wakeup(), None);
    for _ in 0..5 {
        h.advance(Duration::from_secs(1));
        h.effects();
    }
    assert!(fired(&h).is_empty());
    let view = h.s.pause_schedule("tick", false, h.now).expect("resumed");
    h.effects();
    assert_eq!(
        view.next_fire,
        Some(weft_proto::convert::timestamp(secs(106)))
    );
    h.advance(Duration::from_secs(1));
    h.effects();
    assert_eq!(fire_names(&h), ["tick@1970-01-01T00:01:46Z"]);
    // Nor after a restart: `since` is stored with the resume.
    let mut h = h.restart(Duration::from_secs(0));
    h.s.tick(h.now);
    h.effects();
    assert_eq!(fired(&h).len(), 1);
}

/// Fires once at 101 s, then the coordinator is down 10 s: 102..=111 are
/// missed. Returns the fire names after the restart's first tick.
fn after_downtime(catch_up: pb::CatchUp) -> Vec<String> {
    let mut h = at_100_5();
    every_second(&mut h, pb::OverlapPolicy::Queue, catch_up);
    h.advance(Duration::from_millis(500));
    h.effects();
    assert_eq!(fired(&h).len(), 1);
    let mut h = h.restart(Duration::from_secs(10));
    // What the driver does first: a tick, then commit.
    h.s.tick(h.now);
    h.effects();
    let names = fire_names(&h);
    // And the next one after that fires at its time.
    h.advance(Duration::from_secs(1));
    h.effects();
    assert_eq!(
        fire_names(&h).last().map(String::as_str),
        Some("tick@1970-01-01T00:01:52Z")
    );
    names[1..].to_vec()
}

#[test]
fn catch_up_none_fires_no_missed_fire() {
    assert!(after_downtime(pb::CatchUp::None).is_empty());
}

#[test]
fn catch_up_one_fires_the_latest_missed_fire() {
    assert_eq!(
        after_downtime(pb::CatchUp::One),
        ["tick@1970-01-01T00:01:51Z"]
    );
}

#[test]
fn catch_up_all_fires_every_missed_fire_oldest_first() {
    let names = after_downtime(pb::CatchUp::All);
    let expected: Vec<String> = (102..=111)
        .map(|s| format!("tick@1970-01-01T00:01:{:02}Z", s - 60))
        .collect();
    assert_eq!(names, expected);
}

#[test]
fn catch_up_all_is_bounded() {
    let mut h = at_100_5();
    every_second(&mut h, pb::OverlapPolicy::Queue, pb::CatchUp::All);
    let mut h = h.restart(Duration::from_secs(5_000));
    h.s.tick(h.now);
    h.effects();
    assert_eq!(fired(&h).len(), MAX_CATCH_UP);
    // The latest ones: the last is the restart's second.
    assert_eq!(
        fire_names(&h).last().map(String::as_str),
        Some("tick@1970-01-01T01:25:00Z")
    );
}

#[test]
fn a_fire_committed_before_a_restart_never_fires_again() {
    let mut h = at_100_5();
    every_second(&mut h, pb::OverlapPolicy::Queue, pb::CatchUp::All);
    h.advance(Duration::from_millis(500));
    h.effects();
    // Restarted within the same second: 101 is at or before last_fire.
    let mut h = h.restart(Duration::from_millis(200));
    h.s.tick(h.now);
    h.effects();
    assert_eq!(fire_names(&h), ["tick@1970-01-01T00:01:41Z"]);
    assert_eq!(schedule(&h, "tick").fired, 1);
}

#[test]
fn a_fire_whose_batch_was_not_committed_fires_after_the_restart() {
    let mut h = at_100_5();
    every_second(&mut h, pb::OverlapPolicy::Queue, pb::CatchUp::One);
    h.advance(Duration::from_millis(500));
    // The batch with the fire is lost (killed before its commit): neither
    // the task nor last_fire is stored.
    let _ = h.s.take_effects(h.now);
    let mut h = h.restart(Duration::from_millis(200));
    h.s.tick(h.now);
    h.effects();
    assert_eq!(fire_names(&h), ["tick@1970-01-01T00:01:41Z"]);
}

#[test]
fn a_full_queue_at_a_fire_records_it_skipped() {
    let mut config = config();
    config.max_queued = 1;
    let mut h = Harness::with(config);
    h.now.wall = SystemTime::UNIX_EPOCH + Duration::from_millis(100_500);
    h.submit(vec![TaskSpec::call("noop", "")]);
    every_second(&mut h, pb::OverlapPolicy::Queue, pb::CatchUp::One);
    h.advance(Duration::from_secs(1));
    h.effects();
    assert!(fired(&h).is_empty());
    let record = schedule(&h, "tick");
    assert_eq!((record.fired, record.skipped), (0, 1));
    assert_eq!(record.last_fire, Some(secs(101)));
}

#[test]
fn names_are_unique_and_unknown_names_are_not_found() {
    let mut h = at_100_5();
    every_second(&mut h, pb::OverlapPolicy::Queue, pb::CatchUp::One);
    let again = parse(spec(
        "tick",
        "* * * * *",
        pb::OverlapPolicy::Skip,
        pb::CatchUp::One,
    ));
    assert!(matches!(
        h.s.create_schedule(again.expect("parses"), h.now),
        Err(Error::ScheduleExists(_))
    ));
    assert!(matches!(
        h.s.pause_schedule("nope", true, h.now),
        Err(Error::ScheduleNotFound(_))
    ));
    assert!(matches!(
        h.s.delete_schedule("nope", h.now),
        Err(Error::ScheduleNotFound(_))
    ));
    h.s.delete_schedule("tick", h.now).expect("deleted");
    h.effects();
    assert!(
        h.s.list_schedules(None, usize::MAX, LIST_PAGE_BYTES)
            .schedules
            .is_empty()
    );
    assert_eq!(h.s.next_wakeup(), None);
    assert!(matches!(h.records.last(), Some(Record::DeleteSchedule(name)) if name == "tick"));
    // Deleted: it fires no more, and stays deleted after a restart.
    h.advance(Duration::from_secs(3));
    h.effects();
    assert!(fired(&h).is_empty());
    let h = h.restart(Duration::from_secs(1));
    assert!(
        h.s.list_schedules(None, usize::MAX, LIST_PAGE_BYTES)
            .schedules
            .is_empty()
    );
}

fn message(err: Error) -> String {
    tonic::Status::from(err).message().to_owned()
}

#[test]
fn bad_specs_are_refused_naming_the_field() {
    let base = || {
        spec(
            "ok",
            "*/5 * * * *",
            pb::OverlapPolicy::Skip,
            pb::CatchUp::One,
        )
    };
    let err = parse(pb::ScheduleSpec {
        cron: "61 * * * *".into(),
        ..base()
    })
    .expect_err("bad cron");
    assert!(message(err).contains("spec.cron"));
    let err = parse(pb::ScheduleSpec {
        cron: "* * *".into(),
        ..base()
    })
    .expect_err("too few fields");
    assert!(message(err).contains("spec.cron"));
    let err = parse(pb::ScheduleSpec {
        time_zone: "Mars/Olympus".into(),
        ..base()
    })
    .expect_err("bad zone");
    assert!(message(err).contains("spec.time_zone"));
    let err = parse(pb::ScheduleSpec {
        name: "a b".into(),
        ..base()
    })
    .expect_err("bad name");
    assert!(message(err).contains("spec.name"));
    let mut task: pb::TaskSpec = TaskSpec::exec(["true"]).into();
    task.r#ref = "a".into();
    let err = parse(pb::ScheduleSpec {
        task: Some(task),
        ..base()
    })
    .expect_err("ref");
    assert!(message(err).contains("spec.task.ref"));
    let err = parse(pb::ScheduleSpec {
        task: None,
        ..base()
    })
    .expect_err("no task");
    assert!(message(err).contains("spec.task"));
    let err = parse(pb::ScheduleSpec {
        task: Some(TaskSpec::exec(Vec::<String>::new()).into()),
        ..base()
    })
    .expect_err("empty argv");
    assert!(message(err).contains("spec.task"));
    assert_eq!(
        tonic::Status::from(
            parse(pb::ScheduleSpec {
                overlap: 9,
                ..base()
            })
            .expect_err("bad enum")
        )
        .code(),
        tonic::Code::InvalidArgument
    );
}

#[test]
fn a_time_zone_moves_the_fire_times() {
    let mut h = Harness::new();
    let parsed = parse(pb::ScheduleSpec {
        time_zone: "Europe/Paris".into(),
        ..spec(
            "nine",
            "0 9 * * *",
            pb::OverlapPolicy::Skip,
            pb::CatchUp::One,
        )
    })
    .expect("parses");
    let view = h.s.create_schedule(parsed, h.now).expect("created");
    // 09:00 in Paris on 1 January 1970 was 08:00 UTC.
    assert_eq!(
        view.next_fire,
        Some(weft_proto::convert::timestamp(secs(8 * 3600)))
    );
    // Defaults filled in.
    let view =
        h.s.create_schedule(
            parse(spec(
                "d",
                "@hourly",
                pb::OverlapPolicy::Unspecified,
                pb::CatchUp::Unspecified,
            ))
            .expect("parses"),
            h.now,
        )
        .expect("created");
    let spec = view.spec.expect("spec");
    assert_eq!(
        (spec.overlap, spec.catch_up),
        (pb::OverlapPolicy::Skip.into(), pb::CatchUp::One.into())
    );
}

#[test]
fn schedules_survive_the_durable_store() {
    let dir = tempfile::tempdir().expect("tempdir");
    let record = ScheduleRecord {
        spec: spec(
            "tick",
            "* * * * * *",
            pb::OverlapPolicy::Queue,
            pb::CatchUp::All,
        ),
        paused: true,
        created_at: secs(100),
        since: secs(150),
        last_fire: Some(secs(120)),
        last_task: Some(TaskId::from_u128(42)),
        fired: 3,
        skipped: 4,
    };
    let other = ScheduleRecord {
        spec: spec(
            "other",
            "* * * * *",
            pb::OverlapPolicy::Skip,
            pb::CatchUp::None,
        ),
        last_fire: None,
        last_task: None,
        ..record.clone()
    };
    {
        let store = crate::store::RedbStore::open(dir.path()).expect("opens");
        crate::store::Store::commit(
            &store,
            &[
                Record::Schedule(Arc::new(record.clone())),
                Record::Schedule(Arc::new(other.clone())),
            ],
        )
        .expect("commits");
        crate::store::Store::commit(&store, &[Record::DeleteSchedule("other".into())])
            .expect("commits");
    }
    let store = crate::store::RedbStore::open(dir.path()).expect("opens again");
    let loaded = crate::store::Store::load(&store, SystemTime::UNIX_EPOCH).expect("loads");
    assert_eq!(loaded.schedules, [record]);
}

#[test]
fn a_cron_that_matches_no_date_is_refused() {
    for cron in ["0 0 30 2 *", "0 0 31 4 *", "* * 30 2 *", "0 0 31W 2 *"] {
        let result = parse(spec(
            "never",
            cron,
            pb::OverlapPolicy::Skip,
            pb::CatchUp::One,
        ));
        match result {
            Err(err) => assert!(err.to_string().contains("never fire"), "{err}"),
            Ok(_) => panic!("{cron:?} matches no date but is accepted"),
        }
    }
    // A date that comes once in four years is a date.
    let leap = spec(
        "leap",
        "0 0 29 2 *",
        pb::OverlapPolicy::Skip,
        pb::CatchUp::One,
    );
    assert!(parse(leap).is_ok());
}

/// A catch-up (ALL) of many fire times writes the schedule's record, which
/// holds its task spec, once in its batch, not once per fire.
#[test]
fn a_catch_up_of_many_fires_writes_its_schedule_once_per_batch() {
    let mut h = at_100_5();
    every_second(&mut h, pb::OverlapPolicy::Queue, pb::CatchUp::All);
    let mut h = h.restart(Duration::from_secs(5_000));
    h.s.tick(h.now);
    let batch = h.effects();
    let copies = batch
        .records
        .iter()
        .filter(|r| matches!(r, Record::Schedule(s) if s.name() == "tick"))
        .count();
    assert_eq!(copies, 1);
}

#[test]
fn a_schedule_deleted_and_made_again_in_one_batch_is_written_after_its_delete() {
    let mut h = at_100_5();
    every_second(&mut h, pb::OverlapPolicy::Queue, pb::CatchUp::None);
    let again = |h: &mut Harness| {
        let parsed = parse(spec(
            "tick",
            "* * * * * *",
            pb::OverlapPolicy::Queue,
            pb::CatchUp::None,
        ))
        .expect("parses");
        h.s.create_schedule(parsed, h.now).expect("created");
    };
    h.s.pause_schedule("tick", true, h.now).expect("paused");
    h.s.delete_schedule("tick", h.now).expect("deleted");
    again(&mut h);
    let kinds: Vec<&str> = h
        .effects()
        .records
        .iter()
        .filter_map(|r| match r {
            Record::Schedule(s) if s.name() == "tick" => Some("write"),
            Record::DeleteSchedule(name) if name == "tick" => Some("delete"),
            _ => None,
        })
        .collect();
    assert_eq!(kinds, ["write", "delete", "write"]);
}

/// A running coordinator woken late past more than MAX_CATCH_UP fire times
/// (a clock set forward, a long stall) fires the latest one, not the
/// 1,001st oldest.
#[test]
fn woken_late_past_many_fire_times_fires_the_latest() {
    let mut h = at_100_5();
    every_second(&mut h, pb::OverlapPolicy::Queue, pb::CatchUp::One);
    h.advance(Duration::from_secs(2_000)); // wall 2100.5 s
    h.effects();
    assert_eq!(fire_names(&h), ["tick@1970-01-01T00:35:00Z"]);
}

#[test]
fn woken_late_past_many_fire_times_with_catch_up_all_fires_the_latest_ones() {
    let mut h = at_100_5();
    every_second(&mut h, pb::OverlapPolicy::Queue, pb::CatchUp::All);
    h.advance(Duration::from_secs(2_000)); // wall 2100.5 s
    h.effects();
    let names = fire_names(&h);
    assert_eq!(names.len(), MAX_CATCH_UP);
    assert_eq!(
        names.last().map(String::as_str),
        Some("tick@1970-01-01T00:35:00Z")
    );
}

/// A Paris schedule `name` firing at `cron`, tasks queued on overlap.
fn in_paris(h: &mut Harness, name: &str, cron: &str, catch_up: pb::CatchUp) {
    let parsed = parse(pb::ScheduleSpec {
        time_zone: "Europe/Paris".into(),
        ..spec(name, cron, pb::OverlapPolicy::Queue, catch_up)
    })
    .expect("parses");
    h.s.create_schedule(parsed, h.now).expect("created");
    h.effects();
}

fn utc(text: &str) -> SystemTime {
    humantime::parse_rfc3339(text).expect("an RFC 3339 time")
}

/// Moves the harness's clocks on to `text` (ticking once) and takes the
/// effects.
fn until(h: &mut Harness, text: &str) {
    let by = utc(text).duration_since(h.now.wall).expect("forward");
    h.advance(by);
    h.effects();
}

/// A coordinator down from now until `text`; the restart's first tick.
fn restarted_at(h: &Harness, text: &str) -> Harness {
    let down = utc(text).duration_since(h.now.wall).expect("forward");
    let mut h = h.restart(down);
    h.s.tick(h.now);
    h.effects();
    h
}

#[test]
fn a_time_in_the_spring_forward_gap_fires_once_after_it_even_if_restarted_just_before() {
    // 2027-03-28 in Paris: 02:00 CET became 03:00 CEST, so there was no
    // 02:30; it fires at 03:00 CEST (01:00 UTC).
    let mut h = Harness::new();
    h.now.wall = utc("2027-03-27T01:00:00Z");
    in_paris(&mut h, "nightly", "30 2 * * *", pb::CatchUp::One);
    until(&mut h, "2027-03-27T01:30:00.5Z");
    // Down for the day, back half a second before the gap ends.
    let mut h = restarted_at(&h, "2027-03-28T00:59:59.5Z");
    until(&mut h, "2027-03-28T01:00:00.5Z");
    until(&mut h, "2027-03-28T03:00:00Z");
    until(&mut h, "2027-03-29T00:30:00.5Z");
    assert_eq!(
        fire_names(&h),
        [
            "nightly@2027-03-27T01:30:00Z",
            "nightly@2027-03-28T01:00:00Z",
            "nightly@2027-03-29T00:30:00Z"
        ]
    );
}

#[test]
fn a_restart_in_the_repeated_hour_with_catch_up_none_fires_nothing_it_missed() {
    // 2027-10-31 in Paris: 03:00 CEST became 02:00 CET; 02:30 came twice,
    // at 00:30 and 01:30 UTC. A fixed time fires at the first.
    let mut h = Harness::new();
    h.now.wall = utc("2027-10-30T00:00:00Z");
    in_paris(&mut h, "nightly", "30 2 * * *", pb::CatchUp::None);
    until(&mut h, "2027-10-30T00:30:00.5Z");
    // Down over the first 02:30, back in the repeated hour.
    let mut h = restarted_at(&h, "2027-10-31T01:10:00Z");
    until(&mut h, "2027-10-31T01:30:00.5Z");
    until(&mut h, "2027-10-31T12:00:00Z");
    until(&mut h, "2027-11-01T01:30:00.5Z");
    assert_eq!(
        fire_names(&h),
        [
            "nightly@2027-10-30T00:30:00Z",
            "nightly@2027-11-01T01:30:00Z"
        ]
    );
}

#[test]
fn a_schedule_every_half_hour_fires_every_half_hour_through_the_repeated_hour_once_each() {
    let mut h = Harness::new();
    h.now.wall = utc("2027-10-30T23:50:00Z");
    in_paris(&mut h, "often", "*/30 * * * *", pb::CatchUp::All);
    for (n, text) in [
        "2027-10-31T00:00:00.5Z",
        "2027-10-31T00:30:00.5Z",
        "2027-10-31T01:00:00.5Z",
    ]
    .into_iter()
    .enumerate()
    {
        until(&mut h, text);
        assert_eq!(fired(&h).len(), n + 1, "{text}");
    }
    // A restart in the repeated hour neither fires again nor skips.
    let mut h = restarted_at(&h, "2027-10-31T01:10:00Z");
    until(&mut h, "2027-10-31T01:30:00.5Z");
    until(&mut h, "2027-10-31T02:00:00.5Z");
    assert_eq!(
        fire_names(&h),
        [
            "often@2027-10-31T00:00:00Z",
            "often@2027-10-31T00:30:00Z",
            "often@2027-10-31T01:00:00Z",
            "often@2027-10-31T01:30:00Z",
            "often@2027-10-31T02:00:00Z"
        ]
    );
}

#[test]
fn cancel_running_with_a_full_queue_keeps_the_running_task() {
    let mut config = config();
    config.max_queued = 1;
    let mut h = Harness::with(config);
    h.now.wall = SystemTime::UNIX_EPOCH + Duration::from_millis(100_500);
    h.node(S1, reg("n1", 1), 1);
    every_second(&mut h, pb::OverlapPolicy::CancelRunning, pb::CatchUp::One);
    h.advance(Duration::from_secs(1));
    h.effects();
    let (first, _) = fired(&h)[0];
    h.event(S1, first, 1, NodeEventBody::Started);
    // The running task fills the queue: the fire cannot submit, so it
    // must not cancel either.
    h.advance(Duration::from_secs(1));
    let e = h.effects();
    assert!(
        cancels(&e, S1).is_empty(),
        "the running task is left running"
    );
    assert_eq!(fired(&h).len(), 1);
    assert_eq!(h.record(first).state, TaskState::Running);
    let record = schedule(&h, "tick");
    assert_eq!((record.fired, record.skipped), (1, 1));
    assert_eq!(record.last_task, Some(first));
}

#[test]
fn cancel_running_cancels_a_queued_previous_task_to_make_room() {
    let mut config = config();
    config.max_queued = 1;
    let mut h = Harness::with(config);
    h.now.wall = SystemTime::UNIX_EPOCH + Duration::from_millis(100_500);
    every_second(&mut h, pb::OverlapPolicy::CancelRunning, pb::CatchUp::One);
    // No node: the first fire's task stays queued, filling the queue.
    h.advance(Duration::from_secs(1));
    h.effects();
    h.advance(Duration::from_secs(1));
    h.effects();
    let tasks = fired(&h);
    assert_eq!(tasks.len(), 2);
    assert_eq!(h.record(tasks[0].0).state, TaskState::Cancelled);
    assert_eq!(schedule(&h, "tick").last_task, Some(tasks[1].0));
}

#[test]
fn a_fire_whose_batch_was_not_committed_with_catch_up_none_is_not_fired_after_the_restart() {
    let mut h = at_100_5();
    every_second(&mut h, pb::OverlapPolicy::Queue, pb::CatchUp::None);
    h.advance(Duration::from_millis(500));
    // The batch with the 101 s fire is lost: with catch-up NONE it is one
    // of the missed fire times, and none of those fire.
    let _ = h.s.take_effects(h.now);
    let mut h = h.restart(Duration::from_millis(200));
    h.s.tick(h.now);
    h.effects();
    assert!(fired(&h).is_empty());
    h.advance(Duration::from_millis(800));
    h.effects();
    assert_eq!(fire_names(&h), ["tick@1970-01-01T00:01:42Z"]);
}

#[test]
fn a_list_of_fixed_hours_fires_once_in_the_repeated_hour() {
    // 2027-10-31 in Paris: 02:30 came at 00:30 UTC (CEST) and again at
    // 01:30 UTC (CET); 14:30 CET is 13:30 UTC.
    let mut h = Harness::new();
    h.now.wall = utc("2027-10-30T13:00:00Z");
    in_paris(&mut h, "twice", "30 2,14 * * *", pb::CatchUp::One);
    until(&mut h, "2027-10-31T00:30:00.5Z");
    until(&mut h, "2027-10-31T01:30:00.5Z");
    until(&mut h, "2027-10-31T13:30:00.5Z");
    assert_eq!(
        fire_names(&h),
        ["twice@2027-10-31T00:30:00Z", "twice@2027-10-31T13:30:00Z"]
    );
}

#[test]
fn a_list_of_fixed_hours_fires_once_after_the_spring_gap() {
    // 2027-03-28 in Paris: no 02:00 to 02:59; 03:00 CEST is 01:00 UTC.
    let mut h = Harness::new();
    h.now.wall = utc("2027-03-27T14:00:00Z");
    in_paris(&mut h, "twice", "30 2,14 * * *", pb::CatchUp::One);
    in_paris(&mut h, "halves", "0,30 2 * * *", pb::CatchUp::One);
    until(&mut h, "2027-03-28T00:59:59.5Z");
    assert!(fired(&h).is_empty());
    until(&mut h, "2027-03-28T01:00:00.5Z");
    until(&mut h, "2027-03-28T12:30:00.5Z");
    assert_eq!(
        fire_names(&h),
        [
            "halves@2027-03-28T01:00:00Z",
            "twice@2027-03-28T01:00:00Z",
            "twice@2027-03-28T12:30:00Z"
        ]
    );
}

#[test]
fn a_restart_in_the_repeated_hour_catches_up_a_listed_fixed_hour_once() {
    let mut h = Harness::new();
    h.now.wall = utc("2027-10-30T13:00:00Z");
    in_paris(&mut h, "twice", "30 2,14 * * *", pb::CatchUp::One);
    // Down over the first 02:30 (00:30 UTC), back in the repeated hour:
    // the missed fire is caught up, and the second 02:30 does not fire.
    let mut h = restarted_at(&h, "2027-10-31T01:10:00Z");
    assert_eq!(fire_names(&h), ["twice@2027-10-31T00:30:00Z"]);
    until(&mut h, "2027-10-31T01:30:00.5Z");
    until(&mut h, "2027-10-31T13:30:00.5Z");
    assert_eq!(
        fire_names(&h),
        ["twice@2027-10-31T00:30:00Z", "twice@2027-10-31T13:30:00Z"]
    );
}

#[test]
fn a_task_name_at_the_limit_is_refused_for_a_schedule() {
    let base = || spec("ok", "0 3 * * *", pb::OverlapPolicy::Skip, pb::CatchUp::One);
    let named = TaskSpec::exec(["true"]).name("n".repeat(weft_proto::limits::MAX_TASK_NAME_BYTES));
    let err = parse(pb::ScheduleSpec {
        task: Some(named.into()),
        ..base()
    })
    .expect_err("each fire's name would be over the limit");
    let status = tonic::Status::from(err);
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert!(
        status.message().contains("spec.task"),
        "{}",
        status.message()
    );
    assert!(status.message().contains("`name`"), "{}", status.message());
    let mut full = TaskSpec::exec(["true"]);
    for n in 0..weft_proto::limits::MAX_ENV_ENTRIES {
        full = full.env(format!("V{n}"), "");
    }
    let err = parse(pb::ScheduleSpec {
        task: Some(full.into()),
        ..base()
    })
    .expect_err("each fire's environment would be over the limit");
    assert!(message(err).contains("exec.env"));
}

#[test]
fn a_task_setting_a_variable_each_fire_sets_is_refused() {
    for name in ["WEFT_SCHEDULE", "WEFT_FIRE_TIME"] {
        let err = parse(pb::ScheduleSpec {
            task: Some(TaskSpec::exec(["true"]).env(name, "mine").into()),
            ..spec("ok", "0 3 * * *", pb::OverlapPolicy::Skip, pb::CatchUp::One)
        })
        .expect_err("a variable the fire overwrites");
        let status = tonic::Status::from(err);
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
        assert!(status.message().contains("spec.task.exec.env"));
        assert!(status.message().contains(name), "{}", status.message());
    }
}

#[test]
fn a_schedule_task_over_its_size_cap_is_refused() {
    let big = TaskSpec::exec([
        "echo",
        &"x".repeat(crate::scheduler::cron::MAX_SCHEDULE_TASK_BYTES),
    ]);
    let err = parse(pb::ScheduleSpec {
        task: Some(big.into()),
        ..spec("ok", "0 3 * * *", pb::OverlapPolicy::Skip, pb::CatchUp::One)
    })
    .expect_err("over the cap");
    let status = tonic::Status::from(err);
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert!(
        status.message().contains("spec.task"),
        "{}",
        status.message()
    );
}

#[test]
fn an_over_long_cron_or_name_is_refused_with_a_short_message() {
    let base = || spec("ok", "0 3 * * *", pb::OverlapPolicy::Skip, pb::CatchUp::One);
    let long = "1".repeat(10 << 20);
    for (field, spec) in [
        (
            "spec.cron",
            pb::ScheduleSpec {
                cron: long.clone(),
                ..base()
            },
        ),
        (
            "spec.time_zone",
            pb::ScheduleSpec {
                time_zone: long.clone(),
                ..base()
            },
        ),
        (
            "spec.name",
            pb::ScheduleSpec {
                name: long.clone(),
                ..base()
            },
        ),
    ] {
        let status = tonic::Status::from(parse(spec).expect_err("too long"));
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
        assert!(status.message().contains(field), "{}", status.message());
        assert!(
            status.message().len() < 1024,
            "{field}: {} bytes",
            status.message().len()
        );
    }
}

#[test]
fn a_schedule_created_with_a_trace_fires_tasks_outside_it() {
    let trace = weft_proto::TraceContext::new([7; 16], [9; 8]);
    let mut h = at_100_5();
    let parsed = parse(pb::ScheduleSpec {
        task: Some(TaskSpec::exec(["true"]).trace(trace).into()),
        ..spec(
            "tick",
            "* * * * * *",
            pb::OverlapPolicy::Queue,
            pb::CatchUp::One,
        )
    })
    .expect("parses");
    assert!(parsed.spec.task.as_ref().is_some_and(|t| t.trace.is_none()));
    h.s.create_schedule(parsed, h.now).expect("created");
    h.effects();
    assert!(
        schedule(&h, "tick")
            .spec
            .task
            .is_some_and(|t| t.trace.is_none())
    );
    h.advance(Duration::from_secs(1));
    h.effects();
    let (id, _) = fired(&h)[0];
    assert_eq!(h.record(id).spec.trace, None);
}

/// Every page from the first, following `next`: each page's names.
fn pages(h: &Harness, limit: usize, max_bytes: usize) -> Vec<Vec<String>> {
    let mut pages = Vec::new();
    let mut after = None;
    loop {
        let page = h.s.list_schedules(after.as_deref(), limit, max_bytes);
        pages.push(
            page.schedules
                .iter()
                .map(|s| s.spec.as_ref().expect("listed with its spec").name.clone())
                .collect(),
        );
        match page.next {
            Some(next) => after = Some(next),
            None => return pages,
        }
    }
}

#[test]
fn schedules_are_listed_by_name_a_page_at_a_time() {
    let mut h = at_100_5();
    // Created out of name order: pages come by name.
    for i in (0..25).rev() {
        let parsed = parse(spec(
            &format!("s{i:02}"),
            "* * * * * *",
            pb::OverlapPolicy::Skip,
            pb::CatchUp::One,
        ))
        .expect("parses");
        h.s.create_schedule(parsed, h.now).expect("created");
    }
    let all: Vec<String> = (0..25).map(|i| format!("s{i:02}")).collect();
    let whole = h.s.list_schedules(None, usize::MAX, LIST_PAGE_BYTES);
    assert_eq!((whole.schedules.len(), whole.next), (25, None));
    // A budget that holds three schedules (same-sized here) and a half.
    let one = prost::encoding::message::encoded_len(1, &whole.schedules[0]);
    let by_bytes = pages(&h, usize::MAX, 3 * one + one / 2);
    assert_eq!(by_bytes.len(), 9, "{by_bytes:?}");
    assert!(by_bytes[..8].iter().all(|page| page.len() == 3));
    assert_eq!(by_bytes.concat(), all, "in name order, no gaps or repeats");
    // A budget below one schedule still lists one a page; `limit` bounds too.
    assert_eq!(pages(&h, usize::MAX, 1).concat(), all);
    assert_eq!(pages(&h, usize::MAX, 1).len(), 25);
    let by_count = pages(&h, 10, LIST_PAGE_BYTES);
    assert_eq!(
        by_count.iter().map(Vec::len).collect::<Vec<_>>(),
        [10, 10, 5]
    );
    assert_eq!(by_count.concat(), all);
    // A token whose schedule was deleted since resumes at the next name; one
    // past the last name is an empty last page.
    h.s.delete_schedule("s10", h.now).expect("deleted");
    let page = h.s.list_schedules(Some("s10"), 2, LIST_PAGE_BYTES);
    let names: Vec<&str> = page
        .schedules
        .iter()
        .map(|s| s.spec.as_ref().map_or("", |s| s.name.as_str()))
        .collect();
    assert_eq!(
        (names, page.next.as_deref()),
        (vec!["s11", "s12"], Some("s12"))
    );
    let end = h.s.list_schedules(Some("zz"), usize::MAX, LIST_PAGE_BYTES);
    assert!(end.schedules.is_empty() && end.next.is_none());
}

#[test]
fn a_page_token_must_be_a_schedule_name() {
    use crate::scheduler::cron::check_name;
    assert!(check_name("page_token", "s-01:a.b_c").is_ok());
    for bad in ["", "has space", "slash/", &"x".repeat(129)] {
        let err = check_name("page_token", bad).expect_err(bad);
        let status = tonic::Status::from(err);
        assert_eq!(status.code(), tonic::Code::InvalidArgument, "{bad:?}");
        assert!(
            status.message().contains("page_token"),
            "{}",
            status.message()
        );
    }
}
