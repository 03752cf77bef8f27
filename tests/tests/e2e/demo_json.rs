//! `weft demo -o json`: JSON Lines on stdout and nothing else; the last
//! line is the summary a program reads.

use serde_json::Value;

use weft_tests::weft_at;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weft_demo_with_json_output_prints_one_object_per_line_and_a_summary_last() {
    let out = weft_at("", &["-o", "json", "demo", "--nodes", "2"]).await;
    assert_eq!(out.code, Some(0), "{out}");
    let objects: Vec<Value> = out
        .stdout
        .lines()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("{line:?}: {e}")))
        .collect();
    let events: Vec<&str> = objects
        .iter()
        .map(|o| o["event"].as_str().expect("an event"))
        .collect();
    assert_eq!(events.first(), Some(&"cluster"), "{out}");
    assert!(
        events.contains(&"phase") && events.contains(&"task"),
        "{out}"
    );
    let summary = objects.last().expect("a summary");
    assert_eq!(summary["event"], "summary", "{out}");
    assert_eq!(summary["ok"], true, "{out}");
    assert!(
        summary["checks"].as_array().is_some_and(|c| !c.is_empty()),
        "{out}"
    );
    // Every task object carries the task as `weft get -o json` shows it.
    let retried = objects
        .iter()
        .find(|o| o["event"] == "task" && o["tag"] == "retry")
        .expect("the retried task");
    assert_eq!(retried["task"]["state"], "succeeded", "{retried}");
    assert_eq!(
        retried["task"]["attempts"].as_array().map(Vec::len),
        Some(2),
        "{retried}"
    );
}
