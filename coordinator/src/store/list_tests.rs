//! `Store::list_page` (filters, newest first, the bounded scan and its
//! resume point) and the attempt history a task record keeps, checked
//! against every engine (PostgreSQL included).

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ulid::Ulid;

use weft_proto::{Attempt, NodeId, Outcome, TaskId, TaskSpec, TaskState};

use super::*;

fn at(ms: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(ms)
}

/// A task made at millisecond `ms` (ids carry their time).
fn id_at(ms: u64, n: u128) -> TaskId {
    TaskId::from_ulid(Ulid::from_parts(ms, n))
}

fn attempt(number: u32, node: (NodeId, &str), ended: bool) -> AttemptRecord {
    AttemptRecord {
        number: Attempt(number),
        node_id: node.0,
        node_name: Arc::from(node.1),
        assigned_at: at(10),
        started_at: Some(at(11)),
        ended_at: ended.then(|| at(20)),
        outcome: ended.then_some(Outcome::Failed),
        exit_code: ended.then_some(1),
        reason: if ended {
            "exited with code 1".into()
        } else {
            String::new()
        },
    }
}

fn record(
    id: TaskId,
    state: TaskState,
    spec: TaskSpec,
    attempts: Vec<AttemptRecord>,
) -> TaskRecord {
    let last = attempts.last().cloned();
    TaskRecord {
        attempt: Attempt(attempts.len() as u32),
        node_id: last.as_ref().map(|a| a.node_id),
        node_name: last.as_ref().map(|a| Arc::clone(&a.node_name)),
        attempts,
        ..TaskRecord::for_test(id, Arc::new(spec), state, at(id.timestamp_ms()))
    }
}

fn both(check: impl Fn(&dyn Store)) {
    let dir = tempfile::tempdir().expect("temp dir");
    check(&RedbStore::open(dir.path()).expect("store opens"));
    check(&MemoryStore::new());
    let dir = tempfile::tempdir().expect("temp dir");
    check(&LogStore::open(dir.path()).expect("log store opens"));
    check(&pg::testdb::store());
}

fn listed(store: &dyn Store, query: &ListQuery) -> (Vec<TaskId>, Option<TaskId>) {
    let page = store.list_page(query).expect("list");
    (page.tasks.iter().map(|t| t.id).collect(), page.resume)
}

#[test]
fn list_filters_by_state_label_name_node_and_time_newest_first() {
    let n1 = (NodeId::new(), "n1");
    let n2 = (NodeId::new(), "n2");
    both(|store| {
        // Made at 1000, 2000, ..., 5000 ms.
        let ids: Vec<TaskId> = (1..=5).map(|i| id_at(i * 1000, 7)).collect();
        let records = [
            record(
                ids[0],
                TaskState::Succeeded,
                TaskSpec::call("noop", "")
                    .name("resize-a")
                    .label("zone", "a"),
                vec![attempt(1, n1, true)],
            ),
            record(
                ids[1],
                TaskState::Queued,
                TaskSpec::call("noop", "")
                    .name("resize-b")
                    .label("zone", "b"),
                Vec::new(),
            ),
            // Ran on n1 first, then on n2.
            record(
                ids[2],
                TaskState::Running,
                TaskSpec::call("noop", "")
                    .name("thumb")
                    .label("zone", "a")
                    .label("gpu", "1"),
                vec![attempt(1, n1, true), attempt(2, n2, false)],
            ),
            record(
                ids[3],
                TaskState::Failed,
                TaskSpec::exec(["true"]).label("zone", "a"),
                vec![attempt(1, n2, true)],
            ),
            record(
                ids[4],
                TaskState::Queued,
                TaskSpec::call("noop", "").name("resize-c"),
                Vec::new(),
            ),
        ];
        for r in &records {
            store.commit(&[Record::Task(r.clone())]).unwrap();
        }
        let q = |f: &dyn Fn(&mut ListQuery)| {
            let mut query = ListQuery::default();
            f(&mut query);
            listed(store, &query).0
        };
        assert_eq!(
            q(&|_| {}),
            [ids[4], ids[3], ids[2], ids[1], ids[0]],
            "newest first"
        );
        assert_eq!(q(&|x| x.state = Some(TaskState::Queued)), [ids[4], ids[1]]);
        assert_eq!(
            q(&|x| x.labels = vec![("zone".into(), "a".into())]),
            [ids[3], ids[2], ids[0]]
        );
        assert_eq!(
            q(&|x| x.labels = vec![("zone".into(), "a".into()), ("gpu".into(), "1".into())]),
            [ids[2]],
            "every label must match"
        );
        assert_eq!(q(&|x| x.labels = vec![("zone".into(), "c".into())]), []);
        assert_eq!(
            q(&|x| x.name = "resize".into()),
            [ids[4], ids[1], ids[0]],
            "a substring"
        );
        // By name or id, on any attempt, not only the latest.
        assert_eq!(q(&|x| x.node = "n1".into()), [ids[2], ids[0]]);
        assert_eq!(q(&|x| x.node = n2.0.to_string()), [ids[3], ids[2]]);
        // Time bounds are id bounds: from is inclusive, before exclusive.
        assert_eq!(
            q(&|x| x.from = Some(id_at(2000, 0))),
            [ids[4], ids[3], ids[2], ids[1]]
        );
        assert_eq!(
            q(&|x| {
                x.from = Some(id_at(2000, 0));
                x.before = Some(id_at(4000, 0));
            }),
            [ids[2], ids[1]]
        );
        assert_eq!(
            q(&|x| {
                x.from = Some(id_at(4000, 0));
                x.before = Some(id_at(2000, 0));
            }),
            [],
            "an empty range"
        );
        // Filters combine with the state index.
        assert_eq!(
            q(&|x| {
                x.state = Some(TaskState::Queued);
                x.name = "resize".into();
                x.from = Some(id_at(3000, 0));
            }),
            [ids[4]]
        );
    });
}

#[test]
fn a_filtered_list_examines_at_most_the_scan_bound_and_resumes_where_it_stopped() {
    both(|store| {
        // 25 tasks; every fifth is named "wanted".
        let ids: Vec<TaskId> = (1..=25).map(|i| id_at(i * 10, 1)).collect();
        for (i, id) in ids.iter().enumerate() {
            let name = if i % 5 == 0 { "wanted" } else { "other" };
            let spec = TaskSpec::call("noop", "").name(name);
            store
                .commit(&[Record::Task(record(
                    *id,
                    TaskState::Queued,
                    spec,
                    Vec::new(),
                ))])
                .unwrap();
        }
        let mut query = ListQuery {
            name: "wanted".into(),
            limit: 100,
            scan: 7,
            ..ListQuery::default()
        };
        // Page through: each page examines at most 7 records, some find
        // nothing, and together they find every match once, newest first.
        let mut found = Vec::new();
        let mut pages = 0;
        loop {
            let (page, resume) = listed(store, &query);
            pages += 1;
            assert!(page.len() <= 2, "at most 7 examined: {page:?}");
            found.extend(page);
            match resume {
                Some(resume) => query.before = Some(resume),
                None => break,
            }
            assert!(pages < 10, "the scan does not end");
        }
        assert_eq!(pages, 4, "25 records at 7 a page");
        assert_eq!(found, [ids[20], ids[15], ids[10], ids[5], ids[0]]);
        // A filter that matches nothing answers an empty page that carries on.
        query.name = "nothing".into();
        query.before = None;
        let (page, resume) = listed(store, &query);
        assert_eq!((page, resume), (vec![], Some(ids[18])));
        // A full page stops at `limit` and resumes after its last task,
        // with no token when nothing older is left.
        let all = ListQuery {
            limit: 3,
            ..ListQuery::default()
        };
        assert_eq!(
            listed(store, &all),
            (vec![ids[24], ids[23], ids[22]], Some(ids[22]))
        );
        let last = ListQuery {
            limit: 1,
            before: Some(ids[0]),
            ..ListQuery::default()
        };
        assert_eq!(listed(store, &last), (vec![], None));
        let oldest = ListQuery {
            limit: 1,
            before: Some(ids[1]),
            ..ListQuery::default()
        };
        assert_eq!(listed(store, &oldest), (vec![ids[0]], None));
    });
}

#[test]
fn a_state_filtered_list_counts_only_tasks_in_that_state_against_the_scan_bound() {
    both(|store| {
        // Three running tasks, then ten newer ones that succeeded.
        let running: Vec<TaskId> = (1..=3).map(|i| id_at(i * 10, 2)).collect();
        for id in &running {
            let task = record(
                *id,
                TaskState::Running,
                TaskSpec::call("noop", ""),
                Vec::new(),
            );
            store.commit(&[Record::Task(task)]).unwrap();
        }
        for i in 1..=10 {
            let id = id_at(1000 + i * 10, 2);
            let task = record(
                id,
                TaskState::Succeeded,
                TaskSpec::call("noop", ""),
                Vec::new(),
            );
            store.commit(&[Record::Task(task)]).unwrap();
        }
        let query = ListQuery {
            state: Some(TaskState::Running),
            scan: 5,
            limit: 10,
            ..ListQuery::default()
        };
        assert_eq!(
            listed(store, &query),
            (vec![running[2], running[1], running[0]], None)
        );
    });
}

#[test]
fn a_record_read_in_another_state_than_the_listed_one_does_not_match() {
    // The log takes ids from its state index, then reads each record
    // after letting the index go: a commit in between may have moved the
    // task to another state, and the record read says so.
    let id = id_at(10, 3);
    let queued = record(
        id,
        TaskState::Queued,
        TaskSpec::call("noop", ""),
        Vec::new(),
    );
    let running = ListQuery {
        state: Some(TaskState::Running),
        ..ListQuery::default()
    };
    assert!(!running.matches(&queued));
    let queued_only = ListQuery {
        state: Some(TaskState::Queued),
        ..ListQuery::default()
    };
    assert!(queued_only.matches(&queued));
    assert!(ListQuery::default().matches(&queued));
}

#[test]
fn the_attempt_history_survives_reopening_the_redb_store() {
    let dir = tempfile::tempdir().expect("temp dir");
    let id = id_at(1000, 1);
    let n1 = (NodeId::new(), "n1");
    let n2 = (NodeId::new(), "n2");
    let running = record(
        id,
        TaskState::Running,
        TaskSpec::call("noop", ""),
        vec![attempt(1, n1, true), attempt(2, n2, false)],
    );
    {
        let store = RedbStore::open(dir.path()).expect("store opens");
        store.commit(&[Record::Task(running.clone())]).unwrap();
    }
    let store = RedbStore::open(dir.path()).expect("store reopens");
    let read = store.task(id).unwrap().expect("the task");
    assert_eq!(read.attempts, running.attempts);
    let loaded = store.load(UNIX_EPOCH).unwrap();
    assert_eq!(loaded.live[0].attempts, running.attempts);
}

/// The cost of a page whose filter matches nothing, on a redb store of
/// `WEFT_LIST_TASKS` tasks (default 100,000): one scan bound's worth of
/// records is read, however many tasks there are. Run by hand:
/// `cargo test -p weft-coordinator --lib -- --ignored a_no_match_page --nocapture`.
#[test]
#[ignore = "builds a large store; run by hand (see the doc comment)"]
fn a_no_match_page_reads_one_scan_bound_of_a_large_store() {
    let n: u64 = std::env::var("WEFT_LIST_TASKS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000);
    let dir = tempfile::tempdir().expect("temp dir");
    let store = RedbStore::open(dir.path()).expect("store opens");
    let spec = TaskSpec::call("noop", "").name("hay").label("zone", "a");
    let mut batch = Vec::new();
    for i in 0..n {
        let id = id_at(1_000_000 + i, u128::from(i));
        batch.push(Record::Task(record(
            id,
            TaskState::Succeeded,
            spec.clone(),
            Vec::new(),
        )));
        if batch.len() == 10_000 {
            store.commit(&batch).unwrap();
            batch.clear();
        }
    }
    store.commit(&batch).unwrap();
    let query = ListQuery {
        name: "needle".into(),
        scan: 10_000,
        ..ListQuery::default()
    };
    let started = std::time::Instant::now();
    let page = store.list_page(&query).unwrap();
    let took = started.elapsed();
    assert!(page.tasks.is_empty() && page.resume.is_some());
    let unfiltered = ListQuery::default();
    let started = std::time::Instant::now();
    let full = store.list_page(&unfiltered).unwrap();
    let full_took = started.elapsed();
    assert_eq!(full.tasks.len(), 100);
    println!(
        "{n} tasks: a no-match page (10,000 read) took {took:?}; a 100-task unfiltered page {full_took:?}"
    );
}

#[test]
fn an_unfiltered_list_pages_through_tasks_of_every_state_in_id_order_both_ways() {
    both(|store| {
        // 700 tasks, more than one scan chunk, in three states mixed so
        // that no state's run of ids is the whole list; some moved on
        // after they were written, out of id order.
        let states = [TaskState::Queued, TaskState::Running, TaskState::Succeeded];
        let ids: Vec<TaskId> = (1..=700).map(|i| id_at(i, 7)).collect();
        for id in &ids {
            let spec = TaskSpec::call("noop", "");
            let first = record(*id, TaskState::Queued, spec, Vec::new());
            store.commit(&[Record::Task(first)]).unwrap();
        }
        for (i, id) in ids.iter().enumerate().rev().filter(|(i, _)| i % 3 != 0) {
            let spec = TaskSpec::call("noop", "");
            let moved = record(*id, states[i % 3], spec, Vec::new());
            store.commit(&[Record::Task(moved)]).unwrap();
        }
        for ascending in [false, true] {
            let mut query = ListQuery {
                limit: 90,
                ascending,
                ..ListQuery::default()
            };
            let mut found = Vec::new();
            loop {
                let (page, resume) = listed(store, &query);
                found.extend(page);
                match resume {
                    // `from` is inclusive: the next page starts after it.
                    Some(resume) if ascending => {
                        query.from = Some(TaskId::from_u128(resume.as_u128() + 1));
                    }
                    Some(resume) => query.before = Some(resume),
                    None => break,
                }
                assert!(found.len() <= ids.len(), "a task listed twice");
            }
            let mut expected = ids.clone();
            if !ascending {
                expected.reverse();
            }
            assert_eq!(found, expected, "ascending: {ascending}");
        }
    });
}

#[test]
fn a_page_of_large_tasks_stops_at_its_byte_budget_and_resumes_after_its_last_task_both_ways() {
    use bytes::Bytes;

    use super::codec::task_wire_bytes;

    both(|store| {
        // 50 tasks with outputs of 16 to 112 KiB.
        let ids: Vec<TaskId> = (1..=50).map(|i| id_at(i * 10, 9)).collect();
        let mut size = std::collections::HashMap::new();
        for (i, id) in ids.iter().enumerate() {
            let spec = TaskSpec::call("noop", "");
            let task = TaskRecord {
                output: Bytes::from(vec![i as u8; (16 + (i % 7) * 16) << 10]),
                ..record(*id, TaskState::Succeeded, spec, Vec::new())
            };
            size.insert(*id, task_wire_bytes(&task));
            store.commit(&[Record::Task(task)]).unwrap();
        }
        // About four tasks' worth a page.
        let budget = 256 << 10;
        for ascending in [false, true] {
            let mut expected = ids.clone();
            if !ascending {
                expected.reverse();
            }
            let mut query = ListQuery {
                limit: 10_000,
                budget,
                ascending,
                ..ListQuery::default()
            };
            let mut found: Vec<TaskId> = Vec::new();
            let mut pages = 0;
            loop {
                let (page, resume) = listed(store, &query);
                pages += 1;
                let bytes: usize = page.iter().map(|id| size[id]).sum();
                assert!(!page.is_empty(), "a page holds at least one task");
                assert!(
                    bytes <= budget,
                    "page {pages} holds {} tasks, {bytes} bytes, over the budget {budget}",
                    page.len()
                );
                found.extend(&page);
                let Some(resume) = resume else { break };
                // Full: the next task would not have fit.
                assert_eq!(
                    resume,
                    *found.last().unwrap(),
                    "resumes after its last task"
                );
                let next = expected[found.len()];
                assert!(bytes + size[&next] > budget, "page {pages} stopped early");
                match ascending {
                    // `from` is inclusive: the next page starts after it.
                    true => query.from = Some(TaskId::from_u128(resume.as_u128() + 1)),
                    false => query.before = Some(resume),
                }
                assert!(pages <= ids.len(), "the pages do not end");
            }
            assert!(pages >= 10, "{pages} pages for 50 tasks of 16 to 112 KiB");
            assert_eq!(found, expected, "every task once, ascending: {ascending}");
        }
        // A budget below one task still answers one.
        let tiny = ListQuery {
            budget: 1,
            ..ListQuery::default()
        };
        assert_eq!(listed(store, &tiny), (vec![ids[49]], Some(ids[49])));
    });
}
