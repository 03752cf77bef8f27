//! Client behaviour against a scripted in-process `TaskService`: resuming a
//! broken watch from the last seq + 1, and batching submits. The real
//! cluster is exercised by the `weft-tests` crate.

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::Stream;
use tokio::net::TcpListener;
use tonic::{Request, Response, Status};

use weft_proto::pb;
use weft_proto::pb::task_service_server::{TaskService, TaskServiceServer};

use crate::{CONNECT_TIMEOUT, Client, Error, TaskId, TaskSpec, TaskState};

type EventResult = Result<pb::TaskEvent, Status>;
type Events = Pin<Box<dyn Stream<Item = EventResult> + Send>>;

/// A coordinator that answers Watch from a script: the first watch breaks
/// after two events, later ones finish the task (or, [`Script`], other
/// turns). Records every from_seq.
#[derive(Clone, Default)]
struct Scripted {
    id: String,
    script: Script,
    watches: Arc<Mutex<Vec<u64>>>,
    submits: Arc<Mutex<Vec<usize>>>,
    /// Every spec submitted, as the server decoded it.
    specs: Arc<Mutex<Vec<pb::TaskSpec>>>,
    wait_many: Arc<Mutex<Vec<usize>>>,
}

/// How a [`Scripted`] coordinator answers watches.
#[derive(Clone, Copy, Default)]
enum Script {
    /// The first breaks after two events; later ones finish the task.
    #[default]
    BreakFirst,
    /// The first breaks after two events; later ones are refused
    /// UNAVAILABLE (it stopped serving, as a coordinator that lost its
    /// place to a standby).
    BreakThenStop,
    /// Every one finishes the task.
    Finish,
    /// The task ended with its event seq 2 (`next_seq` 3): every watch
    /// ends with no event, as for a from_seq past its end.
    EndedAtSeq2,
    /// The first breaks after two events; the second sends nothing for
    /// [`QUIET`] (a quiet task) and breaks; later ones finish the task.
    BreakThenQuietThenBreak,
    /// Every one is taken and breaks at once, with no event.
    BreakAtOnce,
    /// Every one is taken, sends nothing for [`SHORT_LIVED`] and breaks
    /// (as behind a proxy that cuts every stream after a second or so).
    BreakAfterAWhile,
    /// Every one sends an event of seq `u64::MAX` (a coordinator's bug).
    SeqAtMax,
}

/// How long [`Script::BreakThenQuietThenBreak`]'s second watch stays open.
const QUIET: Duration = Duration::from_millis(1500);

/// How long each of [`Script::BreakAfterAWhile`]'s watches stays open.
const SHORT_LIVED: Duration = Duration::from_millis(1200);

fn state_event(id: &str, seq: u64, state: TaskState) -> pb::TaskEvent {
    pb::TaskEvent {
        task_id: id.to_owned(),
        seq,
        attempt: 1,
        time: None,
        body: Some(pb::task_event::Body::State(pb::StateChanged {
            state: state.into(),
            ..Default::default()
        })),
    }
}

fn finished_event(id: &str, seq: u64) -> pb::TaskEvent {
    pb::TaskEvent {
        task_id: id.to_owned(),
        seq,
        attempt: 1,
        time: None,
        body: Some(pb::task_event::Body::Finished(pb::Task {
            id: id.to_owned(),
            state: TaskState::Succeeded.into(),
            attempt: 1,
            output: "done".into(),
            ..Default::default()
        })),
    }
}

#[tonic::async_trait]
impl TaskService for Scripted {
    async fn submit(
        &self,
        request: Request<pb::SubmitRequest>,
    ) -> Result<Response<pb::SubmitResponse>, Status> {
        let tasks = request.into_inner().tasks;
        let n = tasks.len();
        self.submits.lock().unwrap().push(n);
        self.specs.lock().unwrap().extend(tasks);
        let task_ids: Vec<String> = (0..n).map(|_| TaskId::new().to_string()).collect();
        Ok(Response::new(pb::SubmitResponse {
            job_id: task_ids.first().cloned().unwrap_or_default(),
            task_ids,
        }))
    }

    async fn get(
        &self,
        _request: Request<pb::GetRequest>,
    ) -> Result<Response<pb::GetResponse>, Status> {
        match self.script {
            Script::EndedAtSeq2 => Ok(Response::new(pb::GetResponse {
                task: Some(pb::Task {
                    id: self.id.clone(),
                    state: TaskState::Succeeded.into(),
                    attempt: 1,
                    next_seq: 3,
                    ..Default::default()
                }),
            })),
            Script::BreakFirst
            | Script::BreakThenStop
            | Script::Finish
            | Script::BreakThenQuietThenBreak
            | Script::BreakAtOnce
            | Script::BreakAfterAWhile
            | Script::SeqAtMax => Err(Status::not_found("no such task")),
        }
    }

    async fn list(
        &self,
        _request: Request<pb::ListRequest>,
    ) -> Result<Response<pb::ListResponse>, Status> {
        Ok(Response::new(pb::ListResponse::default()))
    }

    type WatchStream = Events;

    async fn watch(
        &self,
        request: Request<pb::WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let from_seq = request.into_inner().from_seq;
        let (first, nth) = {
            let mut watches = self.watches.lock().unwrap();
            watches.push(from_seq);
            (watches.len() == 1, watches.len())
        };
        let id = self.id.clone();
        let first = match self.script {
            Script::BreakThenQuietThenBreak if nth == 2 => {
                let quiet = futures::stream::once(async {
                    tokio::time::sleep(QUIET).await;
                    Err(Status::unavailable("coordinator restarting"))
                });
                return Ok(Response::new(Box::pin(quiet)));
            }
            Script::BreakThenQuietThenBreak => first,
            Script::BreakAtOnce => {
                let broken = futures::stream::iter([Err(Status::unavailable("restarting"))]);
                return Ok(Response::new(Box::pin(broken)));
            }
            Script::BreakAfterAWhile => {
                let broken = futures::stream::once(async {
                    tokio::time::sleep(SHORT_LIVED).await;
                    Err(Status::unavailable("stream timeout"))
                });
                return Ok(Response::new(Box::pin(broken)));
            }
            Script::SeqAtMax => {
                let events = [Ok(state_event(&id, u64::MAX, TaskState::Running))];
                return Ok(Response::new(Box::pin(futures::stream::iter(events))));
            }
            Script::BreakFirst => first,
            Script::BreakThenStop if first => true,
            Script::BreakThenStop => return Err(Status::unavailable("not serving")),
            Script::Finish => false,
            Script::EndedAtSeq2 => {
                return Ok(Response::new(Box::pin(futures::stream::empty())));
            }
        };
        let events: Vec<EventResult> = if first {
            vec![
                Ok(state_event(&id, 0, TaskState::Queued)),
                Ok(state_event(&id, 1, TaskState::Running)),
                Err(Status::unavailable("coordinator restarting")),
            ]
        } else {
            // Replays one already-seen event, as a coordinator may.
            vec![
                Ok(state_event(
                    &id,
                    from_seq.saturating_sub(1),
                    TaskState::Running,
                )),
                Ok(finished_event(&id, from_seq)),
            ]
        };
        Ok(Response::new(Box::pin(futures::stream::iter(events))))
    }

    async fn cancel(
        &self,
        _request: Request<pb::CancelRequest>,
    ) -> Result<Response<pb::CancelResponse>, Status> {
        Err(Status::failed_precondition("already finished"))
    }

    async fn cancel_job(
        &self,
        _request: Request<pb::CancelJobRequest>,
    ) -> Result<Response<pb::CancelJobResponse>, Status> {
        Err(Status::not_found("no such job"))
    }

    type WaitManyStream = Pin<Box<dyn Stream<Item = Result<pb::Task, Status>> + Send>>;

    /// Answers every id as succeeded, last id first (completion order is
    /// the coordinator's to choose).
    async fn wait_many(
        &self,
        request: Request<pb::WaitManyRequest>,
    ) -> Result<Response<Self::WaitManyStream>, Status> {
        let ids = request.into_inner().task_ids;
        self.wait_many.lock().unwrap().push(ids.len());
        let tasks: Vec<Result<pb::Task, Status>> = ids
            .into_iter()
            .rev()
            .map(|id| {
                Ok(pb::Task {
                    output: id.clone().into(),
                    id,
                    state: TaskState::Succeeded.into(),
                    attempt: 1,
                    ..Default::default()
                })
            })
            .collect();
        Ok(Response::new(Box::pin(futures::stream::iter(tasks))))
    }

    type WaitManyBatchesStream = Pin<Box<dyn Stream<Item = Result<pb::TaskBatch, Status>> + Send>>;

    async fn wait_many_batches(
        &self,
        _: Request<pb::WaitManyRequest>,
    ) -> Result<Response<Self::WaitManyBatchesStream>, Status> {
        Err(Status::unimplemented("the Rust client waits with WaitMany"))
    }

    type RunStream = Events;

    async fn run(
        &self,
        _request: Request<pb::RunRequest>,
    ) -> Result<Response<Self::RunStream>, Status> {
        Err(Status::unimplemented("not scripted"))
    }
}

async fn serve(service: Scripted) -> Client {
    let url = serve_at(service).await;
    Client::connect(&url).await.unwrap()
}

/// Serves `service` on a free loopback port; answers its `http://` URL.
async fn serve_at(service: Scripted) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(TaskServiceServer::new(service))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    format!("http://{addr}")
}

/// A loopback URL where nothing listens (connections are refused).
async fn refused_url() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    format!("http://{addr}")
}

#[tokio::test]
async fn several_addresses_connect_to_the_first_that_answers_in_order() {
    let (dead, live) = (refused_url().await, serve_at(Scripted::default()).await);
    let started = std::time::Instant::now();
    let client = Client::connect_any(&[&dead, &live], None, None)
        .await
        .unwrap();
    assert_eq!(client.url(), live);
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "a refusal moves on at once"
    );
    // The same, as one comma-separated address.
    let client = Client::connect(&format!("{dead},{live}")).await.unwrap();
    assert_eq!(client.url(), live);

    let other = refused_url().await;
    let err = Client::connect_any(&[&dead, &other], None, None)
        .await
        .unwrap_err();
    assert!(err.is_unavailable(), "{err:?}");
    let message = err.to_string();
    assert!(
        message.contains(&dead) && message.contains(&other),
        "says why for each: {message}"
    );
    let err = Client::connect(&format!("{live},garbage"))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::InvalidAddress(_)), "{err:?}");
    let none: [&str; 0] = [];
    let err = Client::connect_any(&none, None, None).await.unwrap_err();
    assert!(matches!(err, Error::InvalidAddress(_)), "{err:?}");
}

#[tokio::test]
async fn follow_moves_to_the_next_coordinator_and_resumes_after_the_last_event() {
    use futures::StreamExt;
    let id = TaskId::new();
    let first = Scripted {
        id: id.to_string(),
        script: Script::BreakThenStop,
        ..Default::default()
    };
    let second = Scripted {
        id: id.to_string(),
        script: Script::Finish,
        ..Default::default()
    };
    let (a, b) = (
        serve_at(first.clone()).await,
        serve_at(second.clone()).await,
    );
    let client = Client::connect(&format!("{a},{b}")).await.unwrap();
    assert_eq!(client.url(), a);
    let events = client.follow(id, 0, Duration::from_secs(10));
    let seqs: Vec<u64> = tokio::time::timeout(Duration::from_secs(10), events.collect::<Vec<_>>())
        .await
        .expect("followed to the end")
        .into_iter()
        .map(|event| event.expect("no error").seq)
        .collect();
    assert_eq!(seqs, [0, 1, 2], "each event once, none missing");
    assert_eq!(*first.watches.lock().unwrap(), vec![0]);
    assert_eq!(*second.watches.lock().unwrap(), vec![2]);
    // Unary calls stay where the client connected.
    assert_eq!(client.url(), a);
}

#[tokio::test]
async fn follow_from_past_the_end_of_a_finished_task_says_so_at_once() {
    use futures::StreamExt;
    let id = TaskId::new();
    let service = Scripted {
        id: id.to_string(),
        script: Script::EndedAtSeq2,
        ..Default::default()
    };
    let client = serve(service.clone()).await;
    for from_seq in [3, 9] {
        let events = client.follow(id, from_seq, Duration::from_secs(30));
        let items = tokio::time::timeout(Duration::from_secs(5), events.collect::<Vec<_>>())
            .await
            .expect("ends at once, not after the resume window");
        let [Err(err)] = &items[..] else {
            panic!("one error: {items:?}");
        };
        assert!(matches!(err, Error::InvalidArgument(_)), "{err:?}");
        assert!(!err.is_retryable());
        let message = err.to_string();
        assert!(
            message.contains("ended at seq 2") && message.contains(&format!("from seq {from_seq}")),
            "{message}"
        );
    }
}

#[tokio::test]
async fn follow_resumes_a_second_break_after_a_watch_that_stayed_open_longer_than_the_window() {
    use futures::StreamExt;
    let id = TaskId::new();
    let service = Scripted {
        id: id.to_string(),
        script: Script::BreakThenQuietThenBreak,
        ..Default::default()
    };
    let client = serve(service.clone()).await;
    // The window is shorter than the quiet watch: the second break comes
    // long after the first, and must not count as the same run of tries.
    let window = Duration::from_millis(500);
    assert!(QUIET > window);
    let events = client.follow(id, 0, window);
    let seqs: Vec<u64> = tokio::time::timeout(Duration::from_secs(10), events.collect::<Vec<_>>())
        .await
        .expect("followed to the end")
        .into_iter()
        .map(|event| event.expect("no error").seq)
        .collect();
    assert_eq!(seqs, [0, 1, 2]);
    assert_eq!(*service.watches.lock().unwrap(), vec![0, 2, 2]);
}

#[tokio::test]
async fn follow_of_a_coordinator_that_breaks_every_watch_at_once_gives_up_after_the_window() {
    use futures::StreamExt;
    let id = TaskId::new();
    let service = Scripted {
        id: id.to_string(),
        script: Script::BreakAtOnce,
        ..Default::default()
    };
    let client = serve(service.clone()).await;
    let started = std::time::Instant::now();
    let events = client.follow(id, 0, Duration::from_millis(500));
    let items = tokio::time::timeout(Duration::from_secs(10), events.collect::<Vec<_>>())
        .await
        .expect("gives up");
    let [Err(err)] = &items[..] else {
        panic!("one error: {items:?}");
    };
    assert!(err.is_unavailable(), "{err:?}");
    assert!(err.to_string().contains("could not resume"), "{err}");
    assert!(started.elapsed() < Duration::from_secs(3));
    assert!(service.watches.lock().unwrap().len() > 1, "it did retry");
}

#[tokio::test]
async fn follow_of_watches_that_each_break_with_no_event_before_the_window_gives_up_after_it() {
    use futures::StreamExt;
    let id = TaskId::new();
    let service = Scripted {
        id: id.to_string(),
        script: Script::BreakAfterAWhile,
        ..Default::default()
    };
    let client = serve(service.clone()).await;
    // Each watch stays open past a second but less than the window: no
    // break may start a new run of tries.
    let window = Duration::from_secs(2);
    assert!(SHORT_LIVED < window);
    let started = std::time::Instant::now();
    let events = client.follow(id, 0, window);
    let items = tokio::time::timeout(Duration::from_secs(15), events.collect::<Vec<_>>())
        .await
        .expect("gives up");
    let [Err(err)] = &items[..] else {
        panic!("one error: {items:?}");
    };
    assert!(err.is_unavailable(), "{err:?}");
    assert!(err.to_string().contains("could not resume"), "{err}");
    // The first break starts the run; it ends at the first break past
    // the window, about two watches later.
    assert!(
        started.elapsed() < window + SHORT_LIVED * 3,
        "{:?}",
        started.elapsed()
    );
    assert!(service.watches.lock().unwrap().len() > 1, "it did retry");
}

#[tokio::test]
async fn follow_ends_with_a_protocol_error_on_an_event_of_the_last_seq() {
    use futures::StreamExt;
    let id = TaskId::new();
    let service = Scripted {
        id: id.to_string(),
        script: Script::SeqAtMax,
        ..Default::default()
    };
    let client = serve(service.clone()).await;
    let events = client.follow(id, 0, Duration::from_secs(10));
    let items = tokio::time::timeout(Duration::from_secs(5), events.collect::<Vec<_>>())
        .await
        .expect("ends at once");
    let [Err(err)] = &items[..] else {
        panic!("one error: {items:?}");
    };
    assert!(matches!(err, Error::Protocol(_)), "{err:?}");
    assert!(!err.is_retryable());
    assert_eq!(*service.watches.lock().unwrap(), vec![0], "no replay");
}

#[tokio::test]
async fn wait_resumes_a_broken_watch_from_the_next_seq() {
    let id = TaskId::new();
    let service = Scripted {
        id: id.to_string(),
        ..Default::default()
    };
    let client = serve(service.clone()).await;
    let task = tokio::time::timeout(Duration::from_secs(10), client.wait(id))
        .await
        .expect("wait finished")
        .unwrap();
    assert_eq!(
        (task.state, &task.output[..]),
        (TaskState::Succeeded, &b"done"[..])
    );
    assert_eq!(*service.watches.lock().unwrap(), vec![0, 2]);
}

#[tokio::test]
async fn submit_many_sends_batches_of_at_most_the_batch_size() {
    let service = Scripted::default();
    let client = serve(service.clone()).await;
    let specs = vec![TaskSpec::call("noop", ""); crate::SUBMIT_BATCH + 3];
    let ids = client.submit_many(specs).await.unwrap();
    assert_eq!(ids.len(), crate::SUBMIT_BATCH + 3);
    assert_eq!(
        *service.submits.lock().unwrap(),
        vec![crate::SUBMIT_BATCH, 3]
    );
}

#[tokio::test]
async fn every_field_of_a_submitted_spec_reaches_the_server_as_the_generated_encoder_sends_it() {
    use weft_proto::policy::{DependencyRule, OverLimit};
    let service = Scripted::default();
    let client = serve(service.clone()).await;
    let every = TaskSpec::call("resize", "input")
        .slots(2)
        .label("zone", "eu")
        .timeout(Duration::from_secs(3))
        .max_attempts(4)
        .name("named")
        .secret_env("API_KEY", "s3cr3t")
        .priority(8)
        .fair_key("team-a", 3)
        .concurrency("user-1", 2, OverLimit::CancelNewest)
        .rate_limit("api", 2)
        .resource("cpu", 4)
        .after(TaskId::new())
        .after_rule(DependencyRule::AnyFailed)
        .ref_name("a");
    let exec = TaskSpec::exec(["sh", "-c", "true"])
        .env("X", "1")
        .stdin("in");
    let specs = vec![every, exec, TaskSpec::call("noop", "")];
    client.submit(specs[0].clone()).await.unwrap();
    client.submit_many(specs.clone()).await.unwrap();
    client.submit_graph(specs.clone()).await.unwrap();
    let expected: Vec<pb::TaskSpec> = std::iter::once(&specs[0])
        .chain(&specs)
        .chain(&specs)
        .map(pb::TaskSpec::from)
        .collect();
    assert_eq!(*service.specs.lock().unwrap(), expected);
    assert_eq!(*service.submits.lock().unwrap(), vec![1, 3, 3]);
}

#[tokio::test]
async fn submit_many_keeps_each_request_within_the_smallest_message_limit() {
    let service = Scripted::default();
    let client = serve(service.clone()).await;
    // Three fit in 1 MiB, four do not.
    let quarter = weft_proto::limits::MIN_MAX_MESSAGE_BYTES * 3 / 10;
    let specs = vec![TaskSpec::call("noop", vec![0u8; quarter]); 7];
    let ids = client.submit_many(specs).await.unwrap();
    assert_eq!(ids.len(), 7);
    assert_eq!(*service.submits.lock().unwrap(), vec![3, 3, 1]);
}

#[tokio::test]
async fn wait_many_splits_ids_into_calls_of_the_batch_size_and_yields_every_task() {
    use futures::TryStreamExt;
    let service = Scripted::default();
    let client = serve(service.clone()).await;
    let ids: Vec<TaskId> = (0..crate::WAIT_MANY_BATCH + 2)
        .map(|_| TaskId::new())
        .collect();
    let tasks: Vec<_> = client.wait_many(ids.clone()).try_collect().await.unwrap();
    assert_eq!(
        *service.wait_many.lock().unwrap(),
        vec![crate::WAIT_MANY_BATCH, 2]
    );
    assert_eq!(tasks.len(), ids.len());
    assert_eq!(
        tasks[0].id,
        ids[crate::WAIT_MANY_BATCH - 1],
        "server order kept"
    );
    let mut got: Vec<TaskId> = tasks.iter().map(|t| t.id).collect();
    let mut want = ids;
    got.sort();
    want.sort();
    assert_eq!(got, want);
    assert!(tasks.iter().all(|t| t.state == TaskState::Succeeded));
    let none: Vec<_> = client.wait_many(Vec::new()).try_collect().await.unwrap();
    assert!(none.is_empty());
}

#[tokio::test]
async fn not_found_is_classified_and_not_retryable() {
    let client = serve(Scripted::default()).await;
    // The scripted Get answers NOT_FOUND; Watch of an unknown id would too.
    let err = client.get(TaskId::new()).await.unwrap_err();
    assert!(matches!(err, Error::NotFound(_)), "{err:?}");
    assert!(!err.is_retryable());
}

#[tokio::test]
async fn an_unreachable_coordinator_fails_fast_with_unavailable() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    let started = std::time::Instant::now();
    let err = Client::connect(&format!("http://{addr}"))
        .await
        .unwrap_err();
    assert!(err.is_unavailable(), "{err:?}");
    assert!(
        err.to_string().contains("cannot reach coordinator"),
        "{err}"
    );
    assert!(started.elapsed() < Duration::from_secs(5));
}

/// An admin service that takes every call and never answers it.
#[derive(Clone)]
struct Hang;

impl tonic::server::NamedService for Hang {
    const NAME: &'static str = "weft.v1.AdminService";
}

impl<B> tonic::codegen::Service<tonic::codegen::http::Request<B>> for Hang {
    type Response = tonic::codegen::http::Response<tonic::body::Body>;
    type Error = std::convert::Infallible;
    type Future = futures::future::Pending<Result<Self::Response, Self::Error>>;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: tonic::codegen::http::Request<B>) -> Self::Future {
        futures::future::pending()
    }
}

#[tokio::test]
async fn a_plaintext_peer_that_never_answers_fails_the_connect_with_the_tls_hint() {
    // Speaks HTTP/2 but answers no call: the connection opens, and only
    // the probe can tell it is of no use.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(Hang)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    let started = std::time::Instant::now();
    let err = Client::connect(&format!("http://{addr}"))
        .await
        .unwrap_err();
    assert!(err.is_unavailable(), "{err:?}");
    let message = err.to_string();
    assert!(message.contains("no answer within"), "{message}");
    assert!(
        message.contains(&format!("dial https://{addr}")),
        "{message}"
    );
    assert!(started.elapsed() < CONNECT_TIMEOUT * 2 + Duration::from_secs(2));
}

#[tokio::test]
async fn a_bare_host_and_port_connects_and_garbage_is_an_invalid_address() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(TaskServiceServer::new(Scripted::default()))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    // No scheme means https: without a CA that is a clear error, and an
    // explicit http:// reaches this plaintext server.
    let err = Client::connect(&addr.to_string()).await.unwrap_err();
    assert!(matches!(err, Error::Tls(_)), "{err:?}");
    assert!(
        err.to_string()
            .contains(&format!("https://{addr} serves TLS")),
        "{err}"
    );
    let client = Client::connect(&format!("http://{addr}")).await.unwrap();
    assert_eq!(client.url(), format!("http://{addr}"));

    let err = Client::connect("not an address").await.unwrap_err();
    assert!(matches!(err, Error::InvalidAddress(_)), "{err:?}");
    assert!(!err.is_retryable());
    assert_eq!(
        err.to_string(),
        "invalid coordinator address 'not an address': expected HOST:PORT or http(s)://HOST:PORT"
    );
}

#[tokio::test]
async fn the_plaintext_probe_carries_no_token_and_later_calls_and_submits_do() {
    let seen: Arc<Mutex<Vec<Option<String>>>> = Arc::default();
    let record = Arc::clone(&seen);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(
        tonic::transport::Server::builder()
            .layer(tonic::service::InterceptorLayer::new(
                move |request: Request<()>| {
                    let auth = request
                        .metadata()
                        .get("authorization")
                        .and_then(|v| v.to_str().ok())
                        .map(str::to_owned);
                    record.lock().unwrap().push(auth);
                    Ok(request)
                },
            ))
            .add_service(TaskServiceServer::new(Scripted::default()))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    let client = Client::connect_secure(&format!("http://{addr}"), None, Some("weft_id_secret"))
        .await
        .unwrap();
    // The probe (the one call made while connecting) had no token.
    assert_eq!(*seen.lock().unwrap(), vec![None]);
    let _ = client.get(TaskId::new()).await;
    client.submit(TaskSpec::call("noop", "")).await.unwrap();
    let bearer = Some("Bearer weft_id_secret".to_owned());
    assert_eq!(*seen.lock().unwrap(), vec![None, bearer.clone(), bearer]);
}

#[tokio::test]
async fn http_with_a_ca_or_pin_is_refused() {
    let pin = crate::Trust::pin(&weft_proto::tls::ca_pin(b"abc")).unwrap();
    let err = Client::connect_secure("http://127.0.0.1:9", Some(&pin), Some("weft_id_secret"))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Tls(_)), "{err}");
    assert!(err.to_string().contains("https://127.0.0.1:9"), "{err}");
}
