//! The exec guard: a small process between `weft-node` and each exec
//! task, so a node that dies without cleaning up (SIGKILL, the OOM killer)
//! takes its tasks' processes with it instead of leaving them running
//! while the coordinator gives the same tasks to another node.
//!
//! `weft-node` starts an exec task as `weft-node __weft-exec-guard PID --
//! ARGV...` (the guard is the leader of the task's process group; the
//! node's cancel, timeout and drain still `killpg` that group). The guard:
//! 1. asks the kernel for a signal when its parent dies (`PR_SET_PDEATHSIG`),
//!    and checks the parent `PID` is still its parent (it may have died
//!    already); leads its own process group;
//! 2. starts ARGV as a child in that group, with the same stdin, stdout,
//!    stderr, environment and directory, no blocked signals and SIGPIPE at
//!    its default;
//! 3. waits: when the child exits, exits the same way (same code, or
//!    killed by the same signal); when the parent dies, SIGKILLs the whole
//!    group, grandchildren included; a SIGTERM/SIGINT/SIGHUP/SIGQUIT/
//!    SIGUSR1/SIGUSR2 sent to the guard is passed on to the child.
//!
//! It runs before any runtime or thread exists: the signals it waits for
//! are blocked and taken with `sigwait`, so no handler is installed.
//!
//! The kernel sends the parent-death signal when the *thread* that started
//! the guard ends, so the node starts guards from its runtime's worker
//! threads, which live as long as the node.

use std::ffi::{CString, OsString};
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};

use nix::errno::Errno;
use nix::spawn::{PosixSpawnAttr, PosixSpawnFileActions, PosixSpawnFlags, posix_spawnp};
use nix::sys::prctl;
use nix::sys::signal::{SigSet, SigmaskHow, Signal, kill, killpg, pthread_sigmask, raise};
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::{Pid, getpgrp, getppid, setpgid};

/// The first argument that makes `weft-node` a guard.
pub const GUARD_ARG: &str = "__weft-exec-guard";

/// Exit code when the program could not be started (as a shell does).
const CANNOT_START: u8 = 127;

/// What the kernel sends when the node thread that started the guard ends
/// (the node died: its threads all end). Not SIGTERM: by the time one
/// thread of a dying node has ended the others may not have, so the guard
/// could not tell the parent's death from a SIGTERM sent by someone else.
/// SIGSTKFLT is unused on Linux: nobody else sends it.
const PARENT_DIED: Signal = Signal::SIGSTKFLT;

/// Signals sent to the guard that are passed on to the child.
const FORWARDED: [Signal; 6] = [
    Signal::SIGTERM,
    Signal::SIGINT,
    Signal::SIGHUP,
    Signal::SIGQUIT,
    Signal::SIGUSR1,
    Signal::SIGUSR2,
];

/// The command line that runs `argv` under a guard whose parent is
/// `parent` (the node's pid): arguments for the node's own executable.
pub fn guard_args(parent: u32, argv: &[String]) -> Vec<OsString> {
    let mut args = vec![GUARD_ARG.into(), parent.to_string().into(), "--".into()];
    args.extend(argv.iter().map(OsString::from));
    args
}

/// Set once `main` has called [`run_if_guard`]: this executable can act
/// as a guard.
static HOOKED: AtomicBool = AtomicBool::new(false);

/// If this process was started as a guard (`args[1] == GUARD_ARG`), runs
/// it to the end and answers its exit code; `None` otherwise. Call first
/// thing in `main`, before any thread is started; a binary that does can
/// start its exec tasks through itself ([`self_as_guard`]).
pub fn run_if_guard() -> Option<ExitCode> {
    let mut args = std::env::args_os().skip(1);
    if args.next().is_none_or(|first| first != GUARD_ARG) {
        HOOKED.store(true, Ordering::Relaxed);
        return None;
    }
    let parent = args
        .next()
        .and_then(|p| p.to_str()?.parse::<i32>().ok())
        .filter(|p| *p > 0);
    let (Some(parent), Some(separator)) = (parent, args.next()) else {
        eprintln!("weft-node: usage: weft-node {GUARD_ARG} PARENT_PID -- PROGRAM [ARGS...]");
        return Some(ExitCode::from(2));
    };
    let argv: Vec<OsString> = args.collect();
    if separator != "--" || argv.is_empty() {
        eprintln!("weft-node: usage: weft-node {GUARD_ARG} PARENT_PID -- PROGRAM [ARGS...]");
        return Some(ExitCode::from(2));
    }
    Some(guard(Pid::from_raw(parent), &argv))
}

/// This executable as the exec guard for [`NodeConfig::exec_guard`](crate::NodeConfig::exec_guard),
/// if its `main` called [`run_if_guard`]; `None` otherwise (a test binary,
/// an embedding program). `/proc/self/exe` names the running executable
/// even if its file was replaced since.
pub fn self_as_guard() -> Option<PathBuf> {
    HOOKED
        .load(Ordering::Relaxed)
        .then(|| PathBuf::from("/proc/self/exe"))
}

fn guard(parent: Pid, argv: &[OsString]) -> ExitCode {
    let mut waited = SigSet::empty();
    waited.add(Signal::SIGCHLD);
    waited.add(PARENT_DIED);
    for signal in FORWARDED {
        waited.add(signal);
    }
    // Blocked before anything can arrive, and taken with sigwait below.
    if let Err(err) = waited.thread_block() {
        eprintln!("weft-node: exec guard: blocking signals: {err}");
        return ExitCode::from(CANNOT_START);
    }
    if let Err(err) = prctl::set_pdeathsig(PARENT_DIED) {
        eprintln!("weft-node: exec guard: PR_SET_PDEATHSIG: {err}");
        return ExitCode::from(CANNOT_START);
    }
    if getppid() != parent {
        // The node died before the line above: nothing to run for.
        return ExitCode::from(CANNOT_START);
    }
    // The node starts it leading its own group already; started any other
    // way, it makes one, so "the group" is never its parent's.
    if let Err(err) = setpgid(Pid::from_raw(0), Pid::from_raw(0)) {
        eprintln!("weft-node: exec guard: setpgid: {err}");
        return ExitCode::from(CANNOT_START);
    }
    let child = match spawn(argv) {
        Ok(child) => child,
        Err(why) => {
            eprintln!(
                "weft-node: cannot start {:?}: {why}",
                argv[0].to_string_lossy()
            );
            return ExitCode::from(CANNOT_START);
        }
    };
    loop {
        let signal = match waited.wait() {
            Ok(signal) => signal,
            Err(err) => {
                eprintln!("weft-node: exec guard: sigwait: {err}");
                kill_group_and_exit(child);
            }
        };
        if signal == Signal::SIGCHLD {
            if let Some(code) = child_ended(child, &waited) {
                return code;
            }
        } else if signal == PARENT_DIED {
            kill_group_and_exit(child);
        } else {
            let _ = kill(child, signal);
        }
    }
}

/// Starts `argv` (looked up in `PATH`) in this process group, with this
/// process's stdio, environment and directory, and the state a freshly
/// started program expects: no blocked signals, SIGPIPE at its default
/// (the Rust runtime ignores it here).
fn spawn(argv: &[OsString]) -> Result<Pid, String> {
    let cstring = |s: &std::ffi::OsStr| {
        CString::new(s.as_bytes()).map_err(|_| format!("{s:?} contains a NUL byte"))
    };
    let args = argv
        .iter()
        .map(|a| cstring(a))
        .collect::<Result<Vec<_>, _>>()?;
    let env = std::env::vars_os()
        .map(|(key, value)| {
            let mut pair = key;
            pair.push("=");
            pair.push(value);
            cstring(&pair)
        })
        .collect::<Result<Vec<_>, _>>()?;
    let attr = || -> Result<PosixSpawnAttr, Errno> {
        let mut attr = PosixSpawnAttr::init()?;
        attr.set_sigmask(&SigSet::empty())?;
        let mut default = SigSet::empty();
        default.add(Signal::SIGPIPE);
        attr.set_sigdefault(&default)?;
        attr.set_flags(
            PosixSpawnFlags::POSIX_SPAWN_SETSIGMASK | PosixSpawnFlags::POSIX_SPAWN_SETSIGDEF,
        )?;
        Ok(attr)
    };
    let attr = attr().map_err(|err| format!("posix_spawn attributes: {err}"))?;
    let actions = PosixSpawnFileActions::init().map_err(|err| format!("posix_spawn: {err}"))?;
    posix_spawnp(&args[0], &actions, &attr, &args, &env)
        .map_err(|err| std::io::Error::from(err).to_string())
}

/// After a SIGCHLD: if the child ended, ends this process the same way.
fn child_ended(child: Pid, waited: &SigSet) -> Option<ExitCode> {
    let raw = match waitpid(child, Some(WaitPidFlag::WNOHANG)) {
        Ok(WaitStatus::Exited(_, code)) => {
            // Exit codes are 0..=255 on Unix.
            return Some(ExitCode::from(u8::try_from(code & 0xff).unwrap_or(1)));
        }
        Ok(WaitStatus::Signaled(_, signal, _)) => signal,
        Ok(_) => return None, // still running (stopped, continued)
        Err(err) => {
            eprintln!("weft-node: exec guard: waiting for the child: {err}");
            return Some(ExitCode::from(CANNOT_START));
        }
    };
    // Die of the same signal, so the node sees what the child saw.
    if waited.contains(raw) {
        let mut only = SigSet::empty();
        only.add(raw);
        let _ = pthread_sigmask(SigmaskHow::SIG_UNBLOCK, Some(&only), None);
    }
    let _ = raise(raw);
    // Rust's runtime catches the first SIGSEGV/SIGBUS (to report stack
    // overflows); not a fault, it puts the default back and returns.
    let _ = raise(raw);
    // Still here: the signal is ignored in this process (SIGPIPE).
    Some(ExitCode::from(
        128u8.saturating_add(u8::try_from(raw as i32).unwrap_or(0)),
    ))
}

/// SIGKILLs this guard's process group (it leads it): the task,
/// everything it started, and the guard itself.
fn kill_group_and_exit(child: Pid) -> ! {
    if killpg(getpgrp(), Signal::SIGKILL).is_err() {
        let _ = kill(child, Signal::SIGKILL);
    }
    std::process::exit(i32::from(CANNOT_START));
}
