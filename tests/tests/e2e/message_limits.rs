//! Messages a node cannot take are never sent: a spec too large to fit in
//! an `Assign` is refused at Submit with RESOURCE_EXHAUSTED naming the
//! limit, one just under it runs, and specs whose sum is over the limit
//! are split over several `Assign`s instead of breaking the node's
//! session (and every other task on it). Sizes come from the configured
//! `--max-message-size`, so the scenarios hold for any limit.

use prost::Message;
use tonic::Code;

use weft_client::{Attempt, Error, TaskSpec, TaskState};
use weft_proto::limits::max_spec_bytes;
use weft_proto::pb;
use weft_tests::TestCluster;

/// The coordinator's `--max-message-size` in these scenarios: the smallest
/// allowed, so the payloads stay small.
const LIMIT: usize = weft_proto::limits::MIN_MAX_MESSAGE_BYTES;

/// A `sha256` call (its output is small) whose wire spec is `total` bytes,
/// as Submit measures it.
fn call_of_size(total: usize) -> TaskSpec {
    let mut n = total;
    loop {
        let spec = TaskSpec::call("sha256", vec![b'x'; n]);
        match pb::TaskSpec::from(&spec).encoded_len() {
            len if len > total => n -= len - total,
            len => {
                assert_eq!(len, total, "no input length gives exactly {total} bytes");
                return spec;
            }
        }
    }
}

/// A cluster whose message limit is [`LIMIT`], with no node yet.
async fn limited_cluster_without_nodes() -> TestCluster {
    TestCluster::builder()
        .nodes(0)
        .max_message_size(LIMIT)
        .start()
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spec_just_over_the_limit_is_too_large_and_one_just_under_runs() {
    let cluster = TestCluster::builder().max_message_size(LIMIT).start().await;
    let client = cluster.client().await;
    let largest = max_spec_bytes(LIMIT);

    let over = client.submit(call_of_size(largest + 1)).await;
    let Err(Error::TooLarge(message)) = over else {
        panic!("a spec over the limit: {over:?}");
    };
    for named in [
        (largest + 1).to_string(),
        largest.to_string(),
        "--max-message-size".to_owned(),
    ] {
        assert!(message.contains(&named), "{message} does not name {named}");
    }

    let id = client
        .submit(call_of_size(largest))
        .await
        .expect("a spec at the limit is taken");
    let done = client.wait(id).await.expect("wait");
    assert_eq!(
        (done.state, done.attempt, done.node_losses),
        (TaskState::Succeeded, Attempt(1), 0),
        "{done:?}"
    );
    assert!(
        client.list(None, 100).await.expect("list").len() == 1,
        "the refused spec was not kept"
    );
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_over_the_limit_is_resource_exhausted_naming_it() {
    let cluster = limited_cluster_without_nodes().await;
    // Each spec fits; together they do not fit in one request.
    let half = call_of_size(LIMIT * 2 / 3);
    let mut raw = cluster.raw_tasks(Some(&cluster.admin_token())).await;
    let status = raw
        .submit(pb::SubmitRequest {
            tasks: vec![pb::TaskSpec::from(&half), pb::TaskSpec::from(&half)],
        })
        .await
        .expect_err("a request over the limit");
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(status.message().contains(&LIMIT.to_string()), "{status:?}");
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn specs_whose_sum_is_over_the_limit_are_split_and_a_small_task_is_unaffected() {
    let cluster = limited_cluster_without_nodes().await;
    let client = cluster.client().await;
    // Submitted separately while no node is there, so the node's first
    // credits take all three in one dispatch.
    let big = call_of_size(max_spec_bytes(LIMIT) * 2 / 3);
    let mut ids = Vec::new();
    for spec in [big.clone(), big, TaskSpec::call("noop", "small")] {
        ids.push(client.submit(spec).await.expect("submit"));
    }
    cluster.add_node(4, Vec::<(String, String)>::new()).await;
    for id in ids {
        let done = client.wait(id).await.expect("wait");
        assert_eq!(
            (done.state, done.attempt, done.node_losses),
            (TaskState::Succeeded, Attempt(1), 0),
            "{done:?}"
        );
    }
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_assign_a_node_receives_is_larger_than_the_limit() {
    use weft_proto::pb::coordinator_message::Body as FromCoordinator;
    use weft_tests::fake_node::register;

    let cluster = limited_cluster_without_nodes().await;
    let client = cluster.client().await;
    let big = call_of_size(max_spec_bytes(LIMIT) * 2 / 3);
    let mut ids = Vec::new();
    for _ in 0..3 {
        ids.push(client.submit(big.clone()).await.expect("submit"));
    }
    let mut fake = cluster.fake_node(register("reader", 4, &["sha256"])).await;
    let _beats = fake.keep_alive(std::time::Duration::from_millis(100));
    fake.grant(4).await;
    let mut assigned = Vec::new();
    while assigned.len() < ids.len() {
        match fake.recv(weft_tests::default_timeout()).await {
            Some(FromCoordinator::Assign(assign)) => {
                let size = pb::CoordinatorMessage {
                    body: Some(FromCoordinator::Assign(assign.clone())),
                }
                .encoded_len();
                assert!(
                    size <= LIMIT,
                    "an Assign of {size} bytes; the limit is {LIMIT}"
                );
                assigned.extend(assign.tasks.into_iter().map(|t| t.task_id));
            }
            Some(_) => {}
            None => panic!(
                "the stream ended with {} of {} assigned",
                assigned.len(),
                ids.len()
            ),
        }
    }
    let mut expected: Vec<String> = ids.iter().map(ToString::to_string).collect();
    expected.sort();
    assigned.sort();
    assert_eq!(assigned, expected);
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_list_page_ends_at_the_limit_and_the_client_goes_on_from_its_token() {
    let cluster = limited_cluster_without_nodes().await;
    let client = cluster.client().await;
    let big = call_of_size(max_spec_bytes(LIMIT) * 2 / 3);
    for _ in 0..3 {
        client.submit(big.clone()).await.expect("submit");
    }
    let mut raw = cluster.raw_tasks(Some(&cluster.admin_token())).await;
    let page = raw
        .list(pb::ListRequest {
            limit: 100,
            ..Default::default()
        })
        .await
        .expect("list")
        .into_inner();
    assert_eq!(page.tasks.len(), 1, "one task of 2/3 of the limit per page");
    assert!(!page.next_page_token.is_empty());
    assert!(page.encoded_len() <= LIMIT + 1024, "{}", page.encoded_len());
    assert_eq!(client.list(None, 100).await.expect("list").len(), 3);
    cluster.shutdown().await;
}
