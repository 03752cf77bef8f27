//! The coordinator over a real loopback socket: a fake node speaks the node
//! protocol with the generated client, and a client uses the task and
//! admin APIs.

mod common;

use std::time::{Duration, Instant};

use tonic::Code;
use tonic::transport::Channel;

use common::{DEADLINE, channel, connect};
use weft_coordinator::{CoordinatorConfig, RunningCoordinator};
use weft_proto::pb::admin_service_client::AdminServiceClient;
use weft_proto::pb::coordinator_message::Body as Out;
use weft_proto::pb::node_message::Body as In;
use weft_proto::pb::task_service_client::TaskServiceClient;
use weft_proto::{TaskSpec, TaskState, pb};

/// Client tokens are off here (`--no-auth`): these tests are about the
/// node protocol and the task API's answers; tokens are tested end to end
/// in `tests/tests/e2e/tokens.rs`.
async fn coordinator(config: CoordinatorConfig) -> RunningCoordinator {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let config = CoordinatorConfig {
        auth: false,
        ..config
    };
    weft_coordinator::start(config, listener).await.unwrap()
}

fn register(name: &str, slots: u32) -> pb::Register {
    pb::Register {
        name: name.into(),
        slots,
        handlers: vec!["noop".into()],
        protocol_version: pb::ProtocolVersion::ProtocolVersion1 as i32,
        ..Default::default()
    }
}

fn event(task_id: &str, attempt: u32, body: pb::node_task_event::Body) -> pb::NodeTaskEvent {
    pb::NodeTaskEvent {
        task_id: task_id.into(),
        attempt,
        body: Some(body),
    }
}

fn finished_ok(task_id: &str, attempt: u32) -> pb::NodeTaskEvent {
    event(
        task_id,
        attempt,
        pb::node_task_event::Body::Finished(pb::Finished {
            outcome: pb::Outcome::Succeeded as i32,
            output: "done".into(),
            ..Default::default()
        }),
    )
}

async fn submit(tasks: &mut TaskServiceClient<Channel>, specs: Vec<TaskSpec>) -> Vec<String> {
    tasks
        .submit(pb::SubmitRequest {
            tasks: specs.into_iter().map(pb::TaskSpec::from).collect(),
        })
        .await
        .unwrap()
        .into_inner()
        .task_ids
}

async fn get(tasks: &mut TaskServiceClient<Channel>, id: &str) -> pb::Task {
    tasks
        .get(pb::GetRequest { task_id: id.into() })
        .await
        .unwrap()
        .into_inner()
        .task
        .unwrap()
}

/// Polls `check` until it returns Some or the deadline passes.
async fn wait_until<T, F, Fut>(mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + DEADLINE;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(Instant::now() < deadline, "condition not reached in time");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn cluster(admin: &mut AdminServiceClient<Channel>) -> pb::ClusterInfoResponse {
    admin
        .cluster_info(pb::ClusterInfoRequest {})
        .await
        .unwrap()
        .into_inner()
}

#[tokio::test]
async fn a_program_starting_a_coordinator_whose_heartbeats_cannot_keep_nodes_is_refused() {
    // What the binary refuses as flags, a program embedding the
    // coordinator is refused too, before anything is served.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let config = CoordinatorConfig {
        auth: false,
        heartbeat_interval: Duration::from_secs(2),
        heartbeat_timeout: Duration::from_secs(3),
        ..CoordinatorConfig::default()
    };
    match weft_coordinator::start(config, listener).await {
        Err(weft_coordinator::Error::Config(err)) => {
            assert!(err.to_string().contains("--heartbeat-timeout"), "{err}");
        }
        Err(err) => panic!("refused for another reason: {err}"),
        Ok(_) => panic!("a heartbeat timeout under twice the interval was served"),
    }
}

#[tokio::test]
async fn node_is_assigned_within_its_credits_and_its_result_is_recorded() {
    let c = coordinator(CoordinatorConfig::default()).await;
    let mut node = connect(c.url(), In::Register(register("n1", 2)))
        .await
        .unwrap();
    node.credits(1).await;
    let mut tasks = TaskServiceClient::new(channel(c.url()).await);
    let mut admin = AdminServiceClient::new(channel(c.url()).await);
    let ids = submit(&mut tasks, vec![TaskSpec::call("noop", "a"); 3]).await;

    let first = node.assignments().await;
    assert_eq!(first.len(), 1, "one credit, one assignment");
    assert_eq!(
        (first[0].task_id.as_str(), first[0].attempt),
        (ids[0].as_str(), 1)
    );
    let nodes = admin
        .list_nodes(pb::ListNodesRequest {})
        .await
        .unwrap()
        .into_inner()
        .nodes;
    assert_eq!((nodes[0].slots_used, nodes[0].slots_free), (1, 0));
    assert_eq!(nodes[0].node_id, node.node_id);

    node.events(vec![
        event(
            &ids[0],
            1,
            pb::node_task_event::Body::Started(pb::Started { pid: 0 }),
        ),
        finished_ok(&ids[0], 1),
    ])
    .await;
    node.credits(1).await;
    let second = node.assignments().await;
    assert_eq!(second[0].task_id, ids[1]);
    let done = get(&mut tasks, &ids[0]).await;
    assert_eq!(done.state, i32::from(TaskState::Succeeded));
    assert_eq!(
        (done.output.as_ref(), done.node_name.as_str()),
        (&b"done"[..], "n1")
    );
    assert_eq!(
        done.next_seq, 5,
        "queued, assigned, running, succeeded, finished"
    );
    let queued = get(&mut tasks, &ids[2]).await;
    assert_eq!(queued.pending_reason, "waiting for a free slot");
    c.shutdown(DEADLINE).await.unwrap();
}

#[tokio::test]
async fn registration_is_checked() {
    let c = coordinator(CoordinatorConfig::default()).await;
    let err = connect(c.url(), In::Heartbeat(pb::Heartbeat {}))
        .await
        .err()
        .unwrap();
    assert_eq!(err.code(), Code::InvalidArgument);
    let err = connect(c.url(), In::Register(register("n", 0)))
        .await
        .err()
        .unwrap();
    assert_eq!(err.code(), Code::InvalidArgument);
    let mut old = register("n", 1);
    old.protocol_version = 7;
    let err = connect(c.url(), In::Register(old)).await.err().unwrap();
    assert_eq!(err.code(), Code::FailedPrecondition);
    c.shutdown(DEADLINE).await.unwrap();
}

#[tokio::test]
async fn events_for_a_stale_attempt_are_refused_and_answered_with_cancel() {
    let c = coordinator(CoordinatorConfig::default()).await;
    let mut node = connect(c.url(), In::Register(register("n1", 1)))
        .await
        .unwrap();
    node.credits(1).await;
    let mut tasks = TaskServiceClient::new(channel(c.url()).await);
    let mut admin = AdminServiceClient::new(channel(c.url()).await);
    let id = submit(&mut tasks, vec![TaskSpec::call("noop", "")])
        .await
        .remove(0);
    node.assignments().await;
    node.events(vec![finished_ok(&id, 2)]).await;
    match node.next().await {
        Out::Cancel(cancel) => {
            assert_eq!((cancel.task_id.as_str(), cancel.attempt), (id.as_str(), 2))
        }
        other => panic!("expected Cancel, got {other:?}"),
    }
    assert_eq!(cluster(&mut admin).await.stale_events_refused, 1);
    assert_eq!(
        get(&mut tasks, &id).await.state,
        i32::from(TaskState::Assigned)
    );
    c.shutdown(DEADLINE).await.unwrap();
}

#[tokio::test]
async fn a_node_that_stops_heartbeating_is_lost_and_its_task_requeued() {
    let config = CoordinatorConfig {
        heartbeat_interval: Duration::from_millis(50),
        heartbeat_timeout: Duration::from_millis(300),
        ..CoordinatorConfig::default()
    };
    let c = coordinator(config).await;
    let mut node = connect(c.url(), In::Register(register("quiet", 1)))
        .await
        .unwrap();
    node.credits(1).await;
    let mut tasks = TaskServiceClient::new(channel(c.url()).await);
    let admin = AdminServiceClient::new(channel(c.url()).await);
    let id = submit(&mut tasks, vec![TaskSpec::call("noop", "")])
        .await
        .remove(0);
    node.assignments().await;
    // The node now says nothing; its stream stays open.
    wait_until(|| {
        let mut admin = admin.clone();
        async move { (cluster(&mut admin).await.nodes_lost == 1).then_some(()) }
    })
    .await;
    let task = get(&mut tasks, &id).await;
    assert_eq!(
        (task.state, task.attempt, task.node_losses),
        (i32::from(TaskState::Queued), 2, 1)
    );
    assert_eq!(task.pending_reason, "no nodes connected");
    // The coordinator closed its side of the stream.
    let end = tokio::time::timeout(DEADLINE, async {
        while let Ok(Some(_)) = node.rx.message().await {}
    })
    .await;
    assert!(end.is_ok(), "stream ends");
    c.shutdown(DEADLINE).await.unwrap();
}

#[tokio::test]
async fn run_streams_queued_first_then_output_then_finished() {
    let c = coordinator(CoordinatorConfig::default()).await;
    let mut node = connect(c.url(), In::Register(register("n1", 1)))
        .await
        .unwrap();
    node.credits(1).await;
    let mut tasks = TaskServiceClient::new(channel(c.url()).await);
    let mut stream = tasks
        .run(pb::RunRequest {
            spec: Some(TaskSpec::call("noop", "x").into()),
        })
        .await
        .unwrap()
        .into_inner();
    let first = stream.message().await.unwrap().unwrap();
    let Some(pb::task_event::Body::State(state)) = &first.body else {
        panic!("first event is a state change: {first:?}");
    };
    assert_eq!((first.seq, state.state), (0, i32::from(TaskState::Queued)));
    let id = first.task_id.clone();
    let assignment = node.assignments().await.remove(0);
    assert_eq!(assignment.task_id, id);
    let chunk = |seq: u64| {
        event(
            &id,
            1,
            pb::node_task_event::Body::Output(pb::OutputChunk {
                stream: pb::OutputStream::Stdout as i32,
                data: format!("line{seq}\n").into(),
                seq,
            }),
        )
    };
    node.events(vec![
        event(
            &id,
            1,
            pb::node_task_event::Body::Started(pb::Started { pid: 1 }),
        ),
        chunk(0),
        chunk(0),
        chunk(1),
        finished_ok(&id, 1),
    ])
    .await;
    let mut seen = vec![first];
    while let Some(event) = stream.message().await.unwrap() {
        seen.push(event);
    }
    let seqs: Vec<u64> = seen.iter().map(|e| e.seq).collect();
    assert_eq!(seqs, (0..seen.len() as u64).collect::<Vec<_>>());
    let output: Vec<u8> = seen
        .iter()
        .filter_map(|e| match &e.body {
            Some(pb::task_event::Body::Output(o)) => Some(o.data.to_vec()),
            _ => None,
        })
        .flatten()
        .collect();
    assert_eq!(output, b"line0\nline1\n");
    let Some(pb::task_event::Body::Finished(task)) = &seen.last().unwrap().body else {
        panic!("last event is finished");
    };
    assert_eq!(task.state, i32::from(TaskState::Succeeded));

    // A late watcher gets the whole history, from the first event.
    let mut late = tasks
        .watch(pb::WatchRequest {
            task_id: id.clone(),
            from_seq: 2,
        })
        .await
        .unwrap()
        .into_inner();
    let mut replayed = Vec::new();
    while let Some(event) = late.message().await.unwrap() {
        replayed.push(event.seq);
    }
    assert_eq!(replayed, seqs[2..]);
    c.shutdown(DEADLINE).await.unwrap();
}

#[tokio::test]
async fn bad_requests_get_the_right_codes() {
    let config = CoordinatorConfig {
        max_queued: 2,
        ..CoordinatorConfig::default()
    };
    let c = coordinator(config).await;
    let mut tasks = TaskServiceClient::new(channel(c.url()).await);
    let bad = pb::SubmitRequest {
        tasks: vec![TaskSpec::call("noop", "").into(), pb::TaskSpec::default()],
    };
    let err = tasks.submit(bad).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("task 1"), "{}", err.message());
    let listed = tasks
        .list(pb::ListRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(listed.tasks.is_empty(), "all or nothing");

    let err = tasks
        .get(pb::GetRequest {
            task_id: "nope".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    let unknown = weft_proto::TaskId::new().to_string();
    let err = tasks
        .get(pb::GetRequest {
            task_id: unknown.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    let err = tasks
        .watch(pb::WatchRequest {
            task_id: unknown,
            from_seq: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);

    let err = tasks
        .submit(pb::SubmitRequest {
            tasks: vec![TaskSpec::call("noop", "").into(); 3],
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted);

    let id = submit(&mut tasks, vec![TaskSpec::call("noop", "")])
        .await
        .remove(0);
    let cancelled = tasks
        .cancel(pb::CancelRequest {
            task_id: id.clone(),
            reason: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .task
        .unwrap();
    assert_eq!(cancelled.state, i32::from(TaskState::Cancelled));
    let err = tasks
        .cancel(pb::CancelRequest {
            task_id: id,
            reason: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    c.shutdown(DEADLINE).await.unwrap();
}

#[tokio::test]
async fn durations_past_any_clock_are_refused_and_the_coordinator_serves_on() {
    let c = coordinator(CoordinatorConfig::default()).await;
    // Connected, serving `noop` only: a call for another handler waits up
    // to its schedule timeout for a node that serves it.
    let _node = connect(c.url(), In::Register(register("n1", 1)))
        .await
        .unwrap();
    let mut tasks = TaskServiceClient::new(channel(c.url()).await);
    let huge = Some(prost_types::Duration {
        seconds: i64::MAX,
        nanos: 0,
    });
    let mut schedule_timeout = pb::TaskSpec::from(TaskSpec::call("nobody-serves-this", ""));
    schedule_timeout.schedule_timeout = huge;
    let mut timeout = pb::TaskSpec::from(TaskSpec::call("noop", ""));
    timeout.timeout = huge;
    for (spec, field) in [(schedule_timeout, "schedule_timeout"), (timeout, "timeout")] {
        let err = tasks
            .submit(pb::SubmitRequest { tasks: vec![spec] })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument);
        assert!(err.message().contains(field), "{}", err.message());
    }
    let id = submit(&mut tasks, vec![TaskSpec::call("noop", "")])
        .await
        .remove(0);
    assert_eq!(
        get(&mut tasks, &id).await.state,
        i32::from(TaskState::Queued)
    );
    c.shutdown(DEADLINE).await.unwrap();
}

/// A coordinator, a node of 4 slots that was assigned `n` calls of
/// `input`, and the ids; task `done` has finished (and its record says
/// so): what the `WaitMany` tests start from.
async fn assigned_with_one_final(
    n: usize,
    input: &'static str,
    done: usize,
) -> (
    RunningCoordinator,
    common::FakeNode,
    TaskServiceClient<Channel>,
    Vec<String>,
) {
    let c = coordinator(CoordinatorConfig::default()).await;
    let mut node = connect(c.url(), In::Register(register("n1", 4)))
        .await
        .unwrap();
    node.credits(4).await;
    let mut tasks = TaskServiceClient::new(channel(c.url()).await);
    let ids = submit(&mut tasks, vec![TaskSpec::call("noop", input); n]).await;
    assert_eq!(node.assignments().await.len(), n);
    node.events(vec![finished_ok(&ids[done], 1)]).await;
    wait_until(|| {
        let mut tasks = tasks.clone();
        let id = ids[done].clone();
        async move {
            (get(&mut tasks, &id).await.state == i32::from(TaskState::Succeeded)).then_some(())
        }
    })
    .await;
    (c, node, tasks, ids)
}

#[tokio::test]
async fn wait_many_streams_final_tasks_in_completion_order_and_ends() {
    // One final before the wait starts: it comes first.
    let (c, node, mut tasks, ids) = assigned_with_one_final(3, "a", 1).await;
    let mut request = ids.clone();
    request.push(ids[0].clone()); // a repeated id is answered once
    let mut finals = tasks
        .wait_many(pb::WaitManyRequest {
            task_ids: request,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let first = tokio::time::timeout(DEADLINE, finals.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(first.id, ids[1]);
    node.events(vec![finished_ok(&ids[2], 1)]).await;
    node.events(vec![finished_ok(&ids[0], 1)]).await;
    let mut rest = Vec::new();
    while let Some(task) = tokio::time::timeout(DEADLINE, finals.message())
        .await
        .unwrap()
        .unwrap()
    {
        assert_eq!(task.state, i32::from(TaskState::Succeeded));
        rest.push(task.id);
    }
    assert_eq!(
        rest,
        vec![ids[2].clone(), ids[0].clone()],
        "completion order, then the end"
    );

    let unknown = weft_proto::TaskId::new().to_string();
    let err = tasks
        .wait_many(pb::WaitManyRequest {
            task_ids: vec![ids[0].clone(), unknown],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    let err = tasks
        .wait_many(pb::WaitManyRequest {
            task_ids: vec!["nope".into()],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    let too_many = vec![ids[0].clone(); 100_001];
    let err = tasks
        .wait_many(pb::WaitManyRequest {
            task_ids: too_many,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    c.shutdown(DEADLINE).await.unwrap();
}

#[tokio::test]
async fn results_of_one_commit_go_to_each_waiter_in_completion_order() {
    let (c, node, tasks, ids) = assigned_with_one_final(4, "a", 3).await;
    let open = |wanted: Vec<String>| {
        let mut tasks = tasks.clone();
        async move {
            tasks
                .wait_many(pb::WaitManyRequest {
                    task_ids: wanted,
                    ..Default::default()
                })
                .await
                .unwrap()
                .into_inner()
        }
    };
    let even = open(vec![ids[0].clone(), ids[2].clone()]).await;
    let odd = open(vec![ids[1].clone()]).await;
    // Finished out of submission order, in one message (so, mostly, one
    // commit whose results go to both waiters).
    node.events(vec![
        finished_ok(&ids[2], 1),
        finished_ok(&ids[1], 1),
        finished_ok(&ids[0], 1),
    ])
    .await;
    async fn ids_to_the_end(mut stream: tonic::Streaming<pb::Task>) -> Vec<String> {
        let mut got = Vec::new();
        while let Some(task) = tokio::time::timeout(DEADLINE, stream.message())
            .await
            .unwrap()
            .unwrap()
        {
            got.push(task.id);
        }
        got
    }
    assert_eq!(
        ids_to_the_end(even).await,
        vec![ids[2].clone(), ids[0].clone()]
    );
    assert_eq!(ids_to_the_end(odd).await, vec![ids[1].clone()]);
    c.shutdown(DEADLINE).await.unwrap();
}

#[tokio::test]
async fn the_result_view_answers_final_records_without_their_spec() {
    // One final before the wait (read back from the store), one after (live).
    let (c, node, mut tasks, ids) = assigned_with_one_final(2, "a big input", 0).await;
    let request = |view: pb::TaskView| pb::WaitManyRequest {
        task_ids: ids.clone(),
        view: view.into(),
    };
    let mut results = tasks
        .wait_many(request(pb::TaskView::Result))
        .await
        .unwrap()
        .into_inner();
    let mut batches = tasks
        .wait_many_batches(request(pb::TaskView::Result))
        .await
        .unwrap()
        .into_inner();
    let mut full = tasks
        .wait_many(request(pb::TaskView::Unspecified))
        .await
        .unwrap()
        .into_inner();
    node.events(vec![finished_ok(&ids[1], 1)]).await;
    let mut answered = Vec::new();
    while let Some(task) = tokio::time::timeout(DEADLINE, results.message())
        .await
        .unwrap()
        .unwrap()
    {
        assert_eq!(task.spec, None, "the result view carries no spec");
        assert_eq!(task.state, i32::from(TaskState::Succeeded));
        assert_eq!(&task.output[..], b"done");
        assert_eq!(task.attempts.len(), 1, "its attempts, with the result");
        answered.push(task.id);
    }
    assert_eq!(answered, ids, "the stored one first, then the live one");
    let mut batched = Vec::new();
    while let Some(batch) = tokio::time::timeout(DEADLINE, batches.message())
        .await
        .unwrap()
        .unwrap()
    {
        for task in batch.tasks {
            assert_eq!(task.spec, None);
            assert_eq!(&task.output[..], b"done");
            batched.push(task.id);
        }
    }
    assert_eq!(batched, ids);
    let mut whole = 0;
    while let Some(task) = tokio::time::timeout(DEADLINE, full.message())
        .await
        .unwrap()
        .unwrap()
    {
        let spec = task.spec.expect("the default view carries the spec");
        let Some(pb::task_spec::Kind::Call(call)) = spec.kind else {
            panic!("a call spec: {spec:?}");
        };
        assert_eq!(&call.input[..], b"a big input");
        whole += 1;
    }
    assert_eq!(whole, 2);
    c.shutdown(DEADLINE).await.unwrap();
}

#[tokio::test]
async fn prefetch_credits_are_honoured_and_an_unstarted_return_costs_no_attempt() {
    let c = coordinator(CoordinatorConfig::default()).await;
    let mut reg = register("n1", 1);
    reg.prefetch = 1;
    let mut node = connect(c.url(), In::Register(reg)).await.unwrap();
    node.credits(2).await;
    let mut tasks = TaskServiceClient::new(channel(c.url()).await);
    let spec = TaskSpec::call("noop", "a").max_attempts(1);
    let ids = submit(&mut tasks, vec![spec; 3]).await;
    let assigned = node.assignments().await;
    assert_eq!(assigned.len(), 2, "one slot plus one prefetched");
    // The second was held queued and is handed back unstarted (drain).
    node.events(vec![
        event(
            &ids[0],
            1,
            pb::node_task_event::Body::Started(pb::Started { pid: 0 }),
        ),
        finished_ok(&ids[0], 1),
        event(
            &ids[1],
            1,
            pb::node_task_event::Body::Finished(pb::Finished {
                outcome: pb::Outcome::Cancelled as i32,
                error: "node is draining: returned before it started".into(),
                ..Default::default()
            }),
        ),
    ])
    .await;
    node.credits(2).await;
    let again = node.assignments().await;
    let attempts: Vec<(String, u32)> = again.into_iter().map(|a| (a.task_id, a.attempt)).collect();
    assert!(attempts.contains(&(ids[1].clone(), 2)), "{attempts:?}");
    node.events(vec![finished_ok(&ids[1], 2)]).await;
    let done = wait_until(|| {
        let mut tasks = tasks.clone();
        let id = ids[1].clone();
        async move {
            let task = get(&mut tasks, &id).await;
            (task.state != i32::from(TaskState::Queued)
                && task.state != i32::from(TaskState::Assigned))
            .then_some(task)
        }
    })
    .await;
    assert_eq!(done.state, i32::from(TaskState::Succeeded), "{done:?}");
    assert_eq!((done.node_losses, done.failures), (0, 0));
    c.shutdown(DEADLINE).await.unwrap();
}
