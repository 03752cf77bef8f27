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
use weft_node::guard::guard_args;

mod common;

const WEFT_NODE: &str = env!("CARGO_BIN_EXE_weft-node");

/// Runs `argv` under a guard whose parent is this test process.
fn guarded(argv: &[&str], stdin: &[u8]) -> Output {
    let argv: Vec<String> = argv.iter().map(|a| (*a).to_owned()).collect();
    let mut child = Command::new(WEFT_NODE)
        .args(guard_args(std::process::id(), &argv))
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
fn stdio_and_the_exit_code_pass_through() {
    let out = guarded(&["sh", "-c", "cat; echo err >&2; exit 7"], b"fed in");
    assert_eq!(out.status.code(), Some(7), "{out:?}");
    assert_eq!(out.stdout, b"fed in");
    assert_eq!(out.stderr, b"err\n");
}

#[test]
fn a_program_killed_by_a_signal_kills_its_guard_with_the_same_signal() {
    // SIGTERM is one the guard waits for itself: it must still die of it.
    for signal in [Signal::SIGTERM, Signal::SIGSEGV] {
        let script = format!("kill -{} $$", signal.as_str().trim_start_matches("SIG"));
        let out = guarded(&["sh", "-c", &script], b"");
        assert_eq!(out.status.signal(), Some(signal as i32), "{out:?}");
    }
}

#[test]
fn the_program_starts_with_no_blocked_signals() {
    let out = guarded(&["sh", "-c", "grep SigBlk /proc/self/status"], b"");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "SigBlk:\t0000000000000000"
    );
}

#[test]
fn a_missing_program_exits_127_with_the_reason() {
    let out = guarded(&["/weft/no/such/program"], b"");
    assert_eq!(out.status.code(), Some(127), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("cannot start \"/weft/no/such/program\""),
        "{stderr}"
    );
}

#[test]
fn sigterm_sent_to_the_guard_reaches_the_program() {
    let argv = [
        "sh",
        "-c",
        "trap 'echo got TERM; exit 3' TERM; echo ready; while :; do sleep 0.05; done",
    ]
    .map(str::to_owned);
    let mut child = Command::new(WEFT_NODE)
        .args(guard_args(std::process::id(), &argv))
        .process_group(0)
        .stdout(Stdio::piped())
        .spawn()
        .expect("starting weft-node as a guard");
    let mut stdout = BufReader::new(child.stdout.take().expect("stdout is piped"));
    let mut line = String::new();
    stdout
        .read_line(&mut line)
        .expect("reading the program's output");
    assert_eq!(line, "ready\n");
    let guard = Pid::from_raw(i32::try_from(child.id()).unwrap());
    kill(guard, Signal::SIGTERM).expect("signalling the guard");
    line.clear();
    stdout
        .read_line(&mut line)
        .expect("reading the program's output");
    assert_eq!(line, "got TERM\n");
    assert_eq!(child.wait().unwrap().code(), Some(3));
}

#[test]
fn when_its_parent_is_killed_the_guard_kills_the_program_and_its_children() {
    // The parent: a shell that starts the guard and waits. The program
    // prints its own pid and a background child's.
    let script = format!(
        "{WEFT_NODE} __weft-exec-guard $$ -- sh -c 'sleep 300 & echo $$ $!; wait' & echo $!; wait"
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
