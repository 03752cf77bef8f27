//! Exec policies: an exec task goes only to a node whose policy allows its
//! program, call tasks go anywhere their handler is, and a task no node
//! accepts says why it waits.

use weft_proto::ExecPolicy;

use super::*;

const S3: SessionId = SessionId(3);

fn with_exec(name: &str, exec: ExecPolicy) -> NodeRegistration {
    NodeRegistration {
        exec,
        ..reg(name, 4)
    }
}

fn list(programs: &[&str]) -> ExecPolicy {
    ExecPolicy::programs(programs.iter().copied()).expect("valid list")
}

#[test]
fn exec_tasks_go_only_to_nodes_that_allow_them() {
    let mut h = Harness::new();
    h.node(S1, with_exec("deny", ExecPolicy::Deny), 4);
    h.node(S2, with_exec("allow", ExecPolicy::Allow), 4);
    let ids = h.submit((0..4).map(|_| TaskSpec::exec(["true"])).collect());
    let e = h.effects();
    assert!(assigned(&e, S1).is_empty());
    let on_allow: Vec<TaskId> = assigned(&e, S2).iter().map(|(t, _)| *t).collect();
    assert_eq!(on_allow, ids);
}

#[test]
fn a_deny_node_still_runs_call_tasks() {
    let mut h = Harness::new();
    h.node(S1, with_exec("deny", ExecPolicy::Deny), 4);
    let ids = h.submit(vec![TaskSpec::call("noop", "")]);
    assert_eq!(assigned(&h.effects(), S1), [(ids[0], Attempt(1))]);
}

#[test]
fn an_allow_list_node_gets_only_its_programs() {
    let mut h = Harness::new();
    h.node(S1, with_exec("listed", list(&["echo", "/bin/true"])), 4);
    let ids = h.submit(vec![
        TaskSpec::exec(["sh", "-c", "echo"]),
        TaskSpec::exec(["echo", "hi"]),
        TaskSpec::exec(["/bin/echo", "hi"]),
        TaskSpec::exec(["/bin/true"]),
        TaskSpec::exec(["true"]),
    ]);
    let e = h.effects();
    let got: Vec<TaskId> = assigned(&e, S1).iter().map(|(t, _)| *t).collect();
    assert_eq!(got, [ids[1], ids[3]]);
    assert_eq!(
        h.s.pending_reason(ids[0]).as_deref(),
        Some("no connected node allows program 'sh'")
    );
    assert_eq!(
        h.s.pending_reason(ids[2]).as_deref(),
        Some("no connected node allows program '/bin/echo'")
    );
    assert_eq!(
        h.s.pending_reason(ids[4]).as_deref(),
        Some("no connected node allows program 'true'")
    );
}

#[test]
fn an_exec_task_no_node_accepts_waits_saying_so_until_one_joins() {
    let mut h = Harness::new();
    h.node(S1, with_exec("deny-1", ExecPolicy::Deny), 4);
    h.node(S2, with_exec("deny-2", ExecPolicy::Deny), 4);
    let ids = h.submit(vec![TaskSpec::exec(["true"])]);
    assert!(assigned(&h.effects(), S1).is_empty());
    assert_eq!(h.record(ids[0]).state, TaskState::Queued);
    assert_eq!(
        h.s.pending_reason(ids[0]).as_deref(),
        Some("no connected node accepts exec tasks")
    );
    h.node(S3, with_exec("allow", ExecPolicy::Allow), 1);
    assert_eq!(assigned(&h.effects(), S3), [(ids[0], Attempt(1))]);
    assert_eq!(h.s.pending_reason(ids[0]), None);
}

#[test]
fn an_allow_node_busy_elsewhere_means_waiting_for_a_slot_not_refusal() {
    let mut h = Harness::new();
    h.node(S1, with_exec("deny", ExecPolicy::Deny), 4);
    h.node(S2, with_exec("allow", ExecPolicy::Allow), 0);
    let ids = h.submit(vec![TaskSpec::exec(["true"])]);
    h.effects();
    assert_eq!(
        h.s.pending_reason(ids[0]).as_deref(),
        Some("waiting for a free slot")
    );
}

#[test]
fn exec_tasks_of_different_programs_do_not_block_each_other() {
    // One class per program: a head the only free node refuses must not
    // hold back the allowed program queued behind it.
    let mut h = Harness::new();
    h.node(S1, with_exec("listed", list(&["echo"])), 4);
    let mut specs: Vec<TaskSpec> = (0..3).map(|_| TaskSpec::exec(["sh"])).collect();
    specs.extend((0..3).map(|_| TaskSpec::exec(["echo"])));
    let ids = h.submit(specs);
    let got: Vec<TaskId> = assigned(&h.effects(), S1).iter().map(|(t, _)| *t).collect();
    assert_eq!(got, ids[3..]);
}

#[test]
fn an_allow_list_node_is_never_given_a_task_setting_path_or_ld_preload() {
    // The node refuses these (its PATH, the loader's variables), from env
    // or secret_env alike, so the coordinator must not assign them there.
    let mut h = Harness::new();
    h.node(S1, with_exec("listed", list(&["echo", "/bin/true"])), 8);
    let mut preload = TaskSpec::exec(["/bin/true"]);
    if let TaskKind::Exec(exec) = &mut preload.kind {
        exec.env.insert("LD_PRELOAD".into(), "/tmp/x.so".into());
    }
    let ids = h.submit(vec![
        TaskSpec::exec(["echo"]).secret_env("PATH", "/tmp/x"),
        TaskSpec::exec(["/bin/true"]).secret_env("LD_PRELOAD", "/tmp/x.so"),
        preload,
        TaskSpec::exec(["echo"]).secret_env("API_KEY", "k"),
        TaskSpec::exec(["/bin/true"]).secret_env("PATH", "/tmp/x"),
        TaskSpec::exec(["echo"]),
    ]);
    let got: Vec<TaskId> = assigned(&h.effects(), S1).iter().map(|(t, _)| *t).collect();
    assert_eq!(got, [ids[3], ids[4], ids[5]]);
    let why = h.s.pending_reason(ids[0]).expect("waits");
    assert!(why.contains("PATH") && why.contains("secret_env"), "{why}");
    let why = h.s.pending_reason(ids[1]).expect("waits");
    assert!(
        why.contains("LD_PRELOAD") && why.contains("secret_env"),
        "{why}"
    );
    let why = h.s.pending_reason(ids[2]).expect("waits");
    assert!(
        why.contains("LD_PRELOAD") && why.contains("(in env)"),
        "{why}"
    );
    // A node that runs any program takes them.
    h.node(S2, with_exec("allow", ExecPolicy::Allow), 8);
    let got: Vec<TaskId> = assigned(&h.effects(), S2).iter().map(|(t, _)| *t).collect();
    assert_eq!(got, ids[..3]);
}
