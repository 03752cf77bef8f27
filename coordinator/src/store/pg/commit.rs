//! One [`Store::commit`](crate::store::Store::commit) as one transaction.
//!
//! The commit is checked as the log checks it before anything is written:
//! the touched tasks' rows are locked and their `next_seq` read, and an
//! event or secrets for an unknown task, or an event with a seq gap,
//! refuses the whole commit ([`StoreError::Inconsistent`], rolled back,
//! nothing changed). Then each
//! kind of row is written by one statement over arrays (`unnest`), all
//! sent at once on the connection (pipelined), and committed. A task
//! changed several times in one commit is written once, as it ends up;
//! secrets, schedules and limits likewise end as the last record says.

use std::collections::{BTreeMap, HashMap};
use std::time::SystemTime;

use futures::future::try_join_all;
use tokio_postgres::Transaction;
use tokio_postgres::types::ToSql;

use super::conn::{Conn, Statements};
use super::types::Uuid;
use super::{backend, clamp, state_number};
use crate::store::codec::{encode_event, encode_secrets, encode_spec, encode_task_without_spec};
use crate::store::{Record, StoreError, TaskRecord, encode_schedule};

const OP: &str = "committing";

/// The checked writes of one commit.
#[derive(Default)]
struct Writes<'r> {
    /// Each task's last record, by id, with its `next_seq` after the commit.
    tasks: BTreeMap<u128, (&'r TaskRecord, u64)>,
    /// Tasks with events but no record in this commit: their `next_seq`.
    seqs: BTreeMap<u128, u64>,
    /// Tasks new in this commit: their spec is written once.
    new: Vec<u128>,
    events: Vec<(Uuid, i64, i64, Vec<u8>)>,
    /// `None`: deleted.
    secrets: BTreeMap<u128, Option<Vec<u8>>>,
    schedules: BTreeMap<String, Option<Vec<u8>>>,
    limits: BTreeMap<(String, String), Option<Vec<u8>>>,
}

/// Checks `records` against `known` (the next seq of each touched task
/// the database has) as the log does, and sorts them into writes.
fn plan<'r>(records: &'r [Record], known: &HashMap<u128, u64>) -> Result<Writes<'r>, StoreError> {
    let mut writes = Writes::default();
    // Each touched task's next seq as the commit goes.
    let mut next: HashMap<u128, u64> = HashMap::new();
    for record in records {
        match record {
            Record::Task(task) => {
                let key = task.id.as_u128();
                next.entry(key)
                    .or_insert_with(|| known.get(&key).copied().unwrap_or(0));
                writes.tasks.insert(key, (task, 0));
            }
            Record::Event(event) => {
                let key = event.task_id.as_u128();
                let seq = match next.get_mut(&key) {
                    Some(seq) => seq,
                    None => match known.get(&key) {
                        Some(seq) => next.entry(key).or_insert(*seq),
                        None => {
                            return Err(StoreError::Inconsistent(format!(
                                "event for unknown task {}",
                                event.task_id
                            )));
                        }
                    },
                };
                if event.seq != *seq {
                    return Err(StoreError::Inconsistent(format!(
                        "task {} event seq {} where {} was next",
                        event.task_id, event.seq, seq
                    )));
                }
                *seq += 1;
                writes.events.push((
                    Uuid(key),
                    clamp(event.seq),
                    i64::from(event.attempt.0),
                    encode_event(event),
                ));
            }
            // Of a task stored or written earlier in this commit, as an
            // event's: never a row with no task.
            Record::Secrets(id, env) => {
                let key = id.as_u128();
                if !next.contains_key(&key) && !known.contains_key(&key) {
                    return Err(StoreError::Inconsistent(format!(
                        "secrets for unknown task {id}"
                    )));
                }
                writes.secrets.insert(key, Some(encode_secrets(env)));
            }
            Record::ForgetSecrets(id) => {
                writes.secrets.insert(id.as_u128(), None);
            }
            Record::Schedule(schedule) => {
                writes
                    .schedules
                    .insert(schedule.name().to_owned(), Some(encode_schedule(schedule)));
            }
            Record::DeleteSchedule(name) => {
                writes.schedules.insert(name.clone(), None);
            }
            Record::Limit(limit) => {
                let body = prost::Message::encode_to_vec(&weft_proto::pb::Limit::from(limit));
                writes.limits.insert(
                    (limit.kind.as_str().to_owned(), limit.name.clone()),
                    Some(body),
                );
            }
            Record::DeleteLimit { name, kind } => {
                writes.limits.insert((kind.clone(), name.clone()), None);
            }
        }
    }
    for (key, seq) in next {
        match writes.tasks.get_mut(&key) {
            Some(task) => task.1 = seq,
            None => {
                writes.seqs.insert(key, seq);
            }
        }
        if !known.contains_key(&key) {
            writes.new.push(key);
        }
    }
    writes.new.sort_unstable();
    Ok(writes)
}

/// A limit from its stored bytes (a `pb::Limit`).
pub(super) fn decode_limit(bytes: &[u8]) -> Result<weft_proto::policy::Limit, StoreError> {
    <weft_proto::pb::Limit as prost::Message>::decode(bytes)
        .ok()
        .and_then(|pb| weft_proto::policy::Limit::try_from(pb).ok())
        .ok_or_else(|| StoreError::Corrupt {
            what: "limit",
            message: "cannot be read".into(),
        })
}

/// Writes `records` in one transaction on `conn`, with the statements it
/// has prepared.
pub(super) async fn commit(conn: &mut Conn, records: &[Record]) -> Result<(), StoreError> {
    let err = |e: tokio_postgres::Error| backend(OP, &e);
    let mut touched: Vec<Uuid> = records
        .iter()
        .filter_map(|record| match record {
            Record::Task(task) => Some(Uuid::from(task.id)),
            Record::Event(event) => Some(Uuid::from(event.task_id)),
            Record::Secrets(id, _) => Some(Uuid::from(*id)),
            _ => None,
        })
        .collect();
    touched.sort_unstable();
    touched.dedup();
    let Conn { client, statements } = conn;
    let tx = client.transaction().await.map_err(err)?;
    // Read without row locks: this connection is the database's only
    // writer (it holds the coordinator lock), and a row lock is a write of
    // its own (a heap change and a WAL record per row).
    let lock = statements
        .get(&tx, "SELECT id, next_seq FROM tasks WHERE id = ANY($1)")
        .await
        .map_err(err)?;
    let rows = tx.query(&lock, &[&touched]).await.map_err(err)?;
    let known: HashMap<u128, u64> = rows
        .iter()
        .map(|row| {
            let id: Uuid = row.get(0);
            (id.0, u64::try_from(row.get::<_, i64>(1)).unwrap_or(0))
        })
        .collect();
    // A refused commit drops `tx`: rolled back, nothing written.
    let writes = plan(records, &known)?;
    write(&tx, statements, &writes).await?;
    tx.commit().await.map_err(err)
}

/// Columns of the task rows a commit writes.
#[derive(Default)]
struct TaskRows {
    id: Vec<Uuid>,
    state: Vec<i16>,
    attempt: Vec<i64>,
    outcome: Vec<Option<i16>>,
    updated_at: Vec<SystemTime>,
    finished_at: Vec<Option<SystemTime>>,
    next_seq: Vec<i64>,
    record: Vec<Vec<u8>>,
}

/// Sends every statement of `writes` at once and waits for them all.
async fn write(
    tx: &Transaction<'_>,
    statements: &Statements,
    writes: &Writes<'_>,
) -> Result<(), StoreError> {
    let mut new_tasks = TaskRows::default();
    let mut known_tasks = TaskRows::default();
    for (key, (task, next_seq)) in &writes.tasks {
        let tasks = match writes.new.binary_search(key) {
            Ok(_) => &mut new_tasks,
            Err(_) => &mut known_tasks,
        };
        tasks.id.push(Uuid(*key));
        tasks.state.push(state_number(task.state));
        tasks.attempt.push(i64::from(task.attempt.0));
        tasks.outcome.push(
            task.last_outcome
                .map(|o| i16::try_from(i32::from(o)).unwrap_or(0)),
        );
        tasks.updated_at.push(task.updated_at);
        tasks
            .finished_at
            .push(task.state.is_final().then_some(task.updated_at));
        tasks.next_seq.push(clamp(*next_seq));
        tasks.record.push(encode_task_without_spec(task));
    }
    let (spec_ids, specs): (Vec<Uuid>, Vec<Vec<u8>>) = writes
        .new
        .iter()
        .filter_map(|key| {
            writes
                .tasks
                .get(key)
                .map(|(t, _)| (Uuid(*key), encode_spec(&t.spec)))
        })
        .unzip();
    let (seq_ids, seqs): (Vec<Uuid>, Vec<i64>) = writes
        .seqs
        .iter()
        .map(|(key, seq)| (Uuid(*key), clamp(*seq)))
        .unzip();
    let mut events = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for (id, seq, attempt, body) in &writes.events {
        events.0.push(*id);
        events.1.push(*seq);
        events.2.push(*attempt);
        events.3.push(body.as_slice());
    }
    let (put_secret, put_env, gone_secret) = split(&writes.secrets, |k| Uuid(*k));
    let (put_schedule, put_body, gone_schedule) = split(&writes.schedules, Clone::clone);
    let limit_keys =
        |rows: Vec<(String, String)>| -> (Vec<String>, Vec<String>) { rows.into_iter().unzip() };
    let (put_limit, limit_body, gone_limit) = split(&writes.limits, Clone::clone);
    let (put_kind, put_name) = limit_keys(put_limit);
    let (gone_kind, gone_name) = limit_keys(gone_limit);

    let mut writes_sql: Vec<(&str, Vec<&(dyn ToSql + Sync)>)> = Vec::new();
    // New rows are inserted and known ones updated: an upsert would take a
    // row lock (another write) before updating a row that exists.
    for (rows, sql) in [
        (
            &new_tasks,
            "INSERT INTO tasks (id, state, attempt, outcome, updated_at, finished_at, next_seq, record)
             SELECT * FROM unnest($1::uuid[], $2::int2[], $3::int8[], $4::int2[],
                                  $5::timestamptz[], $6::timestamptz[], $7::int8[], $8::bytea[])",
        ),
        (
            &known_tasks,
            "UPDATE tasks t SET state = u.state, attempt = u.attempt, outcome = u.outcome,
                updated_at = u.updated_at, finished_at = u.finished_at, next_seq = u.next_seq,
                record = u.record
             FROM unnest($1::uuid[], $2::int2[], $3::int8[], $4::int2[],
                         $5::timestamptz[], $6::timestamptz[], $7::int8[], $8::bytea[])
                  AS u(id, state, attempt, outcome, updated_at, finished_at, next_seq, record)
             WHERE t.id = u.id",
        ),
    ] {
        if !rows.id.is_empty() {
            writes_sql.push((
                sql,
                vec![
                    &rows.id,
                    &rows.state,
                    &rows.attempt,
                    &rows.outcome,
                    &rows.updated_at,
                    &rows.finished_at,
                    &rows.next_seq,
                    &rows.record,
                ],
            ));
        }
    }
    if !spec_ids.is_empty() {
        writes_sql.push((
            "INSERT INTO task_specs (id, spec) SELECT * FROM unnest($1::uuid[], $2::bytea[])
             ON CONFLICT (id) DO NOTHING",
            vec![&spec_ids, &specs],
        ));
    }
    if !seq_ids.is_empty() {
        writes_sql.push((
            "UPDATE tasks t SET next_seq = u.next_seq
             FROM unnest($1::uuid[], $2::int8[]) AS u(id, next_seq) WHERE t.id = u.id",
            vec![&seq_ids, &seqs],
        ));
    }
    if !events.0.is_empty() {
        writes_sql.push((
            "INSERT INTO events (task_id, seq, attempt, body)
             SELECT * FROM unnest($1::uuid[], $2::int8[], $3::int8[], $4::bytea[])",
            vec![&events.0, &events.1, &events.2, &events.3],
        ));
    }
    if !put_secret.is_empty() {
        writes_sql.push((
            "INSERT INTO task_secrets (id, env) SELECT * FROM unnest($1::uuid[], $2::bytea[])
             ON CONFLICT (id) DO UPDATE SET env = EXCLUDED.env",
            vec![&put_secret, &put_env],
        ));
    }
    if !gone_secret.is_empty() {
        writes_sql.push((
            "DELETE FROM task_secrets WHERE id = ANY($1)",
            vec![&gone_secret],
        ));
    }
    if !put_schedule.is_empty() {
        writes_sql.push((
            "INSERT INTO schedules (name, record) SELECT * FROM unnest($1::text[], $2::bytea[])
             ON CONFLICT (name) DO UPDATE SET record = EXCLUDED.record",
            vec![&put_schedule, &put_body],
        ));
    }
    if !gone_schedule.is_empty() {
        writes_sql.push((
            "DELETE FROM schedules WHERE name = ANY($1)",
            vec![&gone_schedule],
        ));
    }
    if !put_kind.is_empty() {
        writes_sql.push((
            "INSERT INTO limits (kind, name, record)
             SELECT * FROM unnest($1::text[], $2::text[], $3::bytea[])
             ON CONFLICT (kind, name) DO UPDATE SET record = EXCLUDED.record",
            vec![&put_kind, &put_name, &limit_body],
        ));
    }
    if !gone_kind.is_empty() {
        writes_sql.push((
            "DELETE FROM limits l USING unnest($1::text[], $2::text[]) AS g(kind, name)
             WHERE l.kind = g.kind AND l.name = g.name",
            vec![&gone_kind, &gone_name],
        ));
    }
    // Each prepared once per connection; the first commit to need one
    // prepares it on the way, pipelined like the rest.
    try_join_all(writes_sql.iter().map(|(sql, params)| async move {
        let statement = statements.get(tx, sql).await?;
        tx.execute(&statement, params.as_slice()).await
    }))
    .await
    .map_err(|e| backend(OP, &e))?;
    Ok(())
}

/// A keyed table's writes: the keys to upsert with their bodies, and the
/// keys to delete.
fn split<K, T>(
    rows: &BTreeMap<K, Option<Vec<u8>>>,
    key: impl Fn(&K) -> T,
) -> (Vec<T>, Vec<&[u8]>, Vec<T>) {
    let mut put = (Vec::new(), Vec::new());
    let mut gone = Vec::new();
    for (k, body) in rows {
        match body {
            Some(body) => {
                put.0.push(key(k));
                put.1.push(body.as_slice());
            }
            None => gone.push(key(k)),
        }
    }
    (put.0, put.1, gone)
}
