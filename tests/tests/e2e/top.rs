//! `weft top`: the real binary in a pseudo-terminal, its screen read back
//! through a terminal emulator (`vt100`), the way a user sees it: the
//! nodes and counts appear, q quits with 0 and gives the terminal back; a
//! coordinator that is down is an error on screen, not an exit; one that
//! moved to the second of two addresses is followed; a refused
//! token at the first poll and a stdout that is no terminal are errors.

use std::io::{Read, Write};
use std::num::NonZeroU16;
use std::path::Path;
use std::sync::{Arc, Mutex};

use portable_pty::{Child, CommandBuilder, PtySize, native_pty_system};

use weft_client::TaskSpec;
use weft_tests::process::bin_path;
use weft_tests::{TestCluster, default_timeout, wait_until};

const ROWS: NonZeroU16 = NonZeroU16::new(40).unwrap();
const COLS: NonZeroU16 = NonZeroU16::new(160).unwrap();

/// `weft` running in a pseudo-terminal, and the screen it drew.
struct Pty {
    child: Box<dyn Child + Send + Sync>,
    screen: Arc<Mutex<vt100::Parser>>,
    keys: Box<dyn Write + Send>,
    /// The reader met the end of the terminal's output.
    read_all: Arc<std::sync::atomic::AtomicBool>,
}

impl Pty {
    /// Starts `weft ARGS` against `url` with `token` and `ca` (the user's
    /// own login context never read).
    fn spawn(url: &str, token: &str, ca: Option<&Path>, args: &[&str]) -> Pty {
        let pair = native_pty_system()
            .openpty(PtySize {
                rows: ROWS.get(),
                cols: COLS.get(),
                pixel_width: 0,
                pixel_height: 0,
            })
            .expect("opening a pseudo-terminal");
        let mut cmd = CommandBuilder::new(bin_path("weft"));
        cmd.args(args);
        cmd.env("WEFT_COORDINATOR", url);
        cmd.env("WEFT_TOKEN", token);
        match ca {
            Some(ca) => cmd.env("WEFT_CA", ca),
            None => cmd.env_remove("WEFT_CA"),
        }
        for unset in ["WEFT_CA_PIN", "WEFT_TOKEN_FILE", "RUST_LOG"] {
            cmd.env_remove(unset);
        }
        cmd.env("XDG_CONFIG_HOME", "/nonexistent/weft-test-config");
        cmd.env("TERM", "xterm-256color");
        let child = pair.slave.spawn_command(cmd).expect("starting weft");
        // Only the child holds the terminal's other end now: its exit is
        // the reader's end of file.
        drop(pair.slave);
        let mut output = pair.master.try_clone_reader().expect("pty reader");
        let keys = pair.master.take_writer().expect("pty writer");
        let screen = Arc::new(Mutex::new(vt100::Parser::new(ROWS, COLS, 0)));
        let parser = Arc::clone(&screen);
        let read_all = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let reader_done = Arc::clone(&read_all);
        // The master must stay open while the child runs; the thread keeps it.
        let master = pair.master;
        std::thread::spawn(move || {
            let _master = master;
            let mut buf = [0u8; 8192];
            while let Ok(n) = output.read(&mut buf) {
                if n == 0 {
                    break;
                }
                parser
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .process(&buf[..n]);
            }
            reader_done.store(true, std::sync::atomic::Ordering::Release);
        });
        Pty {
            child,
            screen,
            keys,
            read_all,
        }
    }

    /// The text on screen, row by row.
    fn text(&self) -> String {
        self.screen
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .screen()
            .contents()
    }

    /// Waits until every one of `needles` is on screen.
    async fn wait_for_text(&self, needles: &[&str]) {
        let found = wait_until(default_timeout(), async || {
            let text = self.text();
            needles.iter().all(|n| text.contains(n))
        })
        .await;
        if found.is_err() {
            panic!("{needles:?} not all on screen:\n{}", self.text());
        }
    }

    fn press(&mut self, keys: &str) {
        self.keys.write_all(keys.as_bytes()).expect("typing");
        self.keys.flush().expect("typing");
    }

    /// Waits for the exit; its code.
    async fn exit_code(&mut self) -> u32 {
        let mut status = None;
        let exited = wait_until(default_timeout(), async || {
            status = self.child.try_wait().expect("waiting for weft");
            status.is_some()
        })
        .await;
        if exited.is_err() {
            let _ = self.child.kill();
            panic!("weft still running:\n{}", self.text());
        }
        // Everything it wrote is on screen once the reader met the end of
        // the terminal's output (the exit closes it).
        let read = wait_until(default_timeout(), async || {
            self.read_all.load(std::sync::atomic::Ordering::Acquire)
        })
        .await;
        assert!(read.is_ok(), "the terminal's output never ended");
        status.map_or(u32::MAX, |s| s.exit_code())
    }

    fn in_alternate_screen(&self) -> bool {
        self.screen
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .screen()
            .alternate_screen()
    }
}

impl Drop for Pty {
    fn drop(&mut self) {
        // A test that failed half way leaves no weft behind.
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
        }
    }
}

/// The row of the tasks box for `state`, as drawn: the name padded to its
/// column, then the count.
fn task_row(state: &str, count: u64) -> String {
    // The final states' column is as wide as its longest, upstream_failed.
    format!("{state:<15} {count}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weft_top_shows_nodes_and_counts_and_quits_on_q() {
    let cluster = TestCluster::builder().nodes(2).start().await;
    let client = cluster.client().await;
    for _ in 0..3 {
        let id = client.submit(TaskSpec::call("noop", "")).await.unwrap();
        client.wait(id).await.unwrap();
    }
    let mut names = cluster.node_names();
    names.sort();
    let mut top = Pty::spawn(
        &cluster.url(),
        &cluster.admin_token(),
        cluster.ca_file(),
        &["top", "--interval", "200ms"],
    );
    let done = task_row("succeeded", 3);
    top.wait_for_text(&[
        &names[0],
        &names[1],
        &done,
        "2 nodes connected",
        "nodes: 2",
        "throughput:",
    ])
    .await;
    assert!(top.in_alternate_screen(), "{}", top.text());

    // Live: a task finished now shows without a restart.
    let id = client.submit(TaskSpec::call("noop", "")).await.unwrap();
    client.wait(id).await.unwrap();
    top.wait_for_text(&[&task_row("succeeded", 4)]).await;
    // The finished-tasks counter the throughput comes from.
    top.wait_for_text(&["finished since the coordinator started: 4"])
        .await;

    top.press("q");
    assert_eq!(top.exit_code().await, 0, "{}", top.text());
    assert!(!top.in_alternate_screen(), "the terminal is given back");
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weft_top_shows_an_unreachable_coordinator_and_keeps_polling() {
    let cluster = TestCluster::builder().nodes(0).start().await;
    // A port nothing listens on: bound, then let go.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    let scheme = match cluster.ca_file() {
        Some(_) => "https",
        None => "http",
    };
    let url = format!("{scheme}://127.0.0.1:{port}");
    let mut top = Pty::spawn(
        &url,
        &cluster.admin_token(),
        cluster.ca_file(),
        &["top", "--interval", "100ms"],
    );
    top.wait_for_text(&["error: cannot reach coordinator", "retrying every 100ms"])
        .await;
    // Esc quits too.
    top.press("\x1b");
    assert_eq!(top.exit_code().await, 0, "{}", top.text());
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weft_top_given_two_addresses_follows_the_coordinator_that_took_over() {
    let cluster = TestCluster::builder()
        .processes()
        .durable()
        .nodes(0)
        .start()
        .await;
    let standby = weft_tests::spare_addr();
    let both = format!("{},{}", cluster.url(), cluster.url_at(standby));
    let mut top = Pty::spawn(
        &both,
        &cluster.admin_token(),
        cluster.ca_file(),
        &["top", "--interval", "100ms"],
    );
    let queued = |count: u64| format!("{:<9} {count}", "queued");
    top.wait_for_text(&[&queued(0), "0 nodes connected"]).await;
    cluster.crash_and_move_coordinator(standby).await;
    // A task queued (no node runs it) at the coordinator that took over:
    // on screen only if `top` polls that one now.
    let client = cluster.client().await;
    client
        .submit(TaskSpec::exec(["true"]))
        .await
        .expect("submit after the move");
    top.wait_for_text(&[&queued(1)]).await;
    top.press("q");
    assert_eq!(top.exit_code().await, 0, "{}", top.text());
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weft_top_with_a_refused_token_exits_with_the_permission_code() {
    let cluster = TestCluster::builder().nodes(0).start().await;
    let mut top = Pty::spawn(
        &cluster.url(),
        "weft_nosuchtoken_secret",
        cluster.ca_file(),
        &["top"],
    );
    let code = top.exit_code().await;
    // The reader may still be taking in the last bytes.
    top.wait_for_text(&["weft: error:"]).await;
    assert_eq!(code, 77, "{}", top.text());
    assert!(!top.in_alternate_screen());
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weft_top_without_a_terminal_or_as_json_points_to_info_and_nodes_json() {
    let cluster = TestCluster::builder().nodes(0).start().await;
    let out = cluster.weft(&["top"]).await;
    assert_ne!(out.code, Some(0), "{out}");
    assert!(
        out.stderr.contains("needs a terminal")
            && out.stderr.contains("weft info -o json")
            && out.stderr.contains("weft nodes -o json"),
        "{out}"
    );
    let out = cluster.weft(&["-o", "json", "top"]).await;
    assert_eq!(out.code, Some(2), "{out}");
    assert!(out.stderr.contains("no JSON form"), "{out}");
    let out = cluster.weft(&["top", "--interval", "0s"]).await;
    assert_eq!(out.code, Some(2), "{out}");
    assert!(out.stderr.contains("100ms to 10m"), "{out}");
    cluster.shutdown().await;
}
