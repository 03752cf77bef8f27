//! `weft map --output json`: one JSON object per line of input, as each
//! task finishes, for scripts that need each line's task and result.

use serde_json::Value;

use weft_tests::TestCluster;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn map_with_json_output_prints_one_object_per_line_with_its_task_and_stdout() {
    let cluster = TestCluster::builder().nodes(1).slots(4).start().await;
    let out = cluster
        .weft_with_stdin(
            &["-o", "json", "map", "--keep-order", "--call", "echo"],
            b"alpha\nbeta\ngamma\n",
        )
        .await;
    assert_eq!(out.code, Some(0), "{out}");
    let objects: Vec<Value> = out
        .stdout
        .lines()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("{line:?}: {e}")))
        .collect();
    let lines: Vec<&str> = objects
        .iter()
        .map(|o| o["line"].as_str().unwrap())
        .collect();
    assert_eq!(
        lines,
        ["alpha", "beta", "gamma"],
        "input order with --keep-order: {out}"
    );
    for object in &objects {
        let line = object["line"].as_str().unwrap();
        assert_eq!(object["task"]["state"], "succeeded", "{object}");
        assert_eq!(object["task"]["handler"], "echo", "{object}");
        assert_eq!(object["stdout"], format!("{line}\n"), "{object}");
        assert!(
            object["task"]["id"]
                .as_str()
                .is_some_and(|id| id.len() == 26),
            "{object}"
        );
    }

    // A failed line is an object too, and the exit code says a task failed.
    let out = cluster
        .weft_with_stdin(
            &["-o", "json", "map", "--max-attempts", "1", "--call", "fail"],
            b"broken\n",
        )
        .await;
    assert_eq!(out.code, Some(1), "{out}");
    let object: Value = serde_json::from_str(out.stdout.trim()).unwrap();
    assert_eq!(object["line"], "broken", "{out}");
    assert_eq!(object["task"]["state"], "failed", "{out}");
    assert_eq!(object["stdout"], "", "{out}");
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn map_with_a_missing_stdin_file_names_the_flag_and_the_file() {
    let cluster = TestCluster::builder().nodes(1).start().await;
    let missing = cluster.dir().join("missing.txt");
    let missing = missing.to_str().expect("path");
    let out = cluster
        .weft_with_stdin(&["map", "--stdin-file", missing, "--", "cat"], b"a\n")
        .await;
    assert_eq!(out.code, Some(1), "{out}");
    assert!(
        out.stderr
            .contains(&format!("reading --stdin-file {missing}")),
        "{out}"
    );
    cluster.shutdown().await;
}
