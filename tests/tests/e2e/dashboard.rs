//! The dashboard in a real browser: headless Chromium driven through
//! chromedriver (`weft_tests::browser`) against a cluster serving HTTPS,
//! trusting exactly the cluster's serving key.
//!
//! One cluster and one browser session for the whole file (starting
//! Chromium is the slow part on a small CI box), walked through as a user
//! would: a bad token is refused; an admin logs in and sees the nodes and
//! the counts; lists, filters and pages the tasks; watches a task's output
//! appear while it runs; cancels a task; opens a job (two tasks, one
//! after the other), sees its counts and what its waiting task waits for,
//! and cancels the job; drains a node; then a read-only
//! token sees no Cancel, Drain or Revoke button and the server refuses
//! those requests when the page sends them anyway. Screenshots of each page
//! go to `$WEFT_ARTIFACTS_DIR` (default `target/artifacts/dashboard/`).
//!
//! Without chromedriver and chromium the test skips, saying why, unless
//! `WEFT_REQUIRE_BROWSER=1` (CI), which makes that a failure.

use std::path::Path;

use serde_json::{Value, json};

use weft_client::{NodeInfo, NodeState, TaskId, TaskSpec, TaskState};
use weft_tests::TestCluster;
use weft_tests::browser::{Browser, CuttableRelay, serving_spki_sha256};

/// An exec task that prints `first`, waits until `marker` exists, then
/// prints `then`: output that arrives while it runs, with no sleep in the
/// test (the test makes the file when it has seen the first part).
fn waits_for(marker: &Path, first: &str, then: &str) -> TaskSpec {
    TaskSpec::exec([
        "sh",
        "-c",
        r#"printf '%s\n' "$2"; while [ ! -e "$1" ]; do sleep 0.05; done; printf '%s\n' "$3""#,
        "sh",
        &marker.display().to_string(),
        first,
        then,
    ])
}

/// The ids of the task rows on the tasks page, top to bottom.
const TASK_ROWS: &str = "const r = [...document.querySelectorAll('#tasks-table tbody tr')].map(row => row.dataset.task);";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_works_in_a_real_browser() {
    let cluster = TestCluster::builder()
        .nodes(2)
        // Task labels pick nodes: `team=web` runs on node-0, `team=db` on node-1.
        .node_labels(0, [("zone", "a"), ("team", "web")])
        .node_labels(1, [("zone", "b"), ("team", "db")])
        .start()
        .await;
    let dashboard = cluster.http_url();
    let spki = match cluster.ca_file() {
        Some(ca) => Some(serving_spki_sha256(&dashboard, ca).await),
        None => None,
    };
    // The browser reaches the dashboard through a relay that can cut its
    // connections, as a network drop would.
    let target = dashboard
        .split_once("://")
        .and_then(|(_, rest)| rest.trim_end_matches('/').parse().ok())
        .unwrap_or_else(|| panic!("the dashboard's address in {dashboard}"));
    let relay = CuttableRelay::start(target).await;
    let scheme = dashboard.split_once("://").map_or("https", |(s, _)| s);
    let http = format!("{scheme}://{}", relay.addr());
    let mode = if cluster.is_processes() {
        "processes"
    } else {
        "in-process"
    };
    let Some(browser) = Browser::launch(spki.as_deref(), mode).await else {
        cluster.shutdown().await;
        return;
    };
    let client = cluster.client().await;

    // Two finished tasks for the overview's counts and the list.
    let greet = client
        .submit(
            TaskSpec::exec(["echo", "hello"])
                .name("greet")
                .label("team", "web"),
        )
        .await
        .expect("submit greet");
    assert_eq!(
        cluster.wait_for_final(greet).await.state,
        TaskState::Succeeded
    );
    let broken = client
        .submit(
            TaskSpec::exec(["sh", "-c", "exit 3"])
                .name("broken")
                .label("team", "db")
                .max_attempts(1),
        )
        .await
        .expect("submit broken");
    assert_eq!(
        cluster.wait_for_final(broken).await.state,
        TaskState::Failed
    );

    // A schedule whose next fire is months ahead, at most (never within
    // the test): the overview says when it comes.
    client
        .create_schedule(weft_proto::pb::ScheduleSpec {
            name: "new-year".into(),
            cron: "0 0 1 1 *".into(),
            task: Some(TaskSpec::exec(["true"]).into()),
            ..Default::default()
        })
        .await
        .expect("create a schedule");

    a_bad_token_is_refused(&browser, &http).await;
    log_in(&browser, &http, &cluster.admin_token()).await;
    the_overview_shows_the_nodes_and_counts(&browser).await;
    the_tasks_page_lists_filters_and_pages(&browser, &http, greet, broken).await;
    output_appears_live_while_a_task_runs(&cluster, &browser, &http, &relay).await;
    cancel_cancels(&cluster, &browser, &http).await;
    a_job_page_shows_its_graph_and_cancels_it(&cluster, &browser, &http).await;

    // A task that holds a slot on one node while the rest of the test runs.
    let release = cluster.dir().join("release-blocker");
    let blocker = client
        .submit(waits_for(&release, "holding a slot", "released").name("blocker"))
        .await
        .expect("submit blocker");
    let busy_name = cluster.wait_for_running(blocker).await;
    let nodes = client.nodes().await.expect("nodes");
    let busy = node_named(&nodes, &busy_name);
    let idle = nodes
        .iter()
        .find(|n| n.name != busy_name)
        .expect("a second node");
    the_node_page_shows_its_attempts(&browser, &http, busy, blocker).await;
    drain_drains(&cluster, &browser, &http, idle).await;
    revoke_revokes(&cluster, &browser, &http).await;

    // Log out, then in again with a token that may only read.
    browser.click("#logout").await;
    browser.wait_for("#login-form").await;
    let reader = cluster.scoped_token(&["read"]).await;
    log_in(&browser, &http, &reader).await;
    a_read_token_sees_no_actions_and_is_refused(&cluster, &browser, &http, blocker, busy).await;

    std::fs::write(&release, b"").expect("releasing the blocker");
    assert_eq!(
        cluster.wait_for_final(blocker).await.state,
        TaskState::Succeeded
    );
    browser.close().await;
    cluster.shutdown().await;
}

fn node_named<'a>(nodes: &'a [NodeInfo], name: &str) -> &'a NodeInfo {
    nodes
        .iter()
        .find(|n| n.name == name)
        .unwrap_or_else(|| panic!("no node {name} in {nodes:?}"))
}

async fn a_bad_token_is_refused(browser: &Browser, http: &str) {
    browser.goto(&format!("{http}/#/login")).await;
    browser.fill("#token", "weft_notatoken_0000").await;
    browser.click("#login-submit").await;
    browser
        .wait_text(".login .banner.error", "not accepted")
        .await;
    browser.screenshot("login-refused").await;
    let state = browser
        .script(
            "return { nav: !document.getElementById('nav').hidden, cookie: document.cookie };",
            vec![],
        )
        .await;
    assert_eq!(state["nav"], false, "a refused token logs nobody in");
}

async fn log_in(browser: &Browser, http: &str, token: &str) {
    browser.goto(&format!("{http}/#/login")).await;
    browser.fill("#token", token).await;
    browser.click("#login-submit").await;
    browser
        .wait_until(
            "the page to show who is logged in",
            "return !document.getElementById('who').hidden && location.hash !== '#/login';",
        )
        .await;
    // The token lives on only as the server's HttpOnly session cookie.
    let kept = browser
        .script(
            "return { local: localStorage.length, session: sessionStorage.length, cookie: document.cookie };",
            vec![],
        )
        .await;
    assert_eq!(kept["local"], 0, "nothing in localStorage: {kept}");
    assert_eq!(kept["session"], 0, "nothing in sessionStorage: {kept}");
    assert!(
        !kept["cookie"].as_str().unwrap_or_default().contains(token),
        "the token is not readable by scripts: {kept}"
    );
}

async fn the_overview_shows_the_nodes_and_counts(browser: &Browser) {
    browser
        .wait_until(
            "both nodes in the overview's table",
            "return [...document.querySelectorAll('#nodes-table tbody tr')].map(r => r.dataset.node).sort().join(',') === 'node-0,node-1';",
        )
        .await;
    browser
        .wait_until(
            "one succeeded and one failed task in the counts",
            "const n = (s) => document.querySelector(`#task-counts [data-state=${s}] .n`)?.textContent; \
             return n('succeeded') === '1' && n('failed') === '1' && n('running') === '0';",
        )
        .await;
    let labels = browser.text("#nodes-table").await;
    assert!(
        labels.contains("zone=a") && labels.contains("zone=b"),
        "{labels}"
    );
    // A time to come reads "in ...", not "... ago".
    browser
        .wait_until(
            "the schedule's next fire to be shown as to come",
            "const t = document.querySelector('#schedules-table time')?.textContent || '';              return t.startsWith('in ') && !t.includes('ago');",
        )
        .await;
    assert!(browser.text("#card-slots").await.contains("of 8"));
    assert_eq!(
        browser.count(".chart").await,
        2,
        "queue and throughput charts"
    );
    browser.screenshot("overview").await;

    // A narrow window: one column, nothing wider than the window.
    browser.resize(400, 800).await;
    browser
        .wait_until(
            "the narrow overview to fit the window",
            "return document.documentElement.scrollWidth <= window.innerWidth;",
        )
        .await;
    browser.screenshot("overview-narrow").await;
    browser
        .resize(
            weft_tests::browser::VIEWPORT.0,
            weft_tests::browser::VIEWPORT.1,
        )
        .await;
}

async fn the_tasks_page_lists_filters_and_pages(
    browser: &Browser,
    http: &str,
    greet: TaskId,
    broken: TaskId,
) {
    let (greet, broken) = (json!(greet.to_string()), json!(broken.to_string()));
    browser.click("#nav a[data-route=tasks]").await;
    let rows = browser
        .wait_until(
            "the task list",
            &format!("{TASK_ROWS} return r.length >= 2 ? r : null;"),
        )
        .await;
    assert_eq!(rows, json!([broken, greet]), "newest first");
    browser.screenshot("tasks").await;

    // By state.
    browser.select("#filter-state", "failed").await;
    browser.click("#filter-apply").await;
    wait_rows(browser, json!([broken])).await;

    // By label, by name and by node (greet's label sends it to node-0):
    // only the matching task, and no error.
    for (field, value) in [
        ("#filter-label", "team=web"),
        ("#filter-name", "greet"),
        ("#filter-node", "node-0"),
    ] {
        browser.goto(&format!("{http}/#/tasks")).await;
        browser.wait_for("#tasks-table").await;
        browser.fill(field, value).await;
        browser.click("#filter-apply").await;
        let outcome = browser
            .wait_until(
                &format!("the list filtered by {value}"),
                &format!(
                    "const error = document.querySelector('.error-slot .banner'); \
                     if (error) return {{ error: error.textContent }}; \
                     {TASK_ROWS} return (r.length === 1 && location.hash.includes('=')) ? {{ rows: r }} : null;"
                ),
            )
            .await;
        match &outcome["rows"] {
            Value::Array(_) => assert_eq!(outcome["rows"], json!([greet]), "{value}"),
            _ => panic!("filtering by {value}: {outcome}"),
        }
    }

    // The node filter from the address, as a link gives it.
    browser.goto(&format!("{http}/#/tasks?node=node-1")).await;
    wait_rows(browser, json!([broken])).await;
    assert_eq!(
        browser
            .wait_until(
                "the node field filled from the address",
                "const v = document.getElementById('filter-node').value; return v ? v : null;",
            )
            .await,
        json!("node-1")
    );

    // Pages of one: next, then back.
    browser.goto(&format!("{http}/#/tasks?limit=1")).await;
    wait_rows(browser, json!([broken])).await;
    browser.click("#page-next").await;
    wait_rows(browser, json!([greet])).await;
    browser.click("#page-prev").await;
    wait_rows(browser, json!([broken])).await;

    // Click through to a task.
    browser
        .click(&format!(
            "#tasks-table a[href='#/tasks/{}']",
            broken.as_str().unwrap_or_default()
        ))
        .await;
    browser.wait_text("#task-state", "failed").await;
    browser
        .wait_text("#task-summary [data-field=exit-code]", "3")
        .await;
}

async fn wait_rows(browser: &Browser, want: Value) {
    let script = format!(
        "{TASK_ROWS} return JSON.stringify(r) === {};",
        json!(want.to_string())
    );
    browser
        .wait_until(&format!("the task rows to be {want}"), &script)
        .await;
}

async fn output_appears_live_while_a_task_runs(
    cluster: &TestCluster,
    browser: &Browser,
    http: &str,
    relay: &CuttableRelay,
) {
    let client = cluster.client().await;
    let marker = cluster.dir().join("live-go-on");
    // Markup in the output must show as text, never become HTML.
    let id = client
        .submit(
            waits_for(&marker, "<b>first</b> line", "second line")
                .name("live")
                .env("MODE", "demo")
                .secret_env("API_KEY", "hunter2"),
        )
        .await
        .expect("submit live");
    let node = cluster.wait_for_running(id).await;

    // Find it by id, as a user would.
    browser.goto(&format!("{http}/#/tasks")).await;
    browser.fill("#find-id", &id.to_string()).await;
    browser.click("#task-find button").await;
    browser.wait_text("#output", "<b>first</b> line").await;
    browser.wait_text("#task-state", "running").await;
    assert_eq!(
        browser.count("#output b").await,
        0,
        "output is text, not HTML"
    );
    // The spec, without secret values.
    browser
        .wait_text("#task-summary [data-field=environment]", "MODE=demo")
        .await;
    let page = browser.text("body").await;
    assert!(
        !page.contains("hunter2"),
        "a secret value on the page: {page}"
    );
    assert!(
        !browser.text("#output").await.contains("second line"),
        "the task has not printed it yet"
    );
    browser.wait_text("#stream-status", "live").await;
    browser.screenshot("task-running").await;

    // The network drops: the page reconnects by itself (the browser sends
    // Last-Event-ID) and goes on where it was, showing nothing twice.
    browser
        .wait_until(
            "the events stream to be open",
            "return document.getElementById('stream-status').dataset.opens === '1';",
        )
        .await;
    let accepted = relay.accepted();
    relay.cut();
    browser
        .wait_until(
            "the events stream to open again after the drop",
            "return document.getElementById('stream-status').dataset.opens === '2';",
        )
        .await;
    assert!(
        relay.accepted() > accepted,
        "it reconnected through the relay"
    );

    std::fs::write(&marker, b"").expect("writing the marker");
    browser.wait_text("#output", "second line").await;
    browser.wait_text("#task-state", "succeeded").await;
    let output = browser.text("#output").await;
    assert_eq!(
        output, "<b>first</b> line\nsecond line\n",
        "each line once, in order"
    );
    let attempts = browser.text("#task-attempts").await;
    assert_eq!(
        browser.count("#task-attempts li.attempt").await,
        1,
        "{attempts}"
    );
    assert!(
        attempts.contains(&node) && attempts.contains("succeeded"),
        "{attempts}"
    );
    browser.screenshot("task").await;
    assert_eq!(cluster.wait_for_final(id).await.state, TaskState::Succeeded);
}

async fn cancel_cancels(cluster: &TestCluster, browser: &Browser, http: &str) {
    let client = cluster.client().await;
    let never = cluster.dir().join("never-made");
    let id = client
        .submit(waits_for(&never, "waiting", "never printed").name("to-cancel"))
        .await
        .expect("submit to-cancel");
    cluster.wait_for_running(id).await;
    browser.goto(&format!("{http}/#/tasks/{id}")).await;
    browser.wait_text("#output", "waiting").await;
    browser.click("#cancel").await;
    browser.click("#cancel-confirm").await;
    browser.wait_text("#task-state", "cancelled").await;
    assert_eq!(
        cluster.wait_for_final(id).await.state,
        TaskState::Cancelled,
        "cancelled through the API"
    );
    assert_eq!(
        browser.count("#cancel").await,
        0,
        "no Cancel on a finished task"
    );
    browser.screenshot("task-cancelled").await;
}

async fn a_job_page_shows_its_graph_and_cancels_it(
    cluster: &TestCluster,
    browser: &Browser,
    http: &str,
) {
    let client = cluster.client().await;
    let release = cluster.dir().join("release-job");
    let weft_client::SubmitOutcome {
        job_id: job,
        task_ids: ids,
    } = client
        .submit_graph(vec![
            waits_for(&release, "first", "done")
                .name("job-first")
                .ref_name("first"),
            TaskSpec::call("noop", "")
                .name("job-second")
                .after_ref("first")
                .priority(7),
        ])
        .await
        .expect("submit a graph");
    cluster.wait_for_running(ids[0]).await;
    browser.goto(&format!("{http}/#/jobs/{job}")).await;
    browser
        .wait_until(
            "one running and one pending task in the job's counts",
            "const n = (s) => document.querySelector(`#job-counts [data-state=${s}] .n`)?.textContent; \
             return n('running') === '1' && n('pending') === '1';",
        )
        .await;
    browser.screenshot("job").await;
    // The waiting task's page: its job, what it runs after and waits for.
    browser
        .click(&format!("#tasks-table tr[data-task='{}'] a", ids[1]))
        .await;
    browser.wait_text("[data-field=waiting-for]", "").await;
    let shown = browser
        .script(
            "const href = (f) => document.querySelector(`[data-field=${f}] a`)?.getAttribute('href'); \
             return { job: href('job'), after: href('after'), waiting: href('waiting-for'), \
                      priority: document.querySelector('[data-field=priority]')?.textContent, \
                      state: document.querySelector('#task-state')?.textContent };",
            vec![],
        )
        .await;
    assert_eq!(shown["job"], format!("#/jobs/{job}"), "{shown}");
    assert_eq!(shown["after"], format!("#/tasks/{}", ids[0]), "{shown}");
    assert_eq!(shown["waiting"], format!("#/tasks/{}", ids[0]), "{shown}");
    assert_eq!(shown["priority"], "7", "{shown}");
    assert_eq!(shown["state"], "pending", "{shown}");
    browser.screenshot("task-pending").await;
    // Cancel the job from its page: both tasks end, none runs.
    browser.click("[data-field=job] a").await;
    browser.click("#cancel-job").await;
    browser.click("#cancel-job-confirm").await;
    browser
        .wait_text("#job-info .banner", "Job cancelled")
        .await;
    for id in &ids {
        assert_eq!(
            cluster.wait_for_final(*id).await.state,
            TaskState::Cancelled,
            "task {id}"
        );
    }
    browser
        .wait_until(
            "the job's counts to show only cancelled tasks",
            "const c = [...document.querySelectorAll('#job-counts [data-state]')].map(e => e.dataset.state); \
             return c.length === 1 && c[0] === 'cancelled';",
        )
        .await;
    browser
        .wait_until(
            "no Cancel job button once nothing is live",
            "return !document.querySelector('#cancel-job');",
        )
        .await;
    std::fs::write(&release, b"").expect("release");
}

async fn the_node_page_shows_its_attempts(
    browser: &Browser,
    http: &str,
    node: &NodeInfo,
    task: TaskId,
) {
    browser.goto(&format!("{http}/#/")).await;
    browser
        .click(&format!("#nodes-table tr[data-node='{}'] a", node.name))
        .await;
    browser
        .wait_for(&format!("#running-table tr[data-task='{task}']"))
        .await;
    browser.wait_text("#node-info", &node.id.to_string()).await;
    browser.wait_for("#drain").await;
    browser.wait_for("#revoke").await;
    browser.screenshot("node").await;
}

async fn drain_drains(cluster: &TestCluster, browser: &Browser, http: &str, node: &NodeInfo) {
    browser.goto(&format!("{http}/#/nodes/{}", node.id)).await;
    browser.wait_text("#node-info", &node.name).await;
    browser.click("#drain").await;
    browser.click("#drain-confirm").await;
    // It has nothing to finish, so it drains and leaves at once; the page
    // shows it draining, then gone.
    browser
        .wait_until(
            "the node page to show the node draining or gone",
            "const s = document.getElementById('node-state').textContent; \
             const info = document.getElementById('node-info').textContent; \
             return s.includes('draining') || info.includes('not connected');",
        )
        .await;
    let client = cluster.client().await;
    let name = node.name.clone();
    weft_tests::wait_until(weft_tests::default_timeout(), async || {
        client.nodes().await.is_ok_and(|nodes| {
            nodes
                .iter()
                .find(|n| n.name == name)
                .is_none_or(|n| n.state == NodeState::Draining)
        })
    })
    .await
    .unwrap_or_else(|e| panic!("{e}: node {name} did not drain"));
}

async fn revoke_revokes(cluster: &TestCluster, browser: &Browser, http: &str) {
    let name = cluster.add_node(1, [("team", "ops")]).await;
    let nodes = cluster.client().await.nodes().await.expect("nodes");
    let node = node_named(&nodes, &name);
    browser.goto(&format!("{http}/#/nodes/{}", node.id)).await;
    browser.wait_text("#node-info", &name).await;
    browser.click("#revoke").await;
    browser.click("#revoke-confirm").await;
    browser.wait_text("#node-info", "Node revoked").await;
    browser.screenshot("node-revoked").await;
    assert!(
        cluster.wait_node_stopped(&name).await,
        "a revoked node stops"
    );
    let client = cluster.client().await;
    weft_tests::wait_until(weft_tests::default_timeout(), async || {
        client
            .nodes()
            .await
            .is_ok_and(|nodes| nodes.iter().all(|n| n.name != name))
    })
    .await
    .unwrap_or_else(|e| panic!("{e}: revoked node {name} is still listed"));
}

async fn a_read_token_sees_no_actions_and_is_refused(
    cluster: &TestCluster,
    browser: &Browser,
    http: &str,
    task: TaskId,
    node: &NodeInfo,
) {
    browser.goto(&format!("{http}/#/tasks/{task}")).await;
    browser.wait_text("#task-state", "running").await;
    browser.wait_text("#output", "holding a slot").await;
    assert_eq!(
        browser.count("#cancel").await,
        0,
        "no Cancel for a read token"
    );
    browser.screenshot("task-read-token").await;

    browser.goto(&format!("{http}/#/nodes/{}", node.id)).await;
    browser
        .wait_for(&format!("#running-table tr[data-task='{task}']"))
        .await;
    assert_eq!(
        browser.count("#drain, #revoke").await,
        0,
        "no Drain or Revoke for a read token"
    );

    // Sent anyway from the page, CSRF header and session cookie included.
    let statuses = browser
        .script(
            "const post = (path) => fetch(path, { method: 'POST', credentials: 'same-origin', headers: { 'X-Weft-Csrf': '1' } }).then(r => r.status); \
             return Promise.all([post(`/api/tasks/${arguments[0]}/cancel`), post(`/api/nodes/${arguments[1]}/drain`), post(`/api/nodes/${arguments[1]}/revoke`)]);",
            vec![json!(task.to_string()), json!(node.id.to_string())],
        )
        .await;
    assert_eq!(statuses, json!([403, 403, 403]), "cancel, drain, revoke");

    let client = cluster.client().await;
    assert_eq!(
        client.get(task).await.expect("get").state,
        TaskState::Running
    );
    let nodes = client.nodes().await.expect("nodes");
    assert_eq!(
        node_named(&nodes, &node.name).state,
        NodeState::Ready,
        "the node was neither drained nor revoked"
    );
}
