//! The exec guard: a small process between `weft-node` and each exec
//! task, so a node that dies without cleaning up (SIGKILL, the OOM killer)
//! takes its tasks' processes with it instead of leaving them running
//! while the coordinator gives the same tasks to another node.
//!
//! `weft-node` starts an exec task as
//! `weft-node __weft-exec-guard PID PATH [--env K=V]... -- ARGV...`: the
//! guard leads the task's process group (the node's cancel, timeout and
//! drain still `killpg` that group). The guard:
//! 1. asks the kernel for a signal when its parent dies (`PR_SET_PDEATHSIG`)
//!    and checks the parent `PID` is still its parent (it may have died
//!    already); leads its own process group;
//! 2. starts the program at `PATH` (the node looked it up in the task's
//!    `PATH`) with arguments `ARGV`, in that group, with the same stdin,
//!    stdout, stderr and directory, the guard's environment plus the task's
//!    `--env` pairs (which never apply to the guard itself), no blocked
//!    signals and SIGPIPE at its default;
//! 3. waits: when the program exits, exits the same way (same code, or
//!    killed by the same signal, without a core dump of its own); when the
//!    parent dies, SIGKILLs the whole group, grandchildren included. Every
//!    other signal is ignored: one sent to the group reaches the program
//!    directly (signal the group, `kill -TERM -- -PID`, to reach the task).
//!
//! If the program cannot be started the guard prints one line starting
//! with [`START_FAILED_PREFIX`] on stderr and exits 127: the node reports
//! that as a start failure, not as the program's exit.
//!
//! It runs before any runtime or thread exists: the signals it waits for
//! are blocked and taken with `sigwait`, so no handler is installed.
//!
//! The kernel sends the parent-death signal when the *thread* that started
//! the guard ends, so the node starts guards from its runtime's worker
//! threads, which live as long as the node.

use std::ffi::{CString, OsStr, OsString};
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};

use nix::errno::Errno;
use nix::spawn::{PosixSpawnAttr, PosixSpawnFileActions, PosixSpawnFlags, posix_spawn};
use nix::sys::prctl;
use nix::sys::resource::{Resource, setrlimit};
use nix::sys::signal::{SigSet, Signal, kill, killpg};
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::{Pid, getpgrp, getppid, setpgid};

/// The first argument that makes `weft-node` a guard.
pub const GUARD_ARG: &str = "__weft-exec-guard";

/// How the guard's one stderr line starts when the program could not be
/// started.
pub const START_FAILED_PREFIX: &str = "weft-node: cannot start ";

/// Exit code when the program could not be started (as a shell does).
pub const CANNOT_START: u8 = 127;

/// What the kernel sends when the node thread that started the guard ends
/// (the node died: its threads all end). Not SIGTERM: by the time one
/// thread of a dying node has ended the others may not have, so the guard
/// could not tell the parent's death from a SIGTERM sent by someone else.
/// SIGSTKFLT is unused on Linux: nobody else sends it.
const PARENT_DIED: Signal = Signal::SIGSTKFLT;

const USAGE: &str = "weft-node: usage: weft-node __weft-exec-guard PARENT_PID PROGRAM_PATH [--env KEY=VALUE]... -- ARGV...";

/// The arguments for the node's own executable that run `argv` (the
/// program found at `program`) under a guard whose parent is `parent`
/// (the node's pid), with `env` added to the program's environment.
pub fn guard_args<'a>(
    parent: u32,
    program: &std::path::Path,
    env: impl IntoIterator<Item = (&'a String, &'a String)>,
    argv: &[String],
) -> Vec<OsString> {
    let mut args = vec![
        GUARD_ARG.into(),
        parent.to_string().into(),
        program.as_os_str().to_owned(),
    ];
    for (key, value) in env {
        args.push("--env".into());
        args.push(format!("{key}={value}").into());
    }
    args.push("--".into());
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
    let Some(invocation) = parse(args) else {
        eprintln!("{USAGE}");
        return Some(ExitCode::from(2));
    };
    Some(guard(&invocation))
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

/// A parsed guard command line.
struct Invocation {
    parent: Pid,
    program: OsString,
    env: Vec<OsString>,
    argv: Vec<OsString>,
}

fn parse(mut args: impl Iterator<Item = OsString>) -> Option<Invocation> {
    let parent = args
        .next()?
        .to_str()?
        .parse::<i32>()
        .ok()
        .filter(|p| *p > 0)?;
    let program = args.next()?;
    let mut env = Vec::new();
    loop {
        let arg = args.next()?;
        if arg == "--" {
            break;
        }
        if arg != "--env" {
            return None;
        }
        env.push(args.next()?);
    }
    let argv: Vec<OsString> = args.collect();
    (!argv.is_empty()).then_some(Invocation {
        parent: Pid::from_raw(parent),
        program,
        env,
        argv,
    })
}

fn guard(invocation: &Invocation) -> ExitCode {
    // Every signal is taken with sigwait (or ignored); none can kill the
    // guard but SIGKILL.
    let all = SigSet::all();
    if let Err(err) = all.thread_block() {
        eprintln!("weft-node: exec guard: blocking signals: {err}");
        return ExitCode::from(CANNOT_START);
    }
    if let Err(err) = prctl::set_pdeathsig(PARENT_DIED) {
        eprintln!("weft-node: exec guard: PR_SET_PDEATHSIG: {err}");
        return ExitCode::from(CANNOT_START);
    }
    if getppid() != invocation.parent {
        // The node died before the line above: nothing to run for.
        return ExitCode::from(CANNOT_START);
    }
    // The node starts it leading its own group already; started any other
    // way, it makes one, so "the group" is never its parent's.
    if let Err(err) = setpgid(Pid::from_raw(0), Pid::from_raw(0)) {
        eprintln!("weft-node: exec guard: setpgid: {err}");
        return ExitCode::from(CANNOT_START);
    }
    let child = match spawn(invocation) {
        Ok(child) => child,
        Err(why) => {
            let program = invocation.argv[0].to_string_lossy();
            eprintln!("{START_FAILED_PREFIX}{program:?}: {why}");
            return ExitCode::from(CANNOT_START);
        }
    };
    loop {
        match all.wait() {
            Ok(Signal::SIGCHLD) => {
                if let Some(code) = child_ended(child) {
                    return code;
                }
            }
            Ok(PARENT_DIED) => kill_group_and_exit(child),
            // Sent to the guard (or to the whole group, which the program
            // gets too): not the guard's business.
            Ok(_) => {}
            Err(err) => {
                eprintln!("weft-node: exec guard: sigwait: {err}");
                kill_group_and_exit(child);
            }
        }
    }
}

/// Starts the program in this process group with this process's stdio and
/// directory, this environment plus the task's, and the state a freshly
/// started program expects: no blocked signals, SIGPIPE at its default
/// (the Rust runtime ignores it here).
fn spawn(invocation: &Invocation) -> Result<Pid, String> {
    let cstring =
        |s: &OsStr| CString::new(s.as_bytes()).map_err(|_| format!("{s:?} contains a NUL byte"));
    let path = cstring(&invocation.program)?;
    let args = invocation
        .argv
        .iter()
        .map(|a| cstring(a))
        .collect::<Result<Vec<_>, _>>()?;
    let extra_keys: Vec<&[u8]> = invocation
        .env
        .iter()
        .filter_map(|pair| pair.as_bytes().split(|b| *b == b'=').next())
        .collect();
    let mut env = Vec::new();
    for (key, value) in std::env::vars_os() {
        if extra_keys.contains(&key.as_bytes()) {
            continue; // the task's value wins
        }
        let mut pair = key;
        pair.push("=");
        pair.push(value);
        env.push(cstring(&pair)?);
    }
    for pair in &invocation.env {
        env.push(cstring(pair)?);
    }
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
    posix_spawn(path.as_c_str(), &actions, &attr, &args, &env)
        .map_err(|err| std::io::Error::from(err).to_string())
}

/// After a SIGCHLD: if the program ended, ends this process the same way.
fn child_ended(child: Pid) -> Option<ExitCode> {
    let signal = match waitpid(child, Some(WaitPidFlag::WNOHANG)) {
        Ok(WaitStatus::Exited(_, code)) => {
            // Exit codes are 0..=255 on Unix.
            return Some(ExitCode::from(u8::try_from(code & 0xff).unwrap_or(1)));
        }
        Ok(WaitStatus::Signaled(_, signal, _)) => signal,
        Ok(_) => return None, // still running (stopped, continued)
        Err(err) => {
            eprintln!("weft-node: exec guard: waiting for the program: {err}");
            return Some(ExitCode::from(CANNOT_START));
        }
    };
    // Die of the same signal, so the node sees what the program saw; any
    // core dump is the program's, not the guard's.
    let _ = setrlimit(Resource::RLIMIT_CORE, 0, 0);
    let _ = signal_hook::low_level::emulate_default_handler(signal as i32);
    // Still here: a signal whose default is not to terminate.
    Some(ExitCode::from(
        128u8.saturating_add(u8::try_from(signal as i32).unwrap_or(0)),
    ))
}

/// SIGKILLs this guard's process group (it leads it): the program,
/// everything it started, and the guard itself.
fn kill_group_and_exit(child: Pid) -> ! {
    if killpg(getpgrp(), Signal::SIGKILL).is_err() {
        let _ = kill(child, Signal::SIGKILL);
    }
    std::process::exit(i32::from(CANNOT_START));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn os(args: &[&str]) -> Vec<OsString> {
        args.iter().map(OsString::from).collect()
    }

    #[test]
    fn the_command_line_round_trips() {
        let env: std::collections::BTreeMap<String, String> =
            [("A".to_owned(), "1=2".to_owned())].into();
        let argv = ["sh".to_owned(), "-c".to_owned(), "--env".to_owned()];
        let args = guard_args(42, std::path::Path::new("/bin/sh"), &env, &argv);
        assert_eq!(args[0], GUARD_ARG);
        let parsed = parse(args.into_iter().skip(1)).expect("parses");
        assert_eq!(parsed.parent, Pid::from_raw(42));
        assert_eq!(parsed.program, "/bin/sh");
        assert_eq!(parsed.env, os(&["A=1=2"]));
        assert_eq!(parsed.argv, os(&["sh", "-c", "--env"]));
    }

    #[test]
    fn a_malformed_command_line_is_refused() {
        for bad in [
            &["0", "/bin/true", "--", "true"][..],
            &["x", "/bin/true", "--", "true"],
            &["42", "/bin/true", "--"],
            &["42", "/bin/true", "--bogus", "--", "true"],
            &["42", "/bin/true", "--env"],
            &["42"],
        ] {
            assert!(parse(os(bad).into_iter()).is_none(), "{bad:?}");
        }
    }
}
