//! The reaper as `weft-node` starts it: a real `weft-node __weft-reaper`
//! process fed `+PGID` / `-PGID` lines. When its input ends (the node
//! closed it, or died), the groups still registered are killed, everything
//! in them included; groups it was told are gone are left alone.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::process_is_gone;
use weft_node::reaper::REAPER_ARG;

const WEFT_NODE: &str = env!("CARGO_BIN_EXE_weft-node");

/// A task-like process group: `sh` leading its own group with a
/// background child. Answers the shell and both pids.
fn task_group() -> (Child, u32, u32) {
    let mut shell = Command::new("sh")
        .args(["-c", "sleep 300 & echo $!; wait"])
        .process_group(0)
        .stdout(Stdio::piped())
        .spawn()
        .expect("starting a task-like group");
    let mut line = String::new();
    BufReader::new(shell.stdout.take().expect("stdout is piped"))
        .read_line(&mut line)
        .expect("reading the background pid");
    let background = line.trim().parse().expect("a pid");
    let leader = shell.id();
    (shell, leader, background)
}

fn assert_gone_soon(pid: u32) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !process_is_gone(pid) {
        assert!(Instant::now() < deadline, "process {pid} still runs");
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn at_the_end_of_its_input_the_reaper_kills_the_groups_still_registered() {
    let mut reaper = Command::new(WEFT_NODE)
        .arg(REAPER_ARG)
        .stdin(Stdio::piped())
        .spawn()
        .expect("starting weft-node as a reaper");
    let (mut kept, kept_leader, kept_child) = task_group();
    let (mut gone, gone_leader, gone_child) = task_group();
    let mut input = reaper.stdin.take().expect("stdin is piped");
    writeln!(input, "+{kept_leader}\n+{gone_leader}\n-{gone_leader}").unwrap();
    drop(input); // as when the node dies
    assert!(reaper.wait().unwrap().success());

    let status = kept.wait().expect("reaping the killed shell");
    assert_eq!(
        status.signal(),
        Some(9),
        "the leader was SIGKILLed: {status:?}"
    );
    assert_gone_soon(kept_child);
    assert!(
        !process_is_gone(gone_child) && !process_is_gone(gone_leader),
        "a group the node said was gone is not the reaper's"
    );
    let _ = nix::sys::signal::killpg(
        nix::unistd::Pid::from_raw(i32::try_from(gone_leader).unwrap()),
        nix::sys::signal::Signal::SIGKILL,
    );
    gone.wait().expect("reaping the shell");
}

#[test]
fn a_stray_sigterm_does_not_stop_the_reaper() {
    let mut reaper = Command::new(WEFT_NODE)
        .arg(REAPER_ARG)
        .stdin(Stdio::piped())
        .spawn()
        .expect("starting weft-node as a reaper");
    let pid = reaper.id();
    // Ready once it has blocked the stray signals.
    let blocked = || {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        let line = status.lines().find(|l| l.starts_with("SigBlk:")).unwrap();
        u64::from_str_radix(line["SigBlk:".len()..].trim(), 16).unwrap() != 0
    };
    let deadline = Instant::now() + Duration::from_secs(5);
    while !blocked() {
        assert!(Instant::now() < deadline, "the reaper never got ready");
        std::thread::sleep(Duration::from_millis(5));
    }
    let (mut task, leader, child) = task_group();
    let reaper_pid = nix::unistd::Pid::from_raw(i32::try_from(pid).unwrap());
    nix::sys::signal::kill(reaper_pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    let mut input = reaper.stdin.take().expect("stdin is piped");
    writeln!(input, "+{leader}").expect("the reaper still reads");
    drop(input);
    assert!(
        reaper.wait().unwrap().success(),
        "it ended at EOF, not by SIGTERM"
    );
    assert_eq!(task.wait().unwrap().signal(), Some(9));
    assert_gone_soon(child);
}
