//! The `Store` contract, checked against every engine: the redb store and
//! the log on a temp dir, the in-memory one, and PostgreSQL (a private
//! server the tests start, `pg/testdb.rs`).

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;

use weft_proto::{Attempt, NodeId, Outcome, OutputStream, SecretEnv, TaskId, TaskSpec, TaskState};

use super::*;

fn at(ms: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(1_700_000_000_000 + ms)
}

fn record(id: TaskId, state: TaskState, updated: SystemTime) -> TaskRecord {
    TaskRecord {
        attempt: Attempt(1),
        node_id: Some(NodeId::new()),
        node_name: Some(Arc::from("n1")),
        output: Bytes::from_static(b"out"),
        updated_at: updated,
        last_outcome: state.is_final().then_some(Outcome::Succeeded),
        ..TaskRecord::for_test(id, Arc::new(TaskSpec::call("noop", "in")), state, at(0))
    }
}

fn output(id: TaskId, seq: u64) -> Record {
    Record::Event(TaskEvent {
        task_id: id,
        seq,
        attempt: Attempt(1),
        time: at(seq),
        body: EventBody::Output {
            stream: OutputStream::Stdout,
            data: Bytes::from(format!("chunk {seq}")),
            chunk: Some(seq),
        },
    })
}

fn finished(record: &TaskRecord, seq: u64) -> Record {
    Record::Event(TaskEvent {
        task_id: record.id,
        seq,
        attempt: record.attempt,
        time: record.updated_at,
        body: EventBody::Finished(Arc::new(TaskRecord {
            next_seq: seq + 1,
            ..record.clone()
        })),
    })
}

fn ids(n: usize) -> Vec<TaskId> {
    let mut generator = ulid::Generator::new();
    (0..n)
        .map(|_| TaskId::from_ulid(generator.generate().expect("ulid")))
        .collect()
}

/// Runs `check` against a fresh store of every engine.
fn both(check: impl Fn(&dyn Store)) {
    let dir = tempfile::tempdir().expect("temp dir");
    check(&RedbStore::open(dir.path()).expect("store opens"));
    check(&MemoryStore::new());
    let dir = tempfile::tempdir().expect("temp dir");
    check(&LogStore::open(dir.path()).expect("log store opens"));
    check(&pg::testdb::store());
}

#[test]
fn committed_tasks_and_events_read_back_with_next_seq() {
    both(|store| {
        let id = ids(1)[0];
        let queued = record(id, TaskState::Queued, at(1));
        store
            .commit(&[Record::Task(queued.clone()), output(id, 0), output(id, 1)])
            .unwrap();
        let done = record(id, TaskState::Succeeded, at(5));
        store
            .commit(&[Record::Task(done.clone()), finished(&done, 2)])
            .unwrap();
        let read = store.task(id).unwrap().unwrap();
        assert_eq!(
            read,
            TaskRecord {
                next_seq: 3,
                ..done.clone()
            }
        );
        let events = store.events(id, 1, 10).unwrap();
        assert_eq!(events.iter().map(|e| e.seq).collect::<Vec<_>>(), [1, 2]);
        match &events[1].body {
            EventBody::Finished(r) => assert_eq!(r.spec, done.spec),
            other => panic!("expected finished, got {other:?}"),
        }
        assert_eq!(store.events(id, 0, 1).unwrap().len(), 1);
        assert!(store.task(TaskId::new()).unwrap().is_none());
    });
}

#[test]
fn task_outcomes_answer_each_id_in_order_as_task_does_but_its_spec() {
    both(|store| {
        let all = ids(40);
        // Finished over several commits, in an order other than the ids',
        // with events between them in the log; some still running.
        for (n, chunk) in all.chunks(7).rev().enumerate() {
            let mut records = Vec::new();
            for (i, id) in chunk.iter().enumerate() {
                let state = match (n + i) % 3 {
                    0 => TaskState::Running,
                    1 => TaskState::Failed,
                    _ => TaskState::Succeeded,
                };
                let mut task = record(*id, state, at(10 + (n * 7 + i) as u64));
                task.output = Bytes::from(format!("out of {id}"));
                records.push(Record::Task(task.clone()));
                records.push(output(*id, 0));
                if state.is_final() {
                    records.push(finished(&task, 1));
                }
            }
            store.commit(&records).unwrap();
        }
        let unknown = TaskId::new();
        let mut asked: Vec<TaskId> = all.iter().copied().step_by(3).collect();
        asked.extend(all.iter().rev().copied().take(9));
        asked.insert(4, unknown);
        let outcomes = store.task_outcomes(&asked).unwrap();
        assert_eq!(outcomes.len(), asked.len());
        let has: Vec<bool> = asked.iter().map(|id| *id != unknown).collect();
        assert_eq!(
            store.has_tasks(&asked).unwrap(),
            has,
            "has_tasks as task() says"
        );
        for (id, outcome) in asked.iter().zip(&outcomes) {
            let whole = store.task(*id).unwrap();
            match (outcome, whole) {
                (None, None) => assert_eq!(*id, unknown),
                (Some(outcome), Some(whole)) => {
                    assert_eq!(outcome.id, *id);
                    assert_eq!(
                        TaskRecord {
                            spec: Arc::clone(&whole.spec),
                            ..outcome.clone()
                        },
                        whole,
                        "{id}"
                    );
                }
                (outcome, whole) => panic!("{id}: {outcome:?} but task() says {whole:?}"),
            }
        }
        assert!(store.task_outcomes(&[]).unwrap().is_empty());
    });
}

#[test]
fn a_commit_with_a_seq_gap_or_an_unknown_task_changes_nothing() {
    both(|store| {
        let [a, b] = ids(2)[..] else { unreachable!() };
        store
            .commit(&[
                Record::Task(record(a, TaskState::Queued, at(1))),
                output(a, 0),
            ])
            .unwrap();
        // One good write and one gap in the same commit: neither is kept.
        let err = store
            .commit(&[
                Record::Task(record(b, TaskState::Queued, at(2))),
                output(a, 2),
            ])
            .unwrap_err();
        assert!(matches!(err, StoreError::Inconsistent(_)), "{err}");
        assert!(store.task(b).unwrap().is_none());
        assert_eq!(store.task(a).unwrap().unwrap().next_seq, 1);
        let err = store.commit(&[output(TaskId::new(), 0)]).unwrap_err();
        assert!(matches!(err, StoreError::Inconsistent(_)), "{err}");
        // The log goes on where it was.
        store.commit(&[output(a, 1)]).unwrap();
        assert_eq!(store.task(a).unwrap().unwrap().next_seq, 2);
    });
}

#[test]
fn list_is_newest_first_filters_by_state_and_pages() {
    both(|store| {
        let ids = ids(6);
        for (i, id) in ids.iter().enumerate() {
            let state = if i % 2 == 0 {
                TaskState::Queued
            } else {
                TaskState::Succeeded
            };
            store
                .commit(&[Record::Task(record(*id, state, at(i as u64)))])
                .unwrap();
        }
        let listed = |state, before, limit| -> Vec<TaskId> {
            store
                .list(state, before, limit)
                .unwrap()
                .iter()
                .map(|r| r.id)
                .collect()
        };
        assert_eq!(listed(None, None, 3), [ids[5], ids[4], ids[3]]);
        assert_eq!(listed(None, Some(ids[3]), 3), [ids[2], ids[1], ids[0]]);
        assert_eq!(listed(None, Some(ids[0]), 3), []);
        let queued = Some(TaskState::Queued);
        assert_eq!(listed(queued, None, 2), [ids[4], ids[2]]);
        assert_eq!(listed(queued, Some(ids[2]), 2), [ids[0]]);
        // A task that changes state moves between the state lists.
        store
            .commit(&[Record::Task(record(ids[4], TaskState::Running, at(9)))])
            .unwrap();
        assert_eq!(listed(queued, None, 10), [ids[2], ids[0]]);
        assert_eq!(listed(Some(TaskState::Running), None, 10), [ids[4]]);
    });
}

#[test]
fn load_returns_live_tasks_final_counts_and_recent_results() {
    both(|store| {
        let ids = ids(4);
        store
            .commit(&[
                Record::Task(record(ids[0], TaskState::Queued, at(1))),
                Record::Task(record(ids[1], TaskState::Running, at(2))),
                Record::Task(record(ids[2], TaskState::Succeeded, at(3))),
                Record::Task(record(ids[3], TaskState::Succeeded, at(10_000))),
                output(ids[1], 0),
            ])
            .unwrap();
        let loaded = store.load(at(5_000)).unwrap();
        let live: Vec<(TaskId, u64)> = loaded.live.iter().map(|r| (r.id, r.next_seq)).collect();
        assert_eq!(live, [(ids[0], 0), (ids[1], 1)]);
        assert_eq!(loaded.final_counts, [(TaskState::Succeeded, 2)]);
        assert_eq!(
            loaded.recently_final,
            [FinalAttempt {
                task_id: ids[3],
                attempt: Attempt(1),
                outcome: Some(Outcome::Succeeded),
            }]
        );
    });
}

#[test]
fn load_gives_the_next_output_chunk_of_attempts_on_a_node_from_old_events_too() {
    both(|store| {
        let ids = ids(3);
        // Written before chunk numbers were stored: counted instead.
        let unnumbered = |seq| {
            Record::Event(TaskEvent {
                task_id: ids[1],
                seq,
                attempt: Attempt(1),
                time: at(seq),
                body: EventBody::Output {
                    stream: OutputStream::Stderr,
                    data: Bytes::from_static(b"old"),
                    chunk: None,
                },
            })
        };
        let progress = Record::Event(TaskEvent {
            task_id: ids[0],
            seq: 3,
            attempt: Attempt(1),
            time: at(3),
            body: EventBody::Progress {
                fraction: 0.5,
                message: "half".into(),
            },
        });
        store
            .commit(&[
                Record::Task(record(ids[0], TaskState::Running, at(1))),
                output(ids[0], 0),
                output(ids[0], 1),
                output(ids[0], 2),
                progress,
                Record::Task(record(ids[1], TaskState::Running, at(1))),
                unnumbered(0),
                unnumbered(1),
                Record::Task(record(ids[2], TaskState::Queued, at(1))),
                output(ids[2], 0),
            ])
            .unwrap();
        let mut next = store.load(at(0)).unwrap().next_chunks;
        next.sort();
        assert_eq!(next, [(ids[0], 3), (ids[1], 2)], "none for a queued task");
        let events = store.events(ids[0], 2, 1).unwrap();
        assert!(
            matches!(events[0].body, EventBody::Output { chunk: Some(2), .. }),
            "{events:?}"
        );
    });
}

#[test]
fn expire_deletes_old_final_tasks_with_their_events_a_bounded_number_at_a_time() {
    both(|store| {
        let ids = ids(4);
        for (i, id) in ids.iter().take(3).enumerate() {
            let done = record(*id, TaskState::Succeeded, at(i as u64));
            store
                .commit(&[
                    Record::Task(done.clone()),
                    output(*id, 0),
                    finished(&done, 1),
                ])
                .unwrap();
        }
        // Live, and old: never expired.
        store
            .commit(&[Record::Task(record(ids[3], TaskState::Running, at(0)))])
            .unwrap();
        assert_eq!(
            store.expire(at(100), 2, &[]).unwrap(),
            [TaskState::Succeeded; 2]
        );
        assert!(store.task(ids[0]).unwrap().is_none());
        assert!(store.events(ids[0], 0, 10).unwrap().is_empty());
        assert!(store.task(ids[2]).unwrap().is_some());
        assert_eq!(
            store.expire(at(100), 2, &[]).unwrap(),
            [TaskState::Succeeded]
        );
        assert!(store.expire(at(100), 2, &[]).unwrap().is_empty());
        assert!(store.task(ids[3]).unwrap().is_some());
        let loaded = store.load(UNIX_EPOCH).unwrap();
        assert!(loaded.final_counts.is_empty(), "{:?}", loaded.final_counts);
        assert_eq!(loaded.live.len(), 1);
    });
}

#[test]
fn expire_keeps_the_tasks_it_is_told_to_however_old() {
    both(|store| {
        let ids = ids(12);
        for (i, id) in ids.iter().enumerate() {
            let done = record(*id, TaskState::Succeeded, at(i as u64));
            store
                .commit(&[Record::Task(done.clone()), finished(&done, 0)])
                .unwrap();
        }
        // The oldest, and more than a few (a set, not a list, looks them up).
        let keep: Vec<TaskId> = ids.iter().step_by(2).copied().collect();
        assert_eq!(store.expire(at(100), 3, &keep).unwrap().len(), 3);
        assert_eq!(store.expire(at(100), 100, &keep).unwrap().len(), 3);
        for (i, id) in ids.iter().enumerate() {
            assert_eq!(store.task(*id).unwrap().is_some(), i % 2 == 0, "task {i}");
        }
        // Kept no longer: they go at the next sweep.
        assert_eq!(store.expire(at(100), 100, &[]).unwrap().len(), 6);
        assert!(store.load(UNIX_EPOCH).unwrap().final_counts.is_empty());
    });
}

#[test]
fn a_cancel_requested_of_a_running_task_is_kept_with_its_record() {
    both(|store| {
        let id = ids(1)[0];
        let mut running = record(id, TaskState::Running, at(1));
        running.cancel_requested = Some("not needed".into());
        store.commit(&[Record::Task(running.clone())]).unwrap();
        assert_eq!(store.task(id).unwrap(), Some(running.clone()));
        let loaded = store.load(UNIX_EPOCH).unwrap();
        assert_eq!(loaded.live, [running]);
    });
}

#[test]
fn the_redb_store_keeps_what_was_committed_across_reopening() {
    let dir = tempfile::tempdir().expect("temp dir");
    let id = ids(1)[0];
    let mut running = record(id, TaskState::Running, at(1));
    running.lost_nodes = vec![(NodeId::new(), Arc::from("n0"))];
    {
        let store = RedbStore::open(dir.path()).unwrap();
        store
            .commit(&[Record::Task(running.clone()), output(id, 0)])
            .unwrap();
    }
    let store = RedbStore::open(dir.path()).unwrap();
    let loaded = store.load(UNIX_EPOCH).unwrap();
    assert_eq!(
        loaded.live,
        [TaskRecord {
            next_seq: 1,
            ..running
        }]
    );
}

fn secret(value: &str) -> Arc<SecretEnv> {
    Arc::new(
        [("API_KEY".to_owned(), value.to_owned())]
            .into_iter()
            .collect(),
    )
}

fn stored_secrets(store: &dyn Store) -> Vec<(TaskId, Option<String>)> {
    let mut found: Vec<(TaskId, Option<String>)> = store
        .load(UNIX_EPOCH)
        .unwrap()
        .secrets
        .iter()
        .map(|(id, env)| (*id, env.get("API_KEY").map(str::to_owned)))
        .collect();
    found.sort_by_key(|(id, _)| *id);
    found
}

#[test]
fn secrets_are_kept_apart_from_the_record_and_gone_once_the_task_is_final() {
    both(|store| {
        let [a, b] = ids(2)[..] else { unreachable!() };
        let queued = |id| record(id, TaskState::Queued, at(1));
        store
            .commit(&[
                Record::Task(queued(a)),
                Record::Secrets(a, secret("value-a")),
                Record::Task(queued(b)),
                Record::Secrets(b, secret("value-b")),
            ])
            .unwrap();
        // No reader's path holds them.
        let read = store.task(a).unwrap().unwrap();
        assert!(read.spec.secret_env.is_empty());
        assert!(
            store
                .list(None, None, 10)
                .unwrap()
                .iter()
                .all(|r| r.spec.secret_env.is_empty())
        );
        // A restart gets them back for tasks not yet final.
        assert_eq!(
            stored_secrets(store),
            [(a, Some("value-a".into())), (b, Some("value-b".into()))]
        );
        // The commit that makes `a` final deletes its secrets with it.
        let done = record(a, TaskState::Succeeded, at(5));
        store
            .commit(&[
                Record::Task(done.clone()),
                finished(&done, 0),
                Record::ForgetSecrets(a),
            ])
            .unwrap();
        assert_eq!(stored_secrets(store), [(b, Some("value-b".into()))]);
        // Retention takes whatever a final task left.
        let gone = record(b, TaskState::Cancelled, at(6));
        store.commit(&[Record::Task(gone)]).unwrap();
        assert_eq!(store.expire(at(100), 10, &[]).unwrap().len(), 2);
        assert!(stored_secrets(store).is_empty());
    });
}

#[test]
fn secrets_of_a_task_neither_stored_nor_written_before_them_refuse_the_commit() {
    both(|store| {
        let [known, fresh, unknown] = ids(3)[..] else {
            unreachable!()
        };
        let queued = |id| record(id, TaskState::Queued, at(1));
        store.commit(&[Record::Task(queued(known))]).unwrap();
        // Secrets of a task no record names, or named only after them:
        // refused, as an event of an unknown task is, and nothing of the
        // commit is kept.
        for refused in [
            vec![
                Record::Task(queued(fresh)),
                Record::Secrets(unknown, secret("orphan")),
            ],
            vec![
                Record::Secrets(fresh, secret("too early")),
                Record::Task(queued(fresh)),
            ],
        ] {
            let err = store.commit(&refused).unwrap_err();
            assert!(matches!(err, StoreError::Inconsistent(_)), "{err}");
            assert!(store.task(fresh).unwrap().is_none());
            assert!(store.task(unknown).unwrap().is_none());
        }
        // The store goes on: a stored task, or one written earlier in the
        // same commit, takes its secrets.
        store
            .commit(&[
                Record::Secrets(known, secret("value-k")),
                Record::Task(queued(fresh)),
                Record::Secrets(fresh, secret("value-f")),
            ])
            .unwrap();
        let mut expected = vec![
            (known, Some("value-k".to_owned())),
            (fresh, Some("value-f".to_owned())),
        ];
        expected.sort_by_key(|(id, _)| *id);
        assert_eq!(stored_secrets(store), expected);
        assert_eq!(store.load(UNIX_EPOCH).unwrap().live.len(), 2);
    });
}

#[test]
fn a_log_store_that_refused_orphan_secrets_opens_again() {
    let dir = tempfile::tempdir().expect("temp dir");
    let unknown = ids(1)[0];
    {
        let store = LogStore::open(dir.path()).unwrap();
        let err = store
            .commit(&[Record::Secrets(unknown, secret("orphan"))])
            .unwrap_err();
        assert!(matches!(err, StoreError::Inconsistent(_)), "{err}");
    }
    let store = LogStore::open(dir.path()).expect("the log opens again");
    assert!(store.task(unknown).unwrap().is_none());
    assert!(store.load(UNIX_EPOCH).unwrap().secrets.is_empty());
}

#[test]
fn a_final_task_written_again_unchanged_is_still_expired() {
    both(|store| {
        let id = ids(1)[0];
        let done = record(id, TaskState::Succeeded, at(5));
        store.commit(&[Record::Task(done.clone())]).unwrap();
        // Written again with the same time (a commit that repeats it).
        store.commit(&[Record::Task(done)]).unwrap();
        assert_eq!(
            store.expire(at(100), 10, &[]).unwrap(),
            [TaskState::Succeeded]
        );
        assert!(store.task(id).unwrap().is_none());
    });
}

#[test]
fn the_redb_store_keeps_secrets_of_live_tasks_across_reopening() {
    let dir = tempfile::tempdir().expect("temp dir");
    let id = ids(1)[0];
    {
        let store = RedbStore::open(dir.path()).unwrap();
        store
            .commit(&[
                Record::Task(record(id, TaskState::Queued, at(1))),
                Record::Secrets(id, secret("kept")),
            ])
            .unwrap();
    }
    let store = RedbStore::open(dir.path()).unwrap();
    assert_eq!(stored_secrets(&store), [(id, Some("kept".into()))]);
    assert!(store.task(id).unwrap().unwrap().spec.secret_env.is_empty());
}

#[test]
fn weft_redb_no_longer_holds_a_secret_once_its_task_is_final() {
    // Read the file's secrets table directly (not through `load`), after
    // reopening: the commit that makes the task final deletes the entry.
    // (A logical delete: redb may keep the freed page's bytes in the file
    // until it reuses them; the README says so.)
    use ::redb::{ReadableDatabase, ReadableTable, TableDefinition};
    const SECRETS: TableDefinition<u128, &[u8]> = TableDefinition::new("secrets");
    let table_ids = |dir: &std::path::Path| -> Vec<u128> {
        let db = ::redb::Database::open(dir.join(super::redb::FILE_NAME)).expect("open weft.redb");
        let txn = db.begin_read().expect("read");
        let table = txn.open_table(SECRETS).expect("secrets table");
        table
            .iter()
            .expect("iter")
            .map(|entry| entry.expect("entry").0.value())
            .collect()
    };
    let dir = tempfile::tempdir().expect("temp dir");
    let [done, live] = ids(2)[..] else {
        unreachable!()
    };
    {
        let store = RedbStore::open(dir.path()).unwrap();
        store
            .commit(&[
                Record::Task(record(done, TaskState::Queued, at(1))),
                Record::Secrets(done, secret("gone-when-final")),
                Record::Task(record(live, TaskState::Queued, at(1))),
                Record::Secrets(live, secret("still-needed")),
            ])
            .unwrap();
        let finished_record = record(done, TaskState::Succeeded, at(5));
        store
            .commit(&[
                Record::Task(finished_record.clone()),
                finished(&finished_record, 0),
                Record::ForgetSecrets(done),
            ])
            .unwrap();
    }
    assert_eq!(table_ids(dir.path()), [live.as_u128()]);
    let store = RedbStore::open(dir.path()).unwrap();
    assert_eq!(
        stored_secrets(&store),
        [(live, Some("still-needed".into()))]
    );
}

#[test]
fn a_second_redb_store_on_the_same_dir_is_refused_clearly() {
    let dir = tempfile::tempdir().expect("temp dir");
    let _first = RedbStore::open(dir.path()).unwrap();
    let err = RedbStore::open(dir.path()).unwrap_err();
    assert!(matches!(err, StoreError::Locked(_)), "{err}");
    assert!(
        err.to_string().contains("in use by another coordinator"),
        "{err}"
    );
}

#[test]
fn token_records_round_trip_revocation_replaces_and_survive_reopening() {
    use crate::auth::{Scope, Scopes, new_token};
    both(|store| {
        assert!(store.tokens().unwrap().is_empty());
        let (mut record, _) = new_token(
            "ci",
            Scopes::of([Scope::Read, Scope::Cancel]),
            Some(Duration::from_secs(60)),
            at(5_000),
        )
        .unwrap();
        store.put_token(&record).unwrap();
        assert_eq!(store.tokens().unwrap(), vec![record.clone()]);
        record.revoked = Some(at(6_000));
        store.put_token(&record).unwrap();
        assert_eq!(store.tokens().unwrap(), vec![record.clone()]);
    });
    let dir = tempfile::tempdir().expect("temp dir");
    let (record, token) = new_token("admin", Scopes::ADMIN, None, at(1_000)).unwrap();
    RedbStore::open(dir.path())
        .unwrap()
        .put_token(&record)
        .unwrap();
    let reopened = RedbStore::open(dir.path()).unwrap();
    assert_eq!(reopened.tokens().unwrap(), vec![record]);
    let secret = token_secret(&token);
    let bytes = std::fs::read(reopened.path()).unwrap();
    assert!(!bytes.windows(secret.len()).any(|w| w == secret.as_bytes()));
}

#[cfg(unix)]
#[test]
fn the_redb_store_keeps_its_data_dir_private() {
    use std::os::unix::fs::PermissionsExt;
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    let dir = tempfile::tempdir().expect("temp dir");
    // Created by the store: 0700.
    let fresh = dir.path().join("data");
    drop(RedbStore::open(&fresh).unwrap());
    assert_eq!(mode(&fresh), 0o700);
    // An existing dir open to others is tightened.
    let open = dir.path().join("open");
    std::fs::create_dir(&open).unwrap();
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o755)).unwrap();
    drop(RedbStore::open(&open).unwrap());
    assert_eq!(mode(&open), 0o700);
}

/// The secret part of a `weft_<id>_<secret>` token: the id is hex, the
/// secret base64url, which may itself contain `_`.
fn token_secret(token: &str) -> &str {
    token
        .strip_prefix("weft_")
        .and_then(|rest| rest.split_once('_'))
        .map(|(_, secret)| secret)
        .expect("a weft_<id>_<secret> token")
}

#[test]
fn node_identities_and_the_join_token_use_round_trip_and_survive_reopening() {
    use crate::auth::new_join_token;
    let (token, _) = new_join_token("rack", None, 3, at(1_000)).unwrap();
    let joined = NodeIdentityRecord {
        id: NodeId::new(),
        name: "gpu-1".into(),
        created: at(2_000),
        token_id: token.id.clone(),
        revoked: None,
    };
    let used = crate::auth::TokenRecord {
        used: 1,
        ..token.clone()
    };
    both(|store| {
        assert!(store.node_identities().unwrap().is_empty());
        store.put_token(&token).unwrap();
        store.put_node_identity(&joined, Some(&used)).unwrap();
        assert_eq!(store.node_identities().unwrap(), vec![joined.clone()]);
        assert_eq!(store.tokens().unwrap(), vec![used.clone()]);
        let revoked = NodeIdentityRecord {
            revoked: Some(at(3_000)),
            ..joined.clone()
        };
        store.put_node_identity(&revoked, None).unwrap();
        assert_eq!(store.node_identities().unwrap(), vec![revoked]);
        assert_eq!(store.tokens().unwrap(), vec![used.clone()]);
    });
    let dir = tempfile::tempdir().expect("temp dir");
    RedbStore::open(dir.path())
        .unwrap()
        .put_node_identity(&joined, Some(&used))
        .unwrap();
    let reopened = RedbStore::open(dir.path()).unwrap();
    assert_eq!(reopened.node_identities().unwrap(), vec![joined]);
    assert_eq!(reopened.tokens().unwrap(), vec![used]);
}

#[test]
fn token_records_from_before_join_tokens_read_as_no_uses() {
    use prost::Message;
    // A token as an older coordinator stored it: fields 1-8, no uses.
    #[derive(Clone, PartialEq, Message)]
    struct OldStoredToken {
        #[prost(string, tag = "1")]
        id: String,
        #[prost(string, tag = "2")]
        name: String,
        #[prost(uint32, tag = "3")]
        kind: u32,
        #[prost(uint32, tag = "4")]
        scopes: u32,
        #[prost(uint64, tag = "5")]
        created_ms: u64,
        #[prost(uint64, tag = "6")]
        expires_ms: u64,
        #[prost(uint64, tag = "7")]
        revoked_ms: u64,
        #[prost(bytes = "vec", tag = "8")]
        secret_hash: Vec<u8>,
    }
    let old = OldStoredToken {
        id: "0123456789abcdef".into(),
        name: "ci".into(),
        kind: 0,
        scopes: 1,
        created_ms: 1_700_000_000_000,
        expires_ms: 0,
        revoked_ms: 0,
        secret_hash: vec![7; 32],
    }
    .encode_to_vec();
    let record = codec::decode_token(&old).unwrap();
    assert_eq!((record.uses, record.used), (0, 0));
    assert_eq!(record.id, "0123456789abcdef");
    assert_eq!(record.kind, crate::auth::TokenKind::Client);
    // And the current form reads back what it wrote.
    let again = codec::decode_token(&codec::encode_token(&record)).unwrap();
    assert_eq!(again, record);
}

#[test]
fn load_each_hands_over_live_tasks_one_at_a_time_in_id_order_with_their_secrets() {
    both(|store| {
        let [a, b, c, d] = ids(4)[..] else {
            unreachable!()
        };
        // Committed out of id order, in three live states and one final.
        store
            .commit(&[
                Record::Task(record(c, TaskState::Assigned, at(1))),
                Record::Task(record(a, TaskState::Running, at(1))),
                Record::Task(record(d, TaskState::Succeeded, at(2))),
                Record::Task(record(b, TaskState::Queued, at(1))),
                Record::Secrets(b, secret("value-b")),
            ])
            .unwrap();
        let mut seen = Vec::new();
        let loaded = store
            .load_each(UNIX_EPOCH, &mut |record, secret| {
                let secret = secret.and_then(|env| env.get("API_KEY").map(str::to_owned));
                seen.push((record.id, record.state, secret));
            })
            .unwrap();
        assert_eq!(
            seen,
            [
                (a, TaskState::Running, None),
                (b, TaskState::Queued, Some("value-b".to_owned())),
                (c, TaskState::Assigned, None),
            ]
        );
        assert!(loaded.live.is_empty() && loaded.secrets.is_empty());
        assert_eq!(loaded.final_counts, [(TaskState::Succeeded, 1)]);
        assert_eq!(loaded.recently_final.len(), 1);
    });
}

#[test]
fn limits_are_kept_replaced_and_deleted_and_the_redb_store_keeps_them_across_reopening() {
    use weft_proto::policy::{Limit, LimitKind};
    let rate = |name: &str, spec: &str| Limit {
        name: name.into(),
        kind: LimitKind::Rate(spec.parse().unwrap()),
    };
    let max = Limit {
        name: "api".into(),
        kind: LimitKind::MaxRunning(2),
    };
    both(|store| {
        store
            .commit(&[
                Record::Limit(rate("api", "10/s")),
                Record::Limit(max.clone()),
                Record::Limit(rate("db", "1/s")),
            ])
            .unwrap();
        store
            .commit(&[
                Record::Limit(rate("api", "20/s")),
                Record::DeleteLimit {
                    name: "db".into(),
                    kind: "rate".into(),
                },
            ])
            .unwrap();
        let mut limits = store.load(at(0)).unwrap().limits;
        limits.sort_by_key(|l| (l.kind.as_str(), l.name.clone()));
        assert_eq!(limits, [max.clone(), rate("api", "20/s")]);
    });
    let dir = tempfile::tempdir().expect("temp dir");
    {
        let store = RedbStore::open(dir.path()).unwrap();
        store.commit(&[Record::Limit(rate("api", "5/m"))]).unwrap();
    }
    let store = RedbStore::open(dir.path()).unwrap();
    assert_eq!(store.load(at(0)).unwrap().limits, [rate("api", "5/m")]);
}
