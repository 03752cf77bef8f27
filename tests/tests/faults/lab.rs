//! The network lab: five hosts made by `netns-lab.sh`, and running one
//! scenario from inside the client host.
//!
//! The test process starts in the root network namespace, which cannot
//! reach lab addresses. So [`run_scenario`] (the *outer* run) takes the
//! lab lock, builds the lab, and runs this same test executable again as
//! `ip netns exec fab-h5 <test-exe> <scenario> --nocapture` (the *inner*
//! run, marked by `WEFT_FAULTS_INNER=1`), which executes the scenario body
//! with a real client on `10.231.0.5`. The outer run tears the lab down
//! afterwards, also when the scenario panics (a `Drop` guard).
//!
//! Hosts: `fab-h1` coordinator, `fab-h2`..`fab-h4` nodes, `fab-h5` client;
//! for the scenarios with several coordinators, `fab-h6` PostgreSQL and
//! `fab-h7`, `fab-h8` more coordinators.
//! Lab namespace names are global, so scenarios take [`LAB_LOCK`] and the
//! lab's lock file ([`LAB_LOCK_FILE`]) and never overlap, within one test
//! process or across several (`cargo nextest` runs each test in its own). Nothing here may run without root: the outer run skips (and
//! passes) with a `skipped: ...` line on stderr where it is not root, the
//! script is missing, or `netns-lab.sh up` fails.

use std::future::Future;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use weft_tests::process::{bin_dir, bin_path};

/// The host running the coordinator.
pub const COORDINATOR_HOST: u8 = 1;
/// The hosts running one node each.
pub const NODE_HOSTS: [u8; 3] = [2, 3, 4];
/// The host the scenario itself (the client side) runs in.
pub const CLIENT_HOST: u8 = 5;
/// Hosts the lab is built with.
const HOSTS: u8 = 8;
/// Set in the inner run, which executes the scenario body.
const INNER_ENV: &str = "WEFT_FAULTS_INNER";
/// Overrides where `netns-lab.sh` is.
const SCRIPT_ENV: &str = "WEFT_NETNS_LAB";
/// The longest one scenario may take before the outer run kills it.
const SCENARIO_LIMIT: Duration = Duration::from_secs(300);

/// Serializes scenarios in this process: the lab's names are global.
static LAB_LOCK: Mutex<()> = Mutex::new(());

/// Serializes scenarios across processes: an exclusive lock on this file
/// is held for as long as a scenario has the lab.
const LAB_LOCK_FILE: &str = "/tmp/weft-fault-lab.lock";

/// The inner run's panic message, repeated after the host logs (which
/// follow it and can push it out of a CI log's tail).
static FAILURE: Mutex<Option<String>> = Mutex::new(None);

/// The scenario's panic message, if it panicked.
pub fn failure() -> Option<String> {
    FAILURE
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .clone()
}

/// Writes one line to the process's stderr directly, past libtest's
/// output capture, so skips and figures show in CI logs without
/// `--nocapture`.
pub fn say(line: &str) {
    let _ = writeln!(std::io::stderr().lock(), "{line}");
}

/// The lab host's namespace name (`fab-h2`).
pub fn namespace(host: u8) -> String {
    format!("fab-h{host}")
}

/// The lab host's IPv4 address (`10.231.0.2`).
pub fn address(host: u8) -> String {
    format!("10.231.0.{host}")
}

/// `netns-lab.sh`: `WEFT_NETNS_LAB`, else `<workspace root>/../shared/`.
fn script() -> PathBuf {
    if let Some(path) = std::env::var_os(SCRIPT_ENV) {
        return PathBuf::from(path);
    }
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap_or(Path::new(env!("CARGO_MANIFEST_DIR")));
    workspace.join("..").join("shared").join("netns-lab.sh")
}

/// Runs `netns-lab.sh ARGS` and answers its status and combined output.
fn lab_command(script: &Path, args: &[&str]) -> (ExitStatus, String) {
    let out = Command::new("bash")
        .arg(script)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("running {} {args:?}: {e}", script.display()));
    let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&out.stderr));
    (out.status, text)
}

/// Runs `netns-lab.sh ARGS` from inside a scenario, failing it on error.
fn lab_must(args: &[&str]) {
    let (status, text) = lab_command(&script(), args);
    assert!(status.success(), "netns-lab.sh {args:?} failed: {text}");
}

/// Cuts `host` off from every other lab host (packets dropped silently).
pub fn partition(host: u8) {
    lab_must(&["partition", &format!("h{host}")]);
}

/// Undoes [`partition`] for `host`.
pub fn heal(host: u8) {
    lab_must(&["heal", &format!("h{host}")]);
}

/// True when this process runs as root (effective uid 0).
fn is_root() -> bool {
    // `nix::unistd::geteuid` needs nix's `user` feature, which the
    // workspace does not enable; /proc says the same.
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            let line = status.lines().find(|l| l.starts_with("Uid:"))?;
            line.split_whitespace().nth(2).map(|euid| euid == "0")
        })
        .unwrap_or(false)
}

/// A built lab; tears it down when dropped (also while unwinding).
struct Lab {
    script: PathBuf,
}

impl Lab {
    /// Builds a fresh lab, or says why not (the scenario is skipped).
    fn up() -> Result<Lab, String> {
        if !is_root() {
            return Err("not running as root (the netns lab needs root)".to_owned());
        }
        let script = script();
        if !script.is_file() {
            return Err(format!(
                "{} not found (set {SCRIPT_ENV} to netns-lab.sh)",
                script.display()
            ));
        }
        let probe = Command::new("ip")
            .args(["netns", "list"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        if !probe.is_ok_and(|s| s.success()) {
            return Err(
                "`ip netns list` failed: iproute2 or network namespaces are unavailable".to_owned(),
            );
        }
        // Left over from a crashed run: start clean.
        let _ = lab_command(&script, &["teardown"]);
        let lab = Lab { script };
        let (status, text) = lab_command(&lab.script, &["up", &HOSTS.to_string()]);
        if !status.success() {
            return Err(format!("`netns-lab.sh up {HOSTS}` failed: {}", text.trim()));
        }
        Ok(lab)
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        let (status, text) = lab_command(&self.script, &["teardown"]);
        if !status.success() {
            say(&format!("netns-lab.sh teardown failed: {}", text.trim()));
        }
    }
}

/// Runs scenario `name` (the `#[test]` function's name, unique in this
/// target: the inner run filters on it) with `body` executed inside the
/// client host. See the module docs.
pub fn run_scenario<F, Fut>(name: &str, body: F)
where
    F: FnOnce() -> Fut,
    Fut: Future<Output = ()>,
{
    if std::env::var_os(INNER_ENV).is_some() {
        let default_hook = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            *FAILURE.lock().unwrap_or_else(PoisonError::into_inner) = Some(info.to_string());
            default_hook(info);
        }));
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(4)
            .enable_all()
            .build()
            .expect("building the scenario's tokio runtime");
        runtime.block_on(body());
        return;
    }

    // Missing binaries are a failure with the fix, not a skip.
    for bin in ["weft-coordinator", "weft-node"] {
        bin_path(bin);
    }
    let _serial = LAB_LOCK.lock().unwrap_or_else(PoisonError::into_inner);
    // Closing the file (at the end of this function) lets the lock go.
    let _lab_file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(LAB_LOCK_FILE)
        .and_then(|file| file.lock().map(|()| file))
        .unwrap_or_else(|err| panic!("locking {LAB_LOCK_FILE}: {err}"));
    let lab = match Lab::up() {
        Ok(lab) => lab,
        Err(why) => {
            say(&format!("skipped: fault scenario {name}: {why}"));
            return;
        }
    };
    let exe = std::env::current_exe().expect("the test executable has a path");
    // The inner run's stdout holds only libtest's own report ("running 1
    // test ... 1 passed; 3 filtered out"), which would repeat once per
    // scenario in the outer run's log: keep it in a file and show it only
    // when the scenario fails. Its stderr (figures, skips, panics, host
    // logs) goes straight through.
    let report = tempfile::NamedTempFile::new().expect("creating a file for the inner report");
    let report_out = report
        .reopen()
        .expect("opening the inner report file for writing");
    let mut child = Command::new("ip")
        .args(["netns", "exec", &namespace(CLIENT_HOST)])
        .arg(&exe)
        .args([name, "--nocapture", "--test-threads=1"])
        .env(INNER_ENV, "1")
        .env(SCRIPT_ENV, &lab.script)
        .env("WEFT_BIN_DIR", bin_dir())
        .stdin(Stdio::null())
        .stdout(Stdio::from(report_out))
        .spawn()
        .unwrap_or_else(|e| panic!("starting scenario {name} inside fab-h{CLIENT_HOST}: {e}"));
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("waiting for the scenario process") {
            break status;
        }
        if started.elapsed() > SCENARIO_LIMIT {
            let _ = child.kill();
            let _ = child.wait();
            panic!("scenario {name} still running after {SCENARIO_LIMIT:?}; killed");
        }
        // Polling a child process with a deadline: there is no state to
        // observe but its exit.
        std::thread::sleep(Duration::from_millis(100));
    };
    drop(lab);
    if !status.success() {
        let text = std::fs::read_to_string(report.path()).unwrap_or_default();
        say(&format!("inner run of {name}:\n{}", text.trim_end()));
    }
    assert!(
        status.success(),
        "scenario {name} failed inside fab-h{CLIENT_HOST} ({status}); its output is above"
    );
}
