//! Figures, not checks: how fast `Submit` commits to the durable store, and
//! what a queued task costs the scheduler. Ignored by default; run with
//! `cargo test --release -p weft-coordinator --test store_throughput -- --ignored --nocapture`.

use std::time::{Duration, Instant, SystemTime};

use tonic::transport::Endpoint;

use weft_coordinator::scheduler::{Now, Scheduler, SchedulerConfig};
use weft_coordinator::{CoordinatorConfig, RunningCoordinator};
use weft_proto::pb::task_service_client::TaskServiceClient;
use weft_proto::{TaskId, TaskSpec, pb};

async fn coordinator(data_dir: Option<std::path::PathBuf>) -> RunningCoordinator {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let config = CoordinatorConfig {
        data_dir,
        // Store throughput, not tokens.
        auth: false,
        ..CoordinatorConfig::default()
    };
    weft_coordinator::start(config, listener).await.unwrap()
}

/// Submits `total` noop specs in batches of `batch` from `clients`
/// concurrent clients; returns the elapsed time.
async fn submit_all(url: String, total: usize, batch: usize, clients: usize) -> Duration {
    let channel = Endpoint::from_shared(url).unwrap().connect().await.unwrap();
    let request = pb::SubmitRequest {
        tasks: vec![pb::TaskSpec::from(TaskSpec::call("noop", "")); batch],
    };
    let started = Instant::now();
    let mut joins = Vec::new();
    for _ in 0..clients {
        let mut client = TaskServiceClient::new(channel.clone());
        let request = request.clone();
        let calls = total / batch / clients;
        joins.push(tokio::spawn(async move {
            for _ in 0..calls {
                let ids = client.submit(request.clone()).await.unwrap();
                assert_eq!(ids.into_inner().task_ids.len(), request.tasks.len());
            }
        }));
    }
    for join in joins {
        join.await.unwrap();
    }
    started.elapsed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement; run with --ignored --nocapture"]
async fn submit_throughput_on_the_durable_store() {
    for (label, total, batch, clients) in [
        ("10k in batches of 1000, one client", 10_000, 1_000, 1),
        ("10k in batches of 1000, 10 clients", 10_000, 1_000, 10),
        ("500 single-task submits, one client", 500, 1, 1),
        ("2000 single-task submits, 20 clients", 2_000, 1, 20),
    ] {
        for durable in [true, false] {
            let dir = tempfile::tempdir_in(".").unwrap();
            let c = coordinator(durable.then(|| dir.path().to_owned())).await;
            let elapsed = submit_all(c.url(), total, batch, clients).await;
            let calls = total / batch;
            let secs = elapsed.as_secs_f64();
            println!(
                "{label:<40} {:<7} {:>8.0} tasks/s {:>7.0} Submit calls/s  ({:.1} ms per call)",
                if durable { "redb" } else { "memory" },
                total as f64 / secs,
                calls as f64 / secs,
                secs * 1000.0 / calls as f64,
            );
            c.shutdown(Duration::from_secs(5)).await.unwrap();
        }
    }
}

fn rss_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .unwrap_or(0);
    pages * 4096
}

#[test]
#[ignore = "a measurement; run with --ignored --nocapture"]
fn scheduler_bytes_per_queued_task() {
    let config = SchedulerConfig::from(&CoordinatorConfig::default());
    let mut scheduler = Scheduler::new(config);
    let now = Now {
        instant: Instant::now(),
        wall: SystemTime::now(),
    };
    let mut ids = ulid::Generator::new();
    let n = 1_000_000;
    let before = rss_bytes();
    for _ in 0..n / 1000 {
        let batch = (0..1000)
            .map(|_| {
                let id = TaskId::from_ulid(ids.generate().unwrap());
                (id, TaskSpec::call("noop", "12345"))
            })
            .collect();
        scheduler.submit(batch, now).unwrap();
        drop(scheduler.take_effects(now));
    }
    let after = rss_bytes();
    println!(
        "scheduler: {} queued noop tasks, {:.0} bytes of RSS each (LiveTask alone {} bytes)",
        n,
        (after - before) as f64 / n as f64,
        weft_coordinator::scheduler::live_task_size(),
    );
}
