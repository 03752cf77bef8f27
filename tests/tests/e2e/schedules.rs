//! Cron schedules: `weft schedule` over the CLI, each fire's task runs with
//! its fire time, overlap SKIP against QUEUE, and exactly one task per fire
//! time across a kill -9 of the coordinator.
//!
//! Every schedule here fires each second (six fields, seconds first). Each
//! fired task is named `NAME@FIRE_TIME`, and an exec task gets
//! `WEFT_FIRE_TIME`: that is how the tests tell fires apart.

use std::collections::BTreeSet;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use weft_client::{Client, ListFilter, Task, TaskState};
use weft_proto::pb;
use weft_tests::TestCluster;
use weft_tests::wait::{default_timeout, wait_for};

/// The schedule named `name`, as listed.
async fn listed(client: &Client, name: &str) -> Option<pb::Schedule> {
    client
        .list_schedules()
        .await
        .expect("list schedules")
        .into_iter()
        .find(|s| s.spec.as_ref().is_some_and(|spec| spec.name == name))
}

/// Waits until the schedule has handled (fired or skipped) at least `n`
/// fires, and answers it.
async fn handled(client: &Client, name: &str, n: u64) -> pb::Schedule {
    wait_for(default_timeout(), || async {
        listed(client, name)
            .await
            .filter(|s| s.fired + s.skipped >= n)
    })
    .await
    .unwrap_or_else(|_| panic!("schedule {name} did not handle {n} fires in time"))
}

/// The tasks a schedule fired, oldest first.
async fn fired_tasks(client: &Client, name: &str) -> Vec<Task> {
    let filter = ListFilter {
        name: format!("{name}@"),
        ..ListFilter::default()
    };
    let mut tasks = client
        .list_filtered(&filter, 10_000)
        .await
        .expect("list fired tasks");
    tasks.retain(|t| task_name(t).starts_with(&format!("{name}@")));
    tasks.sort_by_key(|t| t.id);
    tasks
}

fn task_name(task: &Task) -> &str {
    task.spec.as_ref().map_or("", |spec| spec.name.as_str())
}

/// The fire time a task's name carries.
fn fire_time(task: &Task) -> String {
    task_name(task)
        .split_once('@')
        .map(|(_, at)| at.to_owned())
        .expect("a fired task's name is NAME@FIRE_TIME")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weft_schedule_creates_lists_pauses_resumes_and_deletes() {
    let cluster = TestCluster::builder().nodes(1).start().await;
    let client = cluster.client().await;
    let out = cluster
        .weft(&[
            "schedule",
            "create",
            "every",
            "--cron",
            "* * * * * *",
            "--overlap",
            "queue",
            "--",
            "sh",
            "-c",
            "echo \"$WEFT_SCHEDULE $WEFT_FIRE_TIME\"",
        ])
        .await;
    assert_eq!(out.code, Some(0), "{out}");
    assert!(out.stdout.contains("schedule every created"), "{out}");

    // Each fire's task runs and sees its own fire time.
    handled(&client, "every", 2).await;
    let tasks = fired_tasks(&client, "every").await;
    assert!(tasks.len() >= 2, "{tasks:?}");
    let first = cluster.wait_for_final(tasks[0].id).await;
    assert_eq!(first.state, TaskState::Succeeded, "{first:?}");
    let printed = cluster.weft(&["watch", &first.id.to_string()]).await;
    assert_eq!(printed.code, Some(0), "{printed}");
    assert_eq!(
        printed.stdout.trim(),
        format!("every {}", fire_time(&first)),
        "{printed}"
    );
    let times: BTreeSet<String> = tasks.iter().map(fire_time).collect();
    assert_eq!(times.len(), tasks.len(), "one task per fire time");

    // The table and the JSON.
    let table = cluster.weft(&["schedule", "list"]).await;
    assert_eq!(table.code, Some(0), "{table}");
    for column in [
        "NAME",
        "CRON",
        "TZ",
        "NEXT FIRE",
        "LAST FIRE",
        "LAST TASK",
        "FIRED",
        "SKIPPED",
        "PAUSED",
    ] {
        assert!(table.stdout.contains(column), "{column}: {table}");
    }
    assert!(table.stdout.contains("every"), "{table}");
    let json = cluster.weft(&["schedule", "list", "-o", "json"]).await;
    let all: serde_json::Value = serde_json::from_str(&json.stdout).expect("JSON");
    assert_eq!(all[0]["name"], "every", "{json}");
    assert_eq!(all[0]["overlap"], "queue", "{json}");
    assert_eq!(all[0]["paused"], false, "{json}");

    // Paused: no next fire, and no fire while paused.
    let out = cluster.weft(&["schedule", "pause", "every"]).await;
    assert_eq!(out.code, Some(0), "{out}");
    let paused = listed(&client, "every").await.expect("listed");
    assert!(paused.paused && paused.next_fire.is_none(), "{paused:?}");
    // Absence takes time to show: two fire times pass.
    tokio::time::sleep(Duration::from_millis(2_200)).await;
    let still = listed(&client, "every").await.expect("listed");
    assert_eq!(still.fired, paused.fired, "fired while paused");

    // Resumed: it fires again.
    let out = cluster.weft(&["schedule", "resume", "every"]).await;
    assert_eq!(out.code, Some(0), "{out}");
    handled(&client, "every", paused.fired + paused.skipped + 1).await;

    // Deleted: gone, its tasks kept; a second delete is not found.
    let out = cluster.weft(&["schedule", "delete", "every"]).await;
    assert_eq!(out.code, Some(0), "{out}");
    assert!(listed(&client, "every").await.is_none());
    assert!(!fired_tasks(&client, "every").await.is_empty());
    let again = cluster.weft(&["schedule", "delete", "every"]).await;
    assert_ne!(again.code, Some(0), "{again}");
    assert!(again.stderr.contains("not found"), "{again}");

    // Readable refusals naming the field.
    let bad = cluster
        .weft(&[
            "schedule",
            "create",
            "bad",
            "--cron",
            "61 * * * *",
            "--",
            "true",
        ])
        .await;
    assert_ne!(bad.code, Some(0), "{bad}");
    assert!(bad.stderr.contains("spec.cron"), "{bad}");
    let bad = cluster
        .weft(&[
            "schedule",
            "create",
            "bad",
            "--cron",
            "* * * * *",
            "--tz",
            "Mars/Base",
            "--",
            "true",
        ])
        .await;
    assert!(bad.stderr.contains("spec.time_zone"), "{bad}");
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overlap_skip_waits_for_the_long_task_while_queue_submits_every_fire() {
    let cluster = TestCluster::builder().nodes(1).slots(8).start().await;
    let client = cluster.client().await;
    for (name, overlap) in [("skip", "skip"), ("queue", "queue")] {
        let out = cluster
            .weft(&[
                "schedule",
                "create",
                name,
                "--cron",
                "* * * * * *",
                "--overlap",
                overlap,
                "--call",
                "sleep",
                "4s",
            ])
            .await;
        assert_eq!(out.code, Some(0), "{out}");
    }
    // Three fires of QUEUE: three tasks side by side.
    handled(&client, "queue", 3).await;
    let queue = fired_tasks(&client, "queue").await;
    assert!(queue.len() >= 3, "{queue:?}");
    // SKIP has had (about) the same fire times: one task, the rest skipped
    // while it runs.
    let skip = handled(&client, "skip", 3).await;
    assert_eq!(skip.fired, 1, "{skip:?}");
    assert!(skip.skipped >= 2, "{skip:?}");
    assert_eq!(fired_tasks(&client, "skip").await.len(), 1);
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_schedule_fires_each_time_exactly_once_across_a_coordinator_kill_9() {
    // kill -9 needs a coordinator process of its own: this runs as
    // processes in either test mode.
    let cluster = TestCluster::builder()
        .nodes(1)
        .slots(8)
        .durable()
        .processes()
        .start()
        .await;
    let client = cluster.client().await;
    let out = cluster
        .weft(&[
            "schedule",
            "create",
            "crash",
            "--cron",
            "* * * * * *",
            "--overlap",
            "queue",
            "--catch-up",
            "one",
            "--",
            "true",
        ])
        .await;
    assert_eq!(out.code, Some(0), "{out}");
    let before = handled(&client, "crash", 3).await;
    let crashed = SystemTime::now();
    cluster.crash_and_restart_coordinator().await;
    let up = SystemTime::now();
    let client = cluster.client().await;
    let after = handled(&client, "crash", before.fired + before.skipped + 3).await;

    // Paused, so the count and the tasks are read at rest.
    let out = cluster.weft(&["schedule", "pause", "crash"]).await;
    assert_eq!(out.code, Some(0), "{out}");
    let tasks = fired_tasks(&client, "crash").await;
    let times: Vec<String> = tasks.iter().map(fire_time).collect();
    let distinct: BTreeSet<&String> = times.iter().collect();
    assert_eq!(
        distinct.len(),
        times.len(),
        "a fire time fired twice: {times:?}"
    );
    // Fire times rise with the tasks (ids are in submission order).
    let mut sorted = times.clone();
    sorted.sort();
    assert_eq!(sorted, times, "fires out of order");
    // Catch-up ONE: the fire times missed while it was down are at most
    // one gap, and the latest of them fired (some fire time from the
    // second before the crash to the restart has a task).
    let seconds = |t: &String| {
        humantime::parse_rfc3339(t)
            .expect("RFC 3339")
            .duration_since(UNIX_EPOCH)
            .expect("after 1970")
            .as_secs()
    };
    let gaps = times
        .windows(2)
        .filter(|w| seconds(&w[1]) - seconds(&w[0]) > 1)
        .count();
    assert!(gaps <= 1, "more than one gap: {times:?}");
    let from = crashed.duration_since(UNIX_EPOCH).expect("now").as_secs() - 1;
    let to = up.duration_since(UNIX_EPOCH).expect("now").as_secs();
    assert!(
        times.iter().any(|t| (from..=to).contains(&seconds(t))),
        "nothing fired for the downtime {from}..={to}: {times:?}"
    );
    // The stored counter agrees with the tasks: nothing fired and lost,
    // nothing fired twice.
    let now = listed(&client, "crash").await.expect("listed");
    assert_eq!(now.fired as usize, tasks.len(), "{now:?} {times:?}");
    assert!(now.fired >= after.fired);
    // Every task ran (the node reconnected to the restarted coordinator).
    for task in &tasks {
        let done = cluster.wait_for_final(task.id).await;
        assert_eq!(done.state, TaskState::Succeeded, "{done:?}");
    }
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schedules_past_one_page_are_listed_a_page_at_a_time_and_all_by_the_client() {
    let cluster = TestCluster::builder().nodes(0).start().await;
    let client = cluster.client().await;
    // Near the 64 KiB cap each: about 17 to a 1 MiB page, so three pages.
    let input = vec![b'x'; 60 * 1024];
    let mut names: Vec<String> = (0..40).map(|i| format!("big-{i:02}")).collect();
    names.reverse(); // created out of name order: listed by name
    for name in &names {
        client
            .create_schedule(pb::ScheduleSpec {
                name: name.clone(),
                cron: "0 0 1 1 *".into(),
                task: Some(weft_proto::TaskSpec::call("echo", input.clone()).into()),
                ..pb::ScheduleSpec::default()
            })
            .await
            .expect("create schedule");
    }
    names.sort();
    let name_of = |s: &pb::Schedule| s.spec.as_ref().map_or(String::new(), |s| s.name.clone());

    // Page by page: in name order, no gaps or repeats, each page within
    // the budget, the last with no next_page_token.
    let mut paged = Vec::new();
    let mut token = String::new();
    let mut pages = 0;
    loop {
        let page = client.list_schedules_page(&token, 0).await.expect("a page");
        pages += 1;
        assert!(!page.schedules.is_empty(), "page {pages} is empty");
        assert!(
            prost::Message::encoded_len(&page) <= 1024 * 1024 + 1024,
            "page {pages}: {} bytes",
            prost::Message::encoded_len(&page)
        );
        paged.extend(page.schedules.iter().map(name_of));
        if page.next_page_token.is_empty() {
            break;
        }
        assert_eq!(page.next_page_token, *paged.last().expect("listed"));
        token = page.next_page_token;
    }
    assert!(pages >= 3, "{pages} pages");
    assert_eq!(paged, names);

    // `limit` bounds a page too.
    let two = client
        .list_schedules_page("big-05", 2)
        .await
        .expect("a page");
    let listed: Vec<String> = two.schedules.iter().map(name_of).collect();
    assert_eq!(
        (listed, two.next_page_token.as_str()),
        (vec!["big-06".to_owned(), "big-07".to_owned()], "big-07")
    );

    // The client and the CLI follow the pages: every schedule.
    let all: Vec<String> = client
        .list_schedules()
        .await
        .expect("list schedules")
        .iter()
        .map(name_of)
        .collect();
    assert_eq!(all, names);
    let json = cluster.weft(&["schedule", "list", "-o", "json"]).await;
    assert_eq!(json.code, Some(0), "{json}");
    let listed: serde_json::Value = serde_json::from_str(&json.stdout).expect("JSON");
    let listed: Vec<&str> = listed
        .as_array()
        .expect("an array")
        .iter()
        .map(|s| s["name"].as_str().expect("a name"))
        .collect();
    assert_eq!(listed, names);

    // A token that is not a schedule name is refused.
    for bad in ["not a name", "a/b"] {
        let err = client
            .list_schedules_page(bad, 0)
            .await
            .expect_err("a bad page token");
        assert!(
            matches!(err, weft_client::Error::InvalidArgument(ref m) if m.contains("page_token")),
            "{bad:?}: {err:?}"
        );
    }
    cluster.shutdown().await;
}

/// A name no schedule could have is refused as such by `PauseSchedule`
/// (pause and resume) and `DeleteSchedule`, however long; an unknown
/// well-formed one is NOT_FOUND, and neither answer echoes more than 64
/// characters of it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pausing_or_deleting_a_malformed_name_is_invalid_argument_and_echoes_it_cut() {
    let cluster = TestCluster::builder().nodes(0).start().await;
    let client = cluster.client().await;
    let long = "x".repeat(1024 * 1024);
    for bad in ["not a name", "a/b", "", long.as_str()] {
        for err in [
            client.pause_schedule(bad, true).await.map(drop),
            client.pause_schedule(bad, false).await.map(drop),
            client.delete_schedule(bad).await,
        ] {
            let err = err.expect_err("a malformed name");
            assert!(
                matches!(err, weft_client::Error::InvalidArgument(ref m) if m.contains("name") && m.len() < 400),
                "{:?}: {err:?}",
                bad.get(..16)
            );
        }
    }
    let unknown = "y".repeat(128);
    for err in [
        client.pause_schedule(&unknown, true).await.map(drop),
        client.delete_schedule(&unknown).await,
    ] {
        let err = err.expect_err("an unknown name");
        assert!(
            matches!(err, weft_client::Error::NotFound(ref m) if m.contains(&"y".repeat(64)) && !m.contains(&"y".repeat(65))),
            "{err:?}"
        );
    }
    cluster.shutdown().await;
}
