//! The node's lease against a fake coordinator (`fake/`): an attempt keeps
//! running across a coordinator restart within the lease, and is killed and
//! reported once the lease runs out, also after the process was paused.

mod common;
mod fake;

use std::time::{Duration, Instant};

use weft_node::HandlerRegistry;
use weft_proto::pb::coordinator_message::Body as Inbound;
use weft_proto::pb::node_message::Body as Outbound;
use weft_proto::pb::node_task_event::Body as EventBody;
use weft_proto::{Outcome, TaskSpec, pb};

use common::process_is_gone;
use fake::*;

#[tokio::test]
async fn attempt_keeps_running_across_a_coordinator_restart_within_the_lease() {
    let dir = tempfile::tempdir().unwrap();
    let (away, after) = (dir.path().join("away"), dir.path().join("after"));
    let script = format!(
        "echo before; until [ -e {away} ]; do sleep 0.01; done; echo away; \
         until [ -e {after} ]; do sleep 0.01; done; echo after",
        away = away.display(),
        after = after.display()
    );
    let (server, mut conns) = FakeServer::start("127.0.0.1:0".parse().unwrap()).await;
    let addr = server.addr;
    let node = start(&server.url(), 2);
    let mut conn = next_conn(&mut conns).await;
    // The lease is the heartbeat timeout: 20 s, far longer than the restart.
    let (_, first_id) = conn.accept(SECOND, 20 * SECOND).await;
    conn.credits().await;
    let ids = conn
        .assign(vec![TaskSpec::exec(["sh", "-c", &script])])
        .await;
    let (mut pid, mut before) = (None, None);
    while pid.is_none() || before.is_none() {
        let Some(Outbound::Events(batch)) = conn.next().await else {
            continue;
        };
        for event in batch.events {
            match event.body {
                Some(EventBody::Started(started)) => pid = Some(started.pid),
                Some(EventBody::Output(chunk)) => {
                    before = Some((chunk.seq, String::from_utf8_lossy(&chunk.data).into_owned()));
                }
                other => panic!("unexpected {other:?}"),
            }
        }
    }
    let pid = pid.unwrap();
    assert_eq!(before, Some((0, "before\n".to_owned())));

    // The coordinator restarts: its stream ends and the port is free a while.
    drop(conn);
    server.stop().await;
    wait_until("the node noticed", || node.node_id().is_none()).await;
    touch(&away); // output while disconnected waits in the node
    let (server, mut conns) = FakeServer::start(addr).await;
    let mut conn = next_conn(&mut conns).await;
    let (register, _) = conn.accept(SECOND, 20 * SECOND).await;
    assert_eq!(register.previous_node_id, first_id.to_string());
    assert_eq!(
        register.running,
        vec![pb::AttemptRef {
            task_id: ids[0].to_string(),
            attempt: 1
        }]
    );
    assert!(!process_is_gone(pid), "the same process still runs");
    // What the first stream took is sent again first, the attempt's
    // Started (the same process's: sent again, not restarted) ahead of its
    // output: the coordinator may have died before recording them (it
    // ignores a Started of an attempt it has running, and drops a chunk it
    // has, by seq).
    let Some(Outbound::Events(again)) = conn.next().await else {
        panic!("expected the kept Started and output first");
    };
    let resent: Vec<String> = again
        .events
        .into_iter()
        .map(|event| match event.body {
            Some(EventBody::Started(started)) => format!("started {}", started.pid),
            Some(EventBody::Output(chunk)) => {
                format!("{} {}", chunk.seq, String::from_utf8_lossy(&chunk.data))
            }
            other => panic!("unexpected {other:?}"),
        })
        .collect();
    assert_eq!(resent, [format!("started {pid}"), "0 before\n".to_owned()]);
    assert_eq!(conn.credits().await, 1, "the attempt still holds its slot");
    touch(&after);
    let (chunks, done) = output_until_finished(&mut conn, ids[0]).await;
    assert_eq!(outcome(&done), Outcome::Succeeded, "{done:?}");
    let seqs: Vec<u64> = chunks.iter().map(|(seq, _)| *seq).collect();
    let expected: Vec<u64> = (1..=seqs.len() as u64).collect();
    assert_eq!(
        seqs, expected,
        "seqs carry on from the first stream, no gap, no repeat"
    );
    let text: String = chunks.iter().map(|(_, data)| data.as_str()).collect();
    assert_eq!(text, "away\nafter\n");
    node.kill().await;
    drop(conn);
    server.stop().await;
}

#[tokio::test]
async fn silent_coordinator_past_the_lease_gets_the_attempt_killed_and_reported_after_reconnecting()
{
    let (url, mut conns) = fake_coordinator().await;
    let mut config = config(&url, 1);
    config.lease = Some(Duration::from_millis(300));
    let node = weft_node::start(config, HandlerRegistry::with_builtins());
    let mut conn = next_conn(&mut conns).await;
    // The stream stays open but the coordinator never says a word. (Its
    // heartbeat timeout is long: the lease is what runs out.)
    let (_, first_id) = conn.accept(Duration::from_millis(50), 20 * SECOND).await;
    conn.credits().await;
    let ids = conn
        .assign(vec![TaskSpec::exec([
            "sh",
            "-c",
            "sleep 100 & echo $!; wait",
        ])])
        .await;
    let grandchild: u32 = conn.first_output().await.trim().parse().unwrap();
    assert_gone_soon(grandchild).await;
    // The node dropped the stream itself, with no Finished on it...
    while let Some(message) = conn.next().await {
        if let Outbound::Events(batch) = message {
            assert!(
                batch
                    .events
                    .iter()
                    .all(|e| !matches!(e.body, Some(EventBody::Finished(_)))),
                "{batch:?}"
            );
        }
    }
    // ...and reports the attempt on the next session, where the coordinator
    // fences it.
    let mut again = next_conn(&mut conns).await;
    // Heartbeats within the 300 ms lease, which must outlast two.
    let (register, _) = again.accept(Duration::from_millis(50), 20 * SECOND).await;
    assert_eq!(register.previous_node_id, first_id.to_string());
    assert_eq!(register.running.len(), 1, "its Finished is not sent yet");
    let (_, done) = again.until_finished(ids[0]).await;
    assert_eq!(outcome(&done), Outcome::Cancelled);
    assert!(
        done.error
            .starts_with("lease expired: coordinator unreachable for 0.")
            && done
                .error
                .ends_with("; the coordinator has reassigned this attempt"),
        "{}",
        done.error
    );
    node.kill().await;
}

#[tokio::test]
async fn a_node_resumed_after_a_pause_past_its_lease_kills_its_attempts_at_once() {
    use nix::sys::signal::{Signal, kill};
    use nix::unistd::Pid;

    let (url, mut conns) = fake_coordinator().await;
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_weft-node"))
        .args(["--coordinator", &url, "--slots", "1", "--name", "paused"])
        .args(["--lease", "1s"])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let node = Pid::from_raw(i32::try_from(child.id().unwrap()).unwrap());
    let mut conn = next_conn(&mut conns).await;
    // The coordinator's own timeout is long: only the lease can stop the attempt.
    conn.accept(Duration::from_millis(50), 60 * SECOND).await;
    conn.credits().await;
    let heartbeats = {
        let out = conn.out.clone();
        tokio::spawn(async move {
            let beat = pb::CoordinatorMessage {
                body: Some(Inbound::Heartbeat(pb::Heartbeat {})),
            };
            while out.send(Ok(beat.clone())).await.is_ok() {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
    };
    let ids = conn
        .assign(vec![TaskSpec::exec([
            "sh",
            "-c",
            "sleep 100 & echo $!; wait",
        ])])
        .await;
    let grandchild: u32 = conn.first_output().await.trim().parse().unwrap();
    kill(node, Signal::SIGSTOP).unwrap();
    // The pause itself is the scenario: the node is stopped past its lease
    // while the coordinator's heartbeats pile up unread.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(!process_is_gone(grandchild), "a stopped node kills nothing");
    kill(node, Signal::SIGCONT).unwrap();
    let resumed = Instant::now();
    assert_gone_soon(grandchild).await;
    assert!(
        resumed.elapsed() < SECOND,
        "killed {:?} after resuming",
        resumed.elapsed()
    );
    let mut again = next_conn(&mut conns).await;
    again.accept(Duration::from_millis(50), 60 * SECOND).await;
    let (_, done) = again.until_finished(ids[0]).await;
    assert_eq!(outcome(&done), Outcome::Cancelled);
    assert!(
        done.error
            .starts_with("lease expired: coordinator unreachable for "),
        "{}",
        done.error
    );
    heartbeats.abort();
    child.kill().await.unwrap();
}

#[tokio::test]
async fn a_lease_the_coordinators_heartbeats_cannot_renew_stops_the_node_saying_what_works() {
    let (url, mut conns) = fake_coordinator().await;
    let mut config = config(&url, 1);
    config.lease = Some(SECOND);
    let mut node = weft_node::start(config, HandlerRegistry::with_builtins());
    let mut conn = next_conn(&mut conns).await;
    // Heartbeats every second: a 1 s lease would run out between two.
    conn.accept(SECOND, 20 * SECOND).await;
    let err = tokio::time::timeout(WAIT, node.wait())
        .await
        .expect("the node stops")
        .unwrap_err();
    let message = err.to_string();
    assert!(
        message.contains("--lease 1s is too short")
            && message.contains("every 1s")
            && message.contains("--lease 2s or more"),
        "{message}"
    );
    assert!(
        conns.try_recv().is_err(),
        "no reconnect: it would meet the same"
    );
}
