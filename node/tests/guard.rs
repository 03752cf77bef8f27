//! The exec guard as `weft-node` starts it: a real `weft-node` process in
//! guard mode between a parent and a program. What passes through it
//! (stdio, exit code, death by signal, signals sent to it) and what it does
//! when its parent is killed outright: kill the program and everything the
//! program started.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use common::process_is_gone;
use weft_node::guard::{START_FAILED_PREFIX, guard_args};

mod common;

const WEFT_NODE: &str = env!("CARGO_BIN_EXE_weft-node");

/// The guard's arguments for `argv` (program looked up in PATH) with
/// `env` added, parent this test process.
fn args(argv: &[&str], env: &[(&str, &str)]) -> Vec<std::ffi::OsString> {
    let argv: Vec<String> = argv.iter().map(|a| (*a).to_owned()).collect();
    let path = std::env::split_paths(&std::env::var_os("PATH").unwrap())
        .map(|dir| dir.join(&argv[0]))
        .find(|p| p.is_file())
        .unwrap_or_else(|| argv[0].clone().into());
    let env: Vec<(String, String)> = env
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    guard_args(
        std::process::id(),
        &path,
        env.iter().map(|(k, v)| (k, v)),
        &argv,
    )
}

/// Runs `argv` under a guard and waits for it.
fn guarded(argv: &[&str], env: &[(&str, &str)], stdin: &[u8]) -> Output {
    let mut child = Command::new(WEFT_NODE)
        .args(args(argv, env))
        .process_group(0)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting weft-node as a guard");
    child
        .stdin
        .take()
        .expect("stdin is piped")
        .write_all(stdin)
        .expect("writing the guard's stdin");
    child.wait_with_output().expect("waiting for the guard")
}

fn assert_gone_soon(pid: u32, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !process_is_gone(pid) {
        assert!(Instant::now() < deadline, "{what} (pid {pid}) still runs");
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn stdio_environment_and_the_exit_code_pass_through() {
    let script = "cat; echo \"$WEFT_GUARD_TEST\"; echo err >&2; exit 7";
    let out = guarded(
        &["sh", "-c", script],
        &[("WEFT_GUARD_TEST", "from the task")],
        b"fed in ",
    );
    assert_eq!(out.status.code(), Some(7), "{out:?}");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "fed in from the task\n"
    );
    assert_eq!(out.stderr, b"err\n");
}

#[test]
fn the_tasks_environment_is_not_the_guards() {
    // A preload that cannot load would make the loader complain in every
    // process it applies to: only the program's stderr may show it.
    let out = guarded(
        &["sh", "-c", "exit 0"],
        &[("LD_PRELOAD", "/nonexistent/weft-preload.so")],
        b"",
    );
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.matches("weft-preload.so").count() <= 1, "{stderr}");
}

#[test]
fn a_program_killed_by_a_signal_kills_its_guard_with_the_same_signal() {
    // SIGTERM is blocked in the guard, SIGSEGV caught by the Rust runtime,
    // SIGPIPE ignored by it: each must still come through.
    for signal in [Signal::SIGTERM, Signal::SIGSEGV, Signal::SIGPIPE] {
        let script = format!("kill -{} $$", signal.as_str().trim_start_matches("SIG"));
        let out = guarded(&["sh", "-c", &script], &[], b"");
        assert_eq!(out.status.signal(), Some(signal as i32), "{out:?}");
    }
}

#[test]
fn the_program_starts_with_no_blocked_signals() {
    let out = guarded(&["sh", "-c", "grep SigBlk /proc/self/status"], &[], b"");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "SigBlk:\t0000000000000000"
    );
}

#[test]
fn a_program_that_cannot_be_started_exits_127_with_one_line_saying_why() {
    let dir = tempfile::tempdir().unwrap();
    let not_a_program = dir.path().join("not-a-program");
    std::fs::write(&not_a_program, [0x7f, b'E', b'L', b'F', 0, 0, 0, 0]).unwrap();
    std::fs::set_permissions(
        &not_a_program,
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    for program in [
        "/weft/no/such/program",
        &not_a_program.display().to_string(),
    ] {
        let out = guarded(&[program], &[], b"");
        assert_eq!(out.status.code(), Some(127), "{out:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.starts_with(START_FAILED_PREFIX), "{stderr}");
        assert_eq!(stderr.lines().count(), 1, "{stderr}");
    }
}

/// Starts `sh -c SCRIPT` under a guard (stdin and stdout piped); answers
/// the child and a reader of its stdout once the script printed `ready`
/// (so the guard has blocked its signals).
fn started(script: &str) -> (std::process::Child, BufReader<std::process::ChildStdout>) {
    let mut child = Command::new(WEFT_NODE)
        .args(args(&["sh", "-c", script], &[]))
        .process_group(0)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("starting weft-node as a guard");
    let mut stdout = BufReader::new(child.stdout.take().expect("stdout is piped"));
    let mut line = String::new();
    stdout
        .read_line(&mut line)
        .expect("reading the program's output");
    assert_eq!(line, "ready\n");
    (child, stdout)
}

#[test]
fn a_signal_to_the_process_group_reaches_the_program_once() {
    let script = "n=0; trap 'n=$((n+1)); echo INT $n' INT; trap 'exit 3' TERM; \
                  echo ready; while :; do sleep 0.05; done";
    let (mut child, mut stdout) = started(script);
    let group = Pid::from_raw(-i32::try_from(child.id()).unwrap());
    kill(group, Signal::SIGINT).expect("signalling the group");
    let mut line = String::new();
    stdout
        .read_line(&mut line)
        .expect("reading the program's output");
    assert_eq!(line, "INT 1\n");
    kill(group, Signal::SIGTERM).expect("signalling the group");
    assert_eq!(child.wait().unwrap().code(), Some(3), "no second INT first");
    line.clear();
    stdout.read_line(&mut line).expect("reading to the end");
    assert_eq!(line, "", "nothing after the first INT");
}

/// The signals pending for `pid` as a whole process (`ShdPnd`).
fn pending_signals(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("ShdPnd:")).unwrap();
    u64::from_str_radix(line["ShdPnd:".len()..].trim(), 16).unwrap()
}

#[test]
fn a_signal_to_the_guard_alone_does_not_stop_the_task() {
    let (mut child, mut stdout) = started("echo ready; read line; echo \"got $line\"");
    let pid = child.id();
    let guard = Pid::from_raw(i32::try_from(pid).unwrap());
    for signal in [
        Signal::SIGTERM,
        Signal::SIGHUP,
        Signal::SIGUSR1,
        Signal::SIGALRM,
    ] {
        kill(guard, signal).expect("signalling the guard");
    }
    // The guard has taken them all (none pending) and is still there.
    let deadline = Instant::now() + Duration::from_secs(5);
    while pending_signals(pid) != 0 {
        assert!(
            Instant::now() < deadline,
            "the guard never took its signals"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let mut stdin = child.stdin.take().expect("stdin is piped");
    stdin.write_all(b"on\n").expect("the program still reads");
    drop(stdin);
    let mut line = String::new();
    stdout
        .read_line(&mut line)
        .expect("reading the program's output");
    assert_eq!(line, "got on\n");
    assert_eq!(child.wait().unwrap().code(), Some(0));
}

#[test]
fn when_its_parent_is_killed_the_guard_kills_the_program_and_its_children() {
    // The parent: a shell that starts the guard and waits. The program
    // prints its own pid and a background child's.
    let script = format!(
        "{WEFT_NODE} __weft-exec-guard $$ /bin/sh -- sh -c 'sleep 300 & echo $$ $!; wait' & echo $!; wait"
    );
    let mut parent = Command::new("sh")
        .args(["-c", &script])
        .stdout(Stdio::piped())
        .spawn()
        .expect("starting the parent shell");
    let mut stdout = BufReader::new(parent.stdout.take().expect("stdout is piped"));
    let mut pids = Vec::new();
    for _ in 0..2 {
        let mut line = String::new();
        stdout.read_line(&mut line).expect("reading pids");
        pids.extend(line.split_whitespace().map(|p| p.parse::<u32>().unwrap()));
    }
    assert_eq!(pids.len(), 3, "guard, program, grandchild: {pids:?}");
    for pid in &pids {
        assert!(
            !process_is_gone(*pid),
            "pid {pid} runs before the parent dies"
        );
    }

    parent.kill().expect("SIGKILL the parent");
    parent.wait().expect("reaping the parent");
    for pid in pids {
        assert_gone_soon(pid, "the guard, the program or its child");
    }
}
