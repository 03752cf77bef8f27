//! Secret environments: never in a record or event, given to the attempt's
//! assignment, forgotten (and deleted from the store) when the task ends,
//! and loaded back after a restart for tasks still waiting.

use super::*;

fn with_secret(value: &str) -> TaskSpec {
    TaskSpec::call("noop", "").secret_env("API_KEY", value)
}

/// What each assignment to `session` carries as its `API_KEY` secret.
fn secrets_sent(effects: &Effects, session: SessionId) -> BTreeMap<TaskId, Option<String>> {
    effects
        .nodes
        .get(&session)
        .map(|out| {
            out.assign
                .iter()
                .map(|a| {
                    let value = a
                        .secret_env
                        .as_ref()
                        .and_then(|env| env.get("API_KEY").map(str::to_owned));
                    (a.task_id, value)
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Every record of `effects` a reader could get, checked for secrets; the
/// ids of the tasks whose secrets it keeps and forgets.
fn secret_records(effects: &Effects) -> (Vec<TaskId>, Vec<TaskId>) {
    let (mut kept, mut forgotten) = (Vec::new(), Vec::new());
    for record in &effects.records {
        match record {
            Record::Task(task) => assert!(task.spec.secret_env.is_empty(), "{task:?}"),
            Record::Event(event) => {
                if let EventBody::Finished(task) = &event.body {
                    assert!(task.spec.secret_env.is_empty(), "{task:?}");
                }
            }
            Record::Secrets(id, _) => kept.push(*id),
            Record::ForgetSecrets(id) => forgotten.push(*id),
            Record::Limit(_) | Record::DeleteLimit { .. } => {}
        }
    }
    (kept, forgotten)
}

#[test]
fn a_secret_goes_only_to_its_assignment_and_is_forgotten_when_the_task_ends() {
    let mut h = Harness::new();
    let ids = h.submit(vec![with_secret("s3cr3t"), TaskSpec::call("noop", "")]);
    let e = h.effects();
    assert_eq!(secret_records(&e), (vec![ids[0]], vec![]));
    h.node(S1, reg("n1", 2), 2);
    let e = h.effects();
    assert_eq!(
        secrets_sent(&e, S1),
        BTreeMap::from([(ids[0], Some("s3cr3t".to_owned())), (ids[1], None)])
    );
    assert_eq!(secret_records(&e), (vec![], vec![]));
    h.finish(S1, ids[0], 1, Outcome::Succeeded);
    h.finish(S1, ids[1], 1, Outcome::Succeeded);
    let e = h.effects();
    // Deleted in the commit that makes it final; nothing for the other one.
    assert_eq!(secret_records(&e), (vec![], vec![ids[0]]));
    assert!(h.s.secrets.is_empty());
}

#[test]
fn a_retried_attempt_gets_the_secret_again_and_a_cancelled_task_forgets_it() {
    let mut h = Harness::new();
    let ids = h.submit(vec![with_secret("one"), with_secret("two")]);
    h.node(S1, reg("n1", 1), 1);
    let e = h.effects();
    let first: Vec<TaskId> = secrets_sent(&e, S1).into_keys().collect();
    assert_eq!(first.len(), 1);
    h.finish(S1, first[0], 1, Outcome::Failed);
    h.s.credits(S1, 1, h.now);
    h.advance(Duration::from_secs(1));
    let other = if first[0] == ids[0] { ids[1] } else { ids[0] };
    assert!(h.s.cancel(other, "not needed", h.now));
    let e = h.effects();
    assert_eq!(secret_records(&e).1, [other]);
    let again = secrets_sent(&e, S1);
    let value = if first[0] == ids[0] { "one" } else { "two" };
    assert_eq!(
        again,
        BTreeMap::from([(first[0], Some(value.to_owned()))]),
        "the retry carries the secret"
    );
}

#[test]
fn a_queued_tasks_secret_is_loaded_back_after_a_restart() {
    let mut h = Harness::new();
    let ids = h.submit(vec![with_secret("kept"), with_secret("dropped")]);
    h.effects();
    assert!(h.s.cancel(ids[1], "not needed", h.now));
    h.effects();
    let mut h = h.restart(Duration::from_secs(1));
    assert_eq!(
        h.s.secrets.len(),
        1,
        "only the live task's secret is loaded"
    );
    h.node(S1, reg("n1", 1), 1);
    let e = h.effects();
    assert_eq!(
        secrets_sent(&e, S1),
        BTreeMap::from([(ids[0], Some("kept".to_owned()))])
    );
}
