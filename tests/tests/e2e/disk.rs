//! The coordinator's disk, with the real binary: a disk that fills up
//! while tasks are submitted makes the coordinator exit 74 with a message
//! that says so, clients are told `UNAVAILABLE` naming the disk, and every
//! acknowledged task is there after a restart with room; a store file that
//! is emptied where a store existed is refused (exit 65), not replaced.
//!
//! These run the binaries whatever `WEFT_TEST_MODE` says (they are about
//! the process's exit). They talk plaintext without tokens (`--insecure
//! --no-auth`): the disk's behaviour does not depend on either. The full
//! disk is a small tmpfs, mounted for the test; where mounting is not
//! allowed (not root, no CAP_SYS_ADMIN) the test says so and passes.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use weft_client::{Client, Error as ClientError, TaskId, TaskSpec, TaskState};
use weft_cluster::ChildProcess;
use weft_tests::default_timeout;
use weft_tests::process::spawn;

/// Exit status of a failed commit (see `weft-coordinator --help`).
const EXIT_COMMIT_FAILED: i32 = 74;
/// Exit status of a damaged or missing store.
const EXIT_DAMAGED: i32 = 65;

/// A tmpfs of `size` mounted on `path`, unmounted on drop.
struct Tmpfs {
    path: PathBuf,
}

impl Tmpfs {
    /// Mounts one, or says why it cannot.
    fn mount(path: &Path, size: &str) -> Result<Tmpfs, String> {
        std::fs::create_dir_all(path).map_err(|e| e.to_string())?;
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(path)
            .output()
            .map_err(|e| format!("running mount: {e}"))?;
        if !out.status.success() {
            return Err(String::from_utf8_lossy(&out.stderr).trim().to_owned());
        }
        Ok(Tmpfs {
            path: path.to_owned(),
        })
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.path).status();
    }
}

/// Starts `weft-coordinator` on `data_dir`, plaintext and without tokens,
/// logging to `<dir>/<label>.log`.
fn coordinator(dir: &Path, data_dir: &Path, label: &str) -> ChildProcess {
    let args = [
        "--listen".to_owned(),
        "127.0.0.1:0".to_owned(),
        "--addr-file".to_owned(),
        dir.join(format!("{label}.addr")).display().to_string(),
        "--data-dir".to_owned(),
        data_dir.display().to_string(),
        "--insecure".to_owned(),
        "--no-auth".to_owned(),
    ];
    spawn("weft-coordinator", &args, dir, label)
}

async fn address(child: &mut ChildProcess, dir: &Path, label: &str) -> SocketAddr {
    let file = dir.join(format!("{label}.addr"));
    weft_cluster::wait_for_addr_file(child, &file, default_timeout(), Duration::from_millis(20))
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", child.log_text()))
}

/// Waits for `child` to exit and returns its status code.
async fn exit_code(child: &mut ChildProcess) -> Option<i32> {
    match tokio::time::timeout(default_timeout(), child.wait()).await {
        Ok(Ok(status)) => status.code(),
        Ok(Err(err)) => panic!("waiting for the coordinator: {err}"),
        Err(_) => panic!("the coordinator is still running:\n{}", child.log_tail(30)),
    }
}

/// Copies the files of `from` into `to`, sub-directories too.
fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &to.join(entry.file_name()));
        } else {
            std::fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_exits_74_and_loses_nothing_acknowledged() {
    let dir = tempfile::tempdir().unwrap();
    let mount = dir.path().join("small");
    let _tmpfs = match Tmpfs::mount(&mount, "6m") {
        Ok(tmpfs) => tmpfs,
        Err(why) => {
            println!("skipping: cannot mount a tmpfs here ({why}); the full disk is not tried");
            return;
        }
    };
    let data = mount.join("weft-data");
    let mut child = coordinator(dir.path(), &data, "full");
    let addr = address(&mut child, dir.path(), "full").await;
    let client = Client::connect(&format!("http://{addr}"))
        .await
        .expect("connect");

    // 16 KiB a task: the 6 MiB disk is full after a few hundred.
    let input = vec![b'x'; 16 * 1024];
    let mut acknowledged: Vec<TaskId> = Vec::new();
    let refusal = loop {
        match client.submit(TaskSpec::call("noop", input.clone())).await {
            Ok(id) => acknowledged.push(id),
            Err(err) => break err,
        }
        assert!(acknowledged.len() < 5_000, "the disk never filled up");
    };
    match &refusal {
        ClientError::Unavailable(message) => assert!(
            message.contains("disk is full") && message.contains("not acknowledged"),
            "the refusal does not name the disk: {message}"
        ),
        other => panic!("refused as {other:?}, not UNAVAILABLE"),
    }
    assert!(!acknowledged.is_empty(), "nothing was acknowledged");

    assert_eq!(exit_code(&mut child).await, Some(EXIT_COMMIT_FAILED));
    let log = child.log_text();
    assert!(
        log.contains("the disk is full") && log.contains("Nothing acknowledged was lost"),
        "the exit does not say why:\n{log}"
    );

    // Restart with room: the same files on the ordinary disk.
    let roomy = dir.path().join("roomy");
    std::fs::create_dir_all(&roomy).unwrap();
    copy_dir(&data, &roomy);
    let mut child = coordinator(dir.path(), &roomy, "restarted");
    let addr = address(&mut child, dir.path(), "restarted").await;
    let client = Client::connect(&format!("http://{addr}"))
        .await
        .expect("connect");
    for id in &acknowledged {
        let task = client
            .get(*id)
            .await
            .unwrap_or_else(|e| panic!("acknowledged task {id} lost: {e}"));
        assert_eq!(task.state, TaskState::Queued, "{id}");
    }
    // And it takes new work.
    client
        .submit(TaskSpec::call("noop", "after"))
        .await
        .expect("submit after the restart");
    let _ = child.terminate(Duration::from_secs(10)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_embedded_coordinator_reports_a_full_disk_as_why_it_stopped() {
    let dir = tempfile::tempdir().unwrap();
    let mount = dir.path().join("small");
    let _tmpfs = match Tmpfs::mount(&mount, "4m") {
        Ok(tmpfs) => tmpfs,
        Err(why) => {
            println!("skipping: cannot mount a tmpfs here ({why}); the full disk is not tried");
            return;
        }
    };
    let config = weft_coordinator::CoordinatorConfig {
        data_dir: Some(mount.join("weft-data")),
        tls: None,
        insecure: true,
        auth: false,
        ..weft_coordinator::CoordinatorConfig::default()
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let running = weft_coordinator::start(config, listener)
        .await
        .expect("start");
    let client = Client::connect(&running.url()).await.expect("connect");
    let input = vec![b'x'; 16 * 1024];
    let mut submitted = 0;
    while client
        .submit(TaskSpec::call("noop", input.clone()))
        .await
        .is_ok()
    {
        submitted += 1;
        assert!(submitted < 5_000, "the disk never filled up");
    }
    let stopped = tokio::time::timeout(default_timeout(), running.stopped())
        .await
        .expect("the coordinator keeps running after a failed commit");
    let Err(failure) = stopped else {
        panic!("stopped without a reason");
    };
    assert!(
        matches!(
            &failure,
            weft_coordinator::Failure::Commit(weft_coordinator::store::StoreError::DiskFull { .. })
        ),
        "{failure}"
    );
    assert_eq!(failure.exit_code(), EXIT_COMMIT_FAILED);
    assert!(running.failure().is_some());
    let _ = running.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_emptied_log_is_refused_with_exit_65_not_started_empty() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("weft-data");
    let mut child = coordinator(dir.path(), &data, "first");
    let addr = address(&mut child, dir.path(), "first").await;
    let client = Client::connect(&format!("http://{addr}"))
        .await
        .expect("connect");
    client
        .submit(TaskSpec::call("noop", "kept"))
        .await
        .expect("submit");
    let _ = child.terminate(Duration::from_secs(10)).await;

    // Every segment of the log emptied: the log is gone.
    let file = data.join("log");
    for entry in std::fs::read_dir(&file).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "seg") {
            std::fs::write(&path, b"").unwrap();
        }
    }
    let mut child = coordinator(dir.path(), &data, "emptied");
    assert_eq!(exit_code(&mut child).await, Some(EXIT_DAMAGED));
    let log = child.log_text();
    assert!(
        log.contains(&file.display().to_string())
            && log.contains("holds no log")
            && log.contains("restore"),
        "the refusal does not name the file and the way back:\n{log}"
    );
    let segments: Vec<_> = std::fs::read_dir(&file)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "seg"))
        .collect();
    assert!(
        segments
            .iter()
            .all(|p| std::fs::metadata(p).unwrap().len() == 0),
        "a new log was written over the emptied one: {segments:?}"
    );
}
