//! A job's tasks (one contiguous range of ids, see `scheduler/graph.rs`)
//! listed oldest first and paged, and PENDING tasks loaded at a restart,
//! checked against every engine (PostgreSQL included).

use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use weft_proto::{TaskId, TaskSpec, TaskState};

use super::*;
use crate::scheduler::graph::{job_end, submit_ids};

fn record(id: TaskId, state: TaskState) -> TaskRecord {
    let at = UNIX_EPOCH + Duration::from_secs(1);
    TaskRecord::for_test(id, Arc::new(TaskSpec::call("noop", "")), state, at)
}

fn both(check: impl Fn(&dyn Store)) {
    let dir = tempfile::tempdir().expect("temp dir");
    check(&RedbStore::open(dir.path()).expect("store opens"));
    check(&MemoryStore::new());
    let dir = tempfile::tempdir().expect("temp dir");
    check(&LogStore::open(dir.path()).expect("log store opens"));
    check(&pg::testdb::store());
}

#[test]
fn a_jobs_tasks_list_oldest_first_in_pages_and_no_other_jobs() {
    both(|store| {
        let mut last = 0;
        let fresh = ulid::Ulid::from_parts(5_000, 77).0;
        let before = submit_ids(fresh, &mut last, 2);
        let job = submit_ids(fresh, &mut last, 5);
        let after = submit_ids(fresh, &mut last, 2);
        let records: Vec<Record> = before
            .iter()
            .chain(&job)
            .chain(&after)
            .map(|id| Record::Task(record(*id, TaskState::Pending)))
            .collect();
        store.commit(&records).expect("commit");
        let mut query = ListQuery {
            from: Some(job[0]),
            before: Some(TaskId::from_u128(job_end(job[0]).as_u128() + 1)),
            limit: 2,
            ascending: true,
            ..ListQuery::default()
        };
        let mut found = Vec::new();
        loop {
            let page = store.list_page(&query).expect("list");
            found.extend(page.tasks.iter().map(|t| t.id));
            match page.resume {
                Some(last) => query.from = Some(TaskId::from_u128(last.as_u128() + 1)),
                None => break,
            }
        }
        assert_eq!(found, job, "the job's tasks, oldest first, once each");
        // With a state filter too.
        query.from = Some(job[0]);
        query.state = Some(TaskState::Pending);
        query.limit = 100;
        let page = store.list_page(&query).expect("list");
        assert_eq!(page.tasks.iter().map(|t| t.id).collect::<Vec<_>>(), job);
    });
}

#[test]
fn pending_tasks_are_loaded_at_a_restart() {
    both(|store| {
        let id = TaskId::from_u128(9 << 80);
        store
            .commit(&[Record::Task(record(id, TaskState::Pending))])
            .expect("commit");
        let mut live = Vec::new();
        store
            .load_each(UNIX_EPOCH, &mut |record, _| {
                live.push((record.id, record.state))
            })
            .expect("load");
        assert_eq!(live, vec![(id, TaskState::Pending)]);
    });
}

/// Every state keeps its own count across a restart: pending, upstream
/// failed and skipped (the states added last) are not folded onto others.
#[test]
fn the_newer_states_keep_their_own_counts_after_reopening() {
    let dir = tempfile::tempdir().expect("temp dir");
    let states = [
        (TaskState::Pending, 1),
        (TaskState::Queued, 2),
        (TaskState::UpstreamFailed, 3),
        (TaskState::Skipped, 4),
        (TaskState::Succeeded, 5),
    ];
    {
        let store = RedbStore::open(dir.path()).expect("store opens");
        let mut n = 0u128;
        let records: Vec<Record> = states
            .iter()
            .flat_map(|(state, count)| std::iter::repeat_n(*state, *count))
            .map(|state| {
                n += 1;
                Record::Task(record(TaskId::from_u128((9 << 80) + n), state))
            })
            .collect();
        store.commit(&records).expect("commit");
    }
    let store = RedbStore::open(dir.path()).expect("store reopens");
    let loaded = store.load(UNIX_EPOCH).expect("load");
    let mut live = [0u64; 2];
    for task in &loaded.live {
        live[usize::from(task.state == TaskState::Queued)] += 1;
    }
    assert_eq!(live, [1, 2], "pending, queued");
    let mut finals = loaded.final_counts.clone();
    finals.sort_by_key(|(s, _)| i32::from(*s));
    let mut expected: Vec<(TaskState, u64)> = states
        .iter()
        .filter(|(s, _)| s.is_final())
        .map(|(s, c)| (*s, *c as u64))
        .collect();
    expected.sort_by_key(|(s, _)| i32::from(*s));
    assert_eq!(finals, expected);
}
