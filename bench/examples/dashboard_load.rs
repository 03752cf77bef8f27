//! How fast the dashboard's pages load with a million tasks in the store
//! (the issue's target: under 200 ms).
//!
//! Fills a durable store with `--tasks` task records (default 1,000,000,
//! mixed states: mostly succeeded, some failed, cancelled, timed out and
//! queued) through the `Store` trait in large batches, starts a
//! coordinator on it (TLS, tokens, the HTTP listener) with one node and a
//! running task, then times each page's requests as a browser makes them
//! (the page's API calls one after the other, on one kept-alive TLS
//! connection, as a browser's) and prints median and p99 per page.
//!
//! ```text
//! cargo run -p weft-bench --example dashboard_load -- [--tasks N] [--runs R] [--data-dir DIR]
//! ```
//!
//! With `--data-dir`, a store filled by an earlier run (with as many
//! tasks) is used again instead of being filled anew.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use anyhow::Context;

use weft_client::Client;
use weft_cluster::LocalCluster;
use weft_coordinator::CoordinatorConfig;
use weft_coordinator::store::{
    AttemptRecord, EventBody, Record, RedbStore, Store, TaskEvent, TaskRecord,
};
use weft_coordinator::tls::TlsConfig;
use weft_proto::{Attempt, NodeId, Outcome, TaskId, TaskSpec, TaskState};
use weft_tests::http::HttpClient;

/// Records per commit while filling.
const BATCH: usize = 20_000;
/// Marks a data dir this bench filled, with how many tasks.
const FILLED: &str = "dashboard-bench.filled";

struct Args {
    tasks: usize,
    runs: usize,
    data_dir: Option<PathBuf>,
}

fn args() -> anyhow::Result<Args> {
    let mut args = Args {
        tasks: 1_000_000,
        runs: 30,
        data_dir: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().with_context(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--tasks" => args.tasks = value()?.parse()?,
            "--runs" => args.runs = value()?.parse::<usize>()?.max(1),
            "--data-dir" => args.data_dir = Some(value()?.into()),
            "-h" | "--help" => {
                println!(
                    "dashboard_load [--tasks N (1000000)] [--runs R (30)] [--data-dir DIR (a temp dir)]"
                );
                std::process::exit(0);
            }
            other => anyhow::bail!("unknown flag {other} (see --help)"),
        }
    }
    Ok(args)
}

/// The state of the `i`-th task: 1 % queued, 2 % failed, 1 % cancelled,
/// 0.5 % timed out, the rest succeeded.
fn state_of(i: usize) -> TaskState {
    match i % 200 {
        0 | 1 => TaskState::Queued,
        2..=5 => TaskState::Failed,
        6 | 7 => TaskState::Cancelled,
        8 => TaskState::TimedOut,
        _ => TaskState::Succeeded,
    }
}

/// Writes `n` task records (ids in submit order over the last 30 minutes,
/// so retention keeps them), and for the newest 1,000 their events.
fn fill(dir: &Path, n: usize) -> anyhow::Result<()> {
    let store = RedbStore::open(dir)?;
    let now = SystemTime::now();
    let start = now - Duration::from_secs(30 * 60);
    let step = Duration::from_secs(30 * 60).as_nanos() / n.max(1) as u128;
    let spec = Arc::new(
        TaskSpec::exec(["sh", "-c", "echo hello; sleep 1"])
            .name("bench")
            .label("team", "web"),
    );
    let began = Instant::now();
    let mut batch = Vec::with_capacity(BATCH + 8);
    let bench_node = NodeId::new();
    for i in 0..n {
        let created = start + Duration::from_nanos((step * i as u128) as u64);
        let ms = created
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default()
            .as_millis();
        let id = TaskId::from_u128((ms << 80) | i as u128);
        let state = state_of(i);
        let finished = state.is_final();
        let with_events = finished && i + 1000 >= n;
        let record = TaskRecord {
            id,
            spec: Arc::clone(&spec),
            state,
            attempt: Attempt(u32::from(finished)),
            node_id: None,
            node_name: finished.then(|| Arc::from("bench-node")),
            exit_code: finished.then_some(i32::from(state != TaskState::Succeeded)),
            output: bytes::Bytes::new(),
            error: if state == TaskState::Succeeded || !finished {
                String::new()
            } else {
                "bench".to_owned()
            },
            pending_reason: String::new(),
            waiting_for: Vec::new(),
            job_id: None,
            failures: u32::from(state == TaskState::Failed),
            node_losses: 0,
            created_at: created,
            updated_at: created,
            next_seq: if with_events { 3 } else { 0 },
            last_outcome: finished.then_some(match state {
                TaskState::Succeeded => Outcome::Succeeded,
                TaskState::Cancelled => Outcome::Cancelled,
                TaskState::TimedOut => Outcome::TimedOut,
                _ => Outcome::Failed,
            }),
            lost_nodes: Vec::new(),
            cancel_requested: None,
            // A finished task carries its one attempt, as a real one does.
            attempts: if finished {
                vec![AttemptRecord {
                    number: Attempt(1),
                    node_id: bench_node,
                    node_name: Arc::from("bench-node"),
                    assigned_at: created,
                    started_at: Some(created),
                    ended_at: Some(created),
                    outcome: Some(match state {
                        TaskState::Succeeded => Outcome::Succeeded,
                        TaskState::Cancelled => Outcome::Cancelled,
                        TaskState::TimedOut => Outcome::TimedOut,
                        _ => Outcome::Failed,
                    }),
                    exit_code: Some(i32::from(state != TaskState::Succeeded)),
                    reason: String::new(),
                }]
            } else {
                Vec::new()
            },
        };
        if with_events {
            let event = |seq, body| {
                Record::Event(TaskEvent {
                    task_id: id,
                    seq,
                    attempt: Attempt(1),
                    time: created,
                    body,
                })
            };
            batch.push(Record::Task(record.clone()));
            batch.push(event(
                0,
                EventBody::State {
                    state: TaskState::Running,
                    node_id: None,
                    node_name: Some(Arc::from("bench-node")),
                    reason: String::new(),
                },
            ));
            batch.push(event(
                1,
                EventBody::Output {
                    stream: weft_proto::OutputStream::Stdout,
                    data: bytes::Bytes::from_static(b"hello\n"),
                    chunk: Some(0),
                },
            ));
            batch.push(event(2, EventBody::Finished(Arc::new(record))));
        } else {
            batch.push(Record::Task(record));
        }
        if batch.len() >= BATCH {
            store.commit(&batch)?;
            batch.clear();
            if (i + 1) % (10 * BATCH) < BATCH {
                eprintln!("  {} tasks written, {:.0?}", i + 1, began.elapsed());
            }
        }
    }
    store.commit(&batch)?;
    eprintln!("  {n} tasks written in {:.1?}", began.elapsed());
    std::fs::write(dir.join(FILLED), n.to_string())?;
    Ok(())
}

/// Median and p99 of `samples` (sorted here), in ms.
fn summary(samples: &mut [Duration]) -> (f64, f64, f64) {
    samples.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let at = |q: f64| ms(samples[((samples.len() - 1) as f64 * q).round() as usize]);
    (at(0.5), at(0.99), ms(samples[samples.len() - 1]))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = args()?;
    let temp = tempfile::tempdir()?;
    let data_dir = args
        .data_dir
        .clone()
        .unwrap_or_else(|| temp.path().join("data"));
    std::fs::create_dir_all(&data_dir)?;
    let filled = std::fs::read_to_string(data_dir.join(FILLED)).ok();
    if filled.as_deref() == Some(args.tasks.to_string().as_str()) {
        eprintln!(
            "using the {} tasks already in {}",
            args.tasks,
            data_dir.display()
        );
    } else {
        eprintln!("filling {} with {} tasks", data_dir.display(), args.tasks);
        let dir = data_dir.clone();
        let n = args.tasks;
        tokio::task::spawn_blocking(move || fill(&dir, n)).await??;
    }

    let config = CoordinatorConfig {
        data_dir: Some(data_dir.clone()),
        tls: Some(TlsConfig {
            pki_dir: Some(temp.path().join("pki")),
            ..TlsConfig::default()
        }),
        admin_token_file: Some(temp.path().join("admin.token")),
        http_listen: Some("127.0.0.1:0".parse()?),
        ..CoordinatorConfig::default()
    };
    let began = Instant::now();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let mut cluster = LocalCluster::start(config, listener).await?;
    eprintln!(
        "coordinator started on the store in {:.1?}",
        began.elapsed()
    );
    let token = std::fs::read_to_string(temp.path().join("admin.token"))?
        .trim()
        .to_owned();
    let client =
        Client::connect_secure(&cluster.url(), cluster.trust().as_ref(), Some(&token)).await?;
    let (join, _) = client
        .create_join_token("bench", Some(Duration::from_secs(600)), 1, "")
        .await?;
    let mut node = cluster.node_config();
    node.name = "bench-node".into();
    node.coordinators.clear();
    node.trust = None;
    node.join_token = Some(weft_proto::JoinToken::parse(&join)?);
    node.state_dir = Some(temp.path().join("node"));
    cluster.add_node(node);
    weft_cluster::wait_nodes_ready(&client, 1, Duration::from_secs(30)).await?;
    let running = client.submit(TaskSpec::call("sleep", "600s")).await?;
    let node_id = loop {
        let task = client.get(running).await?;
        if task.state == TaskState::Running {
            break task.node_id.context("a running task has a node")?;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };

    let url = cluster.http_url().context("the HTTP listener is on")?;
    let ca = cluster.ca_file().context("TLS is on")?;
    let http = HttpClient::new(&url, Some(&ca));
    // A finished task with events, and a page token deep in the list.
    let newest = http
        .get("/api/tasks?state=succeeded&limit=1", &token)
        .await
        .json();
    let task_id = newest["tasks"][0]["id"]
        .as_str()
        .context("a succeeded task")?
        .to_owned();
    let deep = http.get("/api/tasks?limit=500", &token).await.json();
    let deep_token = deep["next_page_token"]
        .as_str()
        .unwrap_or_default()
        .to_owned();

    let auth = format!("Bearer {token}");
    let pages: Vec<(&str, Vec<String>)> = vec![
        (
            "index (/, app.js, app.css)",
            vec![
                "/".into(),
                "/assets/app.js".into(),
                "/assets/app.css".into(),
            ],
        ),
        ("overview", vec!["/api/me".into(), "/api/overview".into()]),
        ("tasks, first page", vec!["/api/tasks?limit=50".into()]),
        (
            "tasks, failed",
            vec!["/api/tasks?state=failed&limit=50".into()],
        ),
        (
            "tasks, next page",
            vec![format!("/api/tasks?limit=50&page_token={deep_token}")],
        ),
        (
            "a task (+ events)",
            vec![
                format!("/api/tasks/{task_id}"),
                format!("/api/tasks/{task_id}/events"),
            ],
        ),
        ("a node", vec![format!("/api/nodes/{node_id}")]),
    ];
    println!();
    println!(
        "{} tasks in the store; {} runs per page; requests one after the other on one kept-alive TLS connection",
        args.tasks, args.runs
    );
    println!("| page | requests | median ms | p99 ms | max ms |");
    println!("|---|---|---|---|---|");
    // One connection, kept alive, as a browser's (TLS handshakes are not
    // what is measured).
    let mut conn = http.connect().await.map_err(anyhow::Error::msg)?;
    for (page, paths) in &pages {
        let mut samples = Vec::with_capacity(args.runs);
        for _ in 0..args.runs {
            let began = Instant::now();
            for path in paths {
                let answer = conn
                    .request("GET", path, &[("authorization", &auth)])
                    .await
                    .map_err(anyhow::Error::msg)?;
                anyhow::ensure!(answer.status == 200, "{path}: {}", answer.status);
            }
            samples.push(began.elapsed());
        }
        let (median, p99, max) = summary(&mut samples);
        println!(
            "| {page} | {} | {median:.1} | {p99:.1} | {max:.1} |",
            paths.len()
        );
    }
    client.cancel(running).await?;
    cluster.shutdown(Duration::from_secs(5)).await;
    Ok(())
}
