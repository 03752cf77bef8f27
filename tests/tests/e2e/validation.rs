//! Bad requests get the right gRPC code and a message that names the
//! problem; nothing of a refused Submit is kept.

use futures::StreamExt;
use tonic::Code;

use weft_client::{Error, TaskId, TaskSpec};
use weft_proto::convert::duration_to_pb;
use weft_proto::pb;
use weft_tests::TestCluster;

fn exec(argv: &[&str]) -> pb::TaskSpec {
    pb::TaskSpec {
        kind: Some(pb::task_spec::Kind::Exec(pb::ExecSpec {
            argv: argv.iter().map(|a| (*a).to_owned()).collect(),
            ..Default::default()
        })),
        ..Default::default()
    }
}

async fn submit(cluster: &TestCluster, tasks: Vec<pb::TaskSpec>) -> tonic::Status {
    let mut raw = cluster.raw_tasks(Some(&cluster.admin_token())).await;
    raw.submit(pb::SubmitRequest { tasks })
        .await
        .expect_err("the spec is refused")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_specs_are_invalid_argument_with_a_clear_message() {
    let cluster = TestCluster::builder().nodes(0).start().await;

    let status = submit(&cluster, vec![exec(&[])]).await;
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(status.message().contains("argv"), "{status:?}");

    let status = submit(&cluster, vec![pb::TaskSpec::default()]).await;
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(status.message().contains("kind"), "{status:?}");

    let mut zero = exec(&["true"]);
    zero.timeout = Some(duration_to_pb(std::time::Duration::ZERO));
    let status = submit(&cluster, vec![zero]).await;
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(status.message().contains("timeout"), "{status:?}");

    let blank = pb::TaskSpec::from(TaskSpec::call("", "x"));
    let status = submit(&cluster, vec![blank]).await;
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(status.message().contains("handler"), "{status:?}");

    // All or nothing: one bad spec and the good one beside it is not kept.
    let status = submit(&cluster, vec![exec(&["true"]), exec(&[])]).await;
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    let client = cluster.client().await;
    assert!(
        client.list(None, 100).await.expect("list").is_empty(),
        "nothing was committed"
    );

    // The typed client classifies it too.
    let err = client
        .submit(TaskSpec::exec(Vec::<String>::new()))
        .await
        .expect_err("empty argv");
    assert!(matches!(err, Error::InvalidArgument(_)), "{err:?}");
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_id_is_invalid_argument_and_an_unknown_one_not_found() {
    let cluster = TestCluster::builder().nodes(0).start().await;
    let mut raw = cluster.raw_tasks(Some(&cluster.admin_token())).await;
    let status = raw
        .get(pb::GetRequest {
            task_id: "not-an-id".to_owned(),
        })
        .await
        .expect_err("bad id");
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(status.message().contains("task id"), "{status:?}");

    let status = raw
        .get(pb::GetRequest {
            task_id: TaskId::new().to_string(),
        })
        .await
        .expect_err("unknown id");
    assert_eq!(status.code(), Code::NotFound, "{status:?}");

    let client = cluster.client().await;
    let err = client.get(TaskId::new()).await.expect_err("unknown id");
    assert!(matches!(err, Error::NotFound(_)), "{err:?}");
    let err = client.cancel(TaskId::new()).await.expect_err("unknown id");
    assert!(matches!(err, Error::NotFound(_)), "{err:?}");
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn submit_on_full_queue_is_resource_exhausted() {
    let cluster = TestCluster::builder().nodes(0).max_queued(3).start().await;
    let client = cluster.client().await;
    let noop = || TaskSpec::call("noop", "x");
    client
        .submit_many(vec![noop(), noop()])
        .await
        .expect("2 of 3 fit");
    // All or nothing: a batch of 2 does not fit in the 1 place left.
    let err = client
        .submit_many(vec![noop(), noop()])
        .await
        .expect_err("over the cap");
    assert!(matches!(err, Error::ResourceExhausted(_)), "{err:?}");
    assert!(err.is_retryable());
    assert_eq!(client.list(None, 100).await.expect("list").len(), 2);
    client.submit(noop()).await.expect("the last place");
    let err = client.submit(noop()).await.expect_err("full");
    assert!(matches!(err, Error::ResourceExhausted(_)), "{err:?}");
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watching_an_unknown_task_is_not_found() {
    let cluster = TestCluster::builder().nodes(0).start().await;
    let client = cluster.client().await;
    let outcome = match client.watch(TaskId::new(), 0).await {
        Err(err) => err,
        Ok(mut events) => match events.next().await {
            Some(Err(err)) => err,
            other => panic!("expected NotFound, got {other:?}"),
        },
    };
    assert!(matches!(outcome, Error::NotFound(_)), "{outcome:?}");
    cluster.shutdown().await;
}
