//! Following one task's events to its end, for `run`, `call`, `watch` and
//! `map`: [`drive`] resumes a broken stream from the last seq + 1, and
//! [`Printer`] writes output chunks to stdout/stderr as they come. Ctrl-C
//! handling ([`follow_to_end`], [`run_to_end`]) cancels the task when the
//! command owns it, and so does stdout's reader going away (`weft run --
//! yes | head -1`).

use std::future::Future;
use std::io::{self, IsTerminal, Write};
use std::pin::Pin;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use futures::{Stream, StreamExt};
use tokio::time::Instant;

use weft_client::{Client, Error, EventBody, EventStream, Task, TaskEvent, TaskSpec};
use weft_proto::{Attempt, OutputStream, TaskId, TaskState};

use crate::exit;
use crate::output::{OutputFormat, event_json, printable, printable_lines};

/// How long a CLI command keeps trying to resume a watch whose connection
/// dropped before it exits 69: longer than a standby takes over from a
/// coordinator cut off from its database (about 10 s: its lease, then the
/// database ending its session).
pub const CLI_RESUME_WINDOW: Duration = Duration::from_secs(30);

/// How long a task may stay queued before `run`/`call` say why it waits.
const PENDING_HINT_AFTER: Duration = Duration::from_secs(2);

/// How long to wait for a cancelled task's final event after Ctrl-C.
const CANCEL_WAIT: Duration = Duration::from_secs(5);

/// How long, after a Ctrl-C that came before the task's id, `run`/`call`
/// wait to learn it (Run's answer, then the first event) to cancel it.
const ID_WAIT: Duration = Duration::from_secs(2);

/// Ctrl-C presses, one item each.
pub type Interrupts = Pin<Box<dyn Stream<Item = ()> + Send>>;

/// Ctrl-C presses as [`Interrupts`]. The handler is installed on the first
/// poll; from then on Ctrl-C no longer ends the process. Where none can be
/// installed, no press ever comes.
fn ctrl_c_presses() -> Interrupts {
    futures::stream::unfold((), |()| async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
        Some(((), ()))
    })
    .boxed()
}

/// Resolves once stdout's reader goes away, without waiting for a write to
/// fail with EPIPE: `weft run -- sh -c 'echo x; sleep 600' | head -1` ends
/// when `head` does, not ten minutes later. Only for a pipe, whose write
/// end the kernel reports as in error (POLLERR) once no reader is left; on
/// a terminal, a file, a socket, or where stdout cannot be watched, it
/// never resolves (a failed write still says so, [`flow_after`]).
pub fn stdout_closed() -> Closed {
    match watch_stdout_pipe() {
        Some(watch) => watch,
        None => Box::pin(std::future::pending()),
    }
}

#[cfg(unix)]
fn watch_stdout_pipe() -> Option<Closed> {
    use std::os::fd::AsFd;
    use std::os::unix::fs::FileTypeExt;
    use tokio::io::Interest;
    use tokio::net::unix::pipe;

    // A second descriptor of the same pipe, only registered to learn of its
    // errors: never written through, and never switched to non-blocking,
    // which would change stdout itself.
    let fd = io::stdout().as_fd().try_clone_to_owned().ok()?;
    let file = std::fs::File::from(fd);
    if !file.metadata().ok()?.file_type().is_fifo() {
        return None;
    }
    let sender = pipe::Sender::from_file_unchecked(file).ok()?;
    Some(Box::pin(async move {
        loop {
            match sender.ready(Interest::ERROR).await {
                Ok(ready) if ready.is_error() => return,
                // Woken without an error (a spurious wake): look again soon.
                Ok(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                Err(_) => std::future::pending::<()>().await,
            }
        }
    }))
}

#[cfg(not(unix))]
fn watch_stdout_pipe() -> Option<Closed> {
    None
}

/// What a command has learned of the task it follows. Kept outside the
/// [`drive`] future so it survives that future being dropped (Ctrl-C).
#[derive(Debug, Default, Clone, Copy)]
pub struct Seen {
    /// The task, once its first event came (or from the start, for
    /// `watch`).
    pub id: Option<TaskId>,
    /// Where to resume: the seq after the last event handled.
    pub next_seq: u64,
}

impl Seen {
    /// A watch of task `id` that starts at `from_seq`: known before any
    /// event comes, so stopping at once still says where to resume.
    pub fn resuming(id: TaskId, from_seq: u64) -> Self {
        Seen {
            id: Some(id),
            next_seq: from_seq,
        }
    }
}

/// What a sink says after handling an event: go on, or stop following
/// (stdout's reader is gone).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[must_use]
pub enum Flow {
    /// Keep following.
    Continue,
    /// Stop following: nothing more can be printed.
    Stop,
}

/// How [`drive_until`] ended without an error.
#[derive(Debug)]
pub enum Driven {
    /// The task ended: its final state.
    Finished(Box<Task>),
    /// The sink said [`Flow::Stop`] before the task ended.
    Stopped,
}

/// A task's event stream, and who resumes it when it breaks.
pub enum Events {
    /// From `Run` or `Watch`: [`drive`] resumes it once it breaks, with
    /// [`Client::follow`] (for [`CLI_RESUME_WINDOW`]).
    Once(EventStream),
    /// From [`Client::follow`], which resumes by itself within its window:
    /// [`drive`] ends with its error, since resuming again would add a
    /// second window to the one the command documents.
    Followed(EventStream),
}

/// Reads `events` to the final event, handing each event to `sink` once,
/// and answers the final task. An [`Events::Once`] stream that breaks
/// after the task's id is known is resumed with [`Client::follow`] (for
/// [`CLI_RESUME_WINDOW`]).
pub async fn drive(
    client: &Client,
    events: Events,
    seen: &mut Seen,
    sink: &mut (dyn FnMut(&TaskEvent) + Send),
) -> Result<Task, Error> {
    let mut sink = |event: &TaskEvent| {
        sink(event);
        Flow::Continue
    };
    match drive_until(client, events, seen, &mut sink).await? {
        Driven::Finished(task) => Ok(*task),
        Driven::Stopped => unreachable!("a sink that always continues never stops the drive"),
    }
}

/// [`drive`], with a sink that may stop following early ([`Flow::Stop`]).
pub async fn drive_until(
    client: &Client,
    events: Events,
    seen: &mut Seen,
    sink: &mut (dyn FnMut(&TaskEvent) -> Flow + Send),
) -> Result<Driven, Error> {
    let (mut stream, mut resumed) = match events {
        Events::Once(stream) => (stream, false),
        Events::Followed(stream) => (stream, true),
    };
    loop {
        let broken = match stream.next().await {
            Some(Ok(event)) => {
                seen.id.get_or_insert(event.task_id);
                if event.seq < seen.next_seq {
                    continue;
                }
                seen.next_seq = event.seq + 1;
                let flow = sink(&event);
                if let EventBody::Finished(task) = event.body {
                    return Ok(Driven::Finished(Box::new(task)));
                }
                if flow == Flow::Stop {
                    return Ok(Driven::Stopped);
                }
                continue;
            }
            Some(Err(err)) => err,
            None => Error::Unavailable("the event stream ended before the task finished".into()),
        };
        match seen.id {
            Some(id) if !resumed && broken.is_retryable() => {
                tracing::debug!(task_id = %id, error = %broken, "event stream broke; resuming");
                stream = client.follow(id, seen.next_seq, CLI_RESUME_WINDOW);
                resumed = true;
            }
            _ => return Err(broken),
        }
    }
}

/// Follows `stream` to the end, printing with `printer`, and answers the
/// exit code. `seen` is what is known before the first event ([`Seen`]'s
/// default for a task just submitted). On Ctrl-C: if `owns_task`, cancels
/// the task and answers as [`cancel_interrupted`] says; otherwise stops
/// watching, says the `--from-seq` to resume from, and answers
/// [`exit::INTERRUPTED`]. When stdout's reader goes away, stops following
/// and answers [`exit::CLOSED_PIPE`], after cancelling the task if
/// `owns_task` ([`reader_gone`]).
pub async fn follow_to_end(
    client: &Client,
    stream: Events,
    mut seen: Seen,
    printer: &mut Printer,
    owns_task: bool,
) -> anyhow::Result<u8> {
    let mut interrupts = ctrl_c_presses();
    let follow = Follow {
        owns_task,
        interrupted: None,
        cancel_wait: CANCEL_WAIT,
        stdout_closed: stdout_closed(),
    };
    follow_with(client, stream, &mut seen, printer, &mut interrupts, follow).await
}

/// `run`/`call`: submits `spec` with `Run` and follows the task it owns to
/// the end, as [`follow_to_end`] does. Ctrl-C is listened for before Run is
/// sent, since the coordinator commits the task before it answers: a
/// Ctrl-C while Run is in flight, or before the first event, waits up to
/// [`ID_WAIT`] to learn the task's id and then cancels it.
pub async fn run_to_end(
    client: &Client,
    spec: TaskSpec,
    printer: &mut Printer,
) -> anyhow::Result<u8> {
    let mut interrupts = ctrl_c_presses();
    // The first poll installs the handler, so a Ctrl-C from here on
    // reaches this command instead of ending the process.
    if futures::poll!(interrupts.next()).is_ready() {
        eprintln!("weft: interrupted before the task was submitted");
        return Ok(exit::CANCELLED);
    }
    submit_and_follow(
        client,
        client.run(spec),
        printer,
        &mut interrupts,
        CANCEL_WAIT,
    )
    .await
}

/// [`run_to_end`] with its `Run` call, Ctrl-C presses and cancel wait
/// given (for tests).
async fn submit_and_follow(
    client: &Client,
    run: impl Future<Output = Result<EventStream, Error>>,
    printer: &mut Printer,
    interrupts: &mut Interrupts,
    cancel_wait: Duration,
) -> anyhow::Result<u8> {
    tokio::pin!(run);
    let mut interrupted = None;
    let stream = tokio::select! {
        result = &mut run => result?,
        Some(()) = interrupts.next() => {
            // Run answers only once the task is committed, so the answer
            // may yet name a task to cancel: wait for it, a while.
            let deadline = Instant::now() + ID_WAIT;
            interrupted = Some(deadline);
            let answered = tokio::select! {
                answered = tokio::time::timeout_at(deadline, &mut run) => answered.ok(),
                Some(()) = interrupts.next() => None,
            };
            match answered {
                Some(result) => result?,
                None => {
                    eprintln!(
                        "weft: interrupted before the coordinator answered; the task may or may not have been submitted (see `weft list`)"
                    );
                    return Ok(exit::CANCELLED);
                }
            }
        }
    };
    let follow = Follow {
        owns_task: true,
        interrupted,
        cancel_wait,
        stdout_closed: stdout_closed(),
    };
    let mut seen = Seen::default();
    follow_with(
        client,
        Events::Once(stream),
        &mut seen,
        printer,
        interrupts,
        follow,
    )
    .await
}

/// How [`follow_with`] follows a task.
struct Follow {
    /// The command submitted the task: Ctrl-C cancels it.
    owns_task: bool,
    /// A Ctrl-C came already (while Run was in flight): by this deadline
    /// the task's id is learned from its first event, or it is not
    /// cancelled.
    interrupted: Option<Instant>,
    /// How long a cancel after Ctrl-C waits ([`cancel_interrupted`]).
    cancel_wait: Duration,
    /// Resolves once stdout's reader is gone ([`stdout_closed`]).
    stdout_closed: Closed,
}

/// A future that resolves once stdout's reader is gone.
type Closed = Pin<Box<dyn Future<Output = ()> + Send>>;

/// [`follow_to_end`], with its Ctrl-C presses given (for tests). A Ctrl-C
/// before the first event of a task the command owns waits up to
/// [`ID_WAIT`] for that event, whose id is the task to cancel.
async fn follow_with(
    client: &Client,
    stream: Events,
    seen: &mut Seen,
    printer: &mut Printer,
    interrupts: &mut Interrupts,
    follow: Follow,
) -> anyhow::Result<u8> {
    let Follow {
        owns_task,
        mut interrupted,
        cancel_wait,
        stdout_closed: mut closed,
    } = follow;
    // Stdout's reader went away before the drive noticed it by a write.
    let mut reader_left = false;
    // The latest (id, state), for the "still waiting" hint; shared with the
    // sink because `seen` is borrowed by the drive future.
    let latest: Mutex<Option<(TaskId, TaskState)>> = Mutex::new(None);
    // Whether the task's id is known (as `seen.id`, borrowed by the drive).
    let id_known = AtomicBool::new(seen.id.is_some());
    // Ctrl-C came before the id: the first event stops the drive, and its
    // id is the task to cancel.
    let awaiting_id = AtomicBool::new(interrupted.is_some());
    let outcome = {
        let mut sink = |event: &TaskEvent| {
            if let EventBody::State { state, .. } = &event.body
                && let Ok(mut latest) = latest.lock()
            {
                *latest = Some((event.task_id, *state));
            }
            id_known.store(true, Ordering::Relaxed);
            let flow = printer.event(event);
            if awaiting_id.load(Ordering::Relaxed) {
                Flow::Stop
            } else {
                flow
            }
        };
        let driving = drive_until(client, stream, seen, &mut sink);
        tokio::pin!(driving);
        let hint = tokio::time::sleep(PENDING_HINT_AFTER);
        tokio::pin!(hint);
        let mut hinted = false;
        let id_wait = tokio::time::sleep_until(interrupted.unwrap_or_else(Instant::now));
        tokio::pin!(id_wait);
        loop {
            tokio::select! {
                result = &mut driving => break Some(result),
                Some(()) = interrupts.next() => {
                    if !owns_task || interrupted.is_some() || id_known.load(Ordering::Relaxed) {
                        break None;
                    }
                    let deadline = Instant::now() + ID_WAIT;
                    interrupted = Some(deadline);
                    id_wait.as_mut().reset(deadline);
                    awaiting_id.store(true, Ordering::Relaxed);
                }
                () = &mut closed, if !reader_left => {
                    reader_left = true;
                    if !owns_task || id_known.load(Ordering::Relaxed) {
                        break Some(Ok(Driven::Stopped));
                    }
                    // The task to cancel is named by its first event.
                    if interrupted.is_none() {
                        let deadline = Instant::now() + ID_WAIT;
                        interrupted = Some(deadline);
                        id_wait.as_mut().reset(deadline);
                    }
                    awaiting_id.store(true, Ordering::Relaxed);
                }
                () = &mut id_wait, if interrupted.is_some() => break None,
                () = &mut hint, if !hinted => {
                    hinted = true;
                    let queued = latest.lock().ok().and_then(|l| *l);
                    if let Some((id, TaskState::Queued)) = queued {
                        pending_hint(client, id).await;
                    }
                }
            }
        }
    };
    let outcome = match outcome {
        // Stopped to cancel after Ctrl-C, not because stdout's reader is
        // gone.
        Some(Ok(Driven::Stopped)) if awaiting_id.load(Ordering::Relaxed) && !reader_left => None,
        outcome => outcome,
    };
    match outcome {
        Some(Ok(Driven::Finished(task))) => {
            printer.finished(&task);
            Ok(exit::for_task(&task))
        }
        Some(Ok(Driven::Stopped)) => {
            let owned = seen.id.filter(|_| owns_task);
            Ok(reader_gone(client, owned).await)
        }
        Some(Err(err)) => Err(err.into()),
        None if reader_left && seen.id.is_none() => {
            eprintln!(
                "weft: stdout was closed before the task's id came (waited up to {ID_WAIT:?}); it was submitted and may still run (find it with `weft list`, then `weft cancel ID`)"
            );
            Ok(exit::CLOSED_PIPE)
        }
        None if reader_left => Ok(reader_gone(client, seen.id.filter(|_| owns_task)).await),
        None if !owns_task => {
            // Only the watch stops; say so, and where to pick it up again.
            eprintln!("{}", stopped_watching_line(seen));
            Ok(exit::INTERRUPTED)
        }
        None => {
            let Some(id) = seen.id else {
                // Run answered, so the task was submitted; which one did
                // not come in time (or Ctrl-C came again).
                eprintln!(
                    "weft: interrupted before the task's id came (waited up to {ID_WAIT:?}); it was submitted and may still run (find it with `weft list`, then `weft cancel ID`)"
                );
                return Ok(exit::UNAVAILABLE);
            };
            eprintln!("weft: interrupted; cancelling task {id}");
            let interrupt = async {
                let _ = interrupts.next().await;
            };
            Ok(cancel_interrupted(client, id, seen, printer, cancel_wait, interrupt).await)
        }
    }
}

/// What `watch` says on stderr when Ctrl-C stops it: the task goes on,
/// and the `--from-seq` to pick the watch up again.
fn stopped_watching_line(seen: &Seen) -> String {
    match seen.id {
        Some(id) => format!(
            "weft: stopped watching task {id}; it goes on (resume: weft watch {id} --from-seq {})",
            seen.next_seq
        ),
        None => "weft: stopped watching; the task goes on".to_owned(),
    }
}

/// Once stdout's reader is gone (`| head`): cancels `owned`, the task the
/// command submitted, since nobody reads what it prints, and answers
/// [`exit::CLOSED_PIPE`], as a tool killed by SIGPIPE ends. Says
/// "cancelled" only when the coordinator took the cancel; a task that had
/// ended already is named with its final state. A task that could not be
/// cancelled exits as the error says, with the `weft cancel` to run later
/// on stderr. A watched task (`None`) just goes on.
pub(crate) async fn reader_gone(client: &Client, owned: Option<TaskId>) -> u8 {
    let Some(id) = owned else {
        return exit::CLOSED_PIPE;
    };
    match cancel_through_any(client, id, CANCEL_WAIT).await {
        Ok((_, Cancel::Taken)) => {
            eprintln!("weft: stdout was closed; cancelled task {id}");
            exit::CLOSED_PIPE
        }
        Ok((through, Cancel::AlreadyFinal)) => {
            eprintln!(
                "{}",
                already_ended_line(id, final_state(&through, id).await)
            );
            exit::CLOSED_PIPE
        }
        Err(err) => {
            eprintln!(
                "weft: error: stdout was closed, but could not cancel task {id}; it may still be running (to cancel it: weft cancel {id}): {err}"
            );
            exit::for_error(&err.into())
        }
    }
}

/// The state of task `id`, which the coordinator said had ended, if it
/// answers soon.
async fn final_state(client: &Client, id: TaskId) -> Option<TaskState> {
    let got = tokio::time::timeout(Duration::from_secs(2), client.get(id)).await;
    match got {
        Ok(Ok(task)) if task.state.is_final() => Some(task.state),
        _ => None,
    }
}

/// What [`reader_gone`] says of a task that had ended before its cancel.
fn already_ended_line(id: TaskId, state: Option<TaskState>) -> String {
    match state {
        Some(state) => {
            format!(
                "weft: stdout was closed; task {id} had already ended ({state}), nothing to cancel"
            )
        }
        None => format!("weft: stdout was closed; task {id} had already ended, nothing to cancel"),
    }
}

/// After Ctrl-C on a command that owns task `id`: cancels it and waits up
/// to `wait` for its final event, and answers the exit code. The cancel
/// goes through whichever coordinator serves now: on UNAVAILABLE it is
/// sent again after [`Client::redial`] (a cancel is idempotent) until
/// `wait` has passed. 130 only when the cancel was taken or the task ended
/// cancelled; a task that ended otherwise first exits with its own code;
/// one that could not be cancelled exits as the error says (69 when no
/// coordinator answered), with the `weft cancel` to run later on stderr.
/// `interrupt` (a second Ctrl-C) stops waiting.
async fn cancel_interrupted(
    client: &Client,
    id: TaskId,
    seen: &mut Seen,
    printer: &mut Printer,
    wait: Duration,
    interrupt: impl std::future::Future<Output = ()>,
) -> u8 {
    tokio::pin!(interrupt);
    let cancelled = tokio::select! {
        result = cancel_through_any(client, id, wait) => result,
        () = &mut interrupt => Err(Error::Unavailable(
            "interrupted again before a coordinator took the cancel".into(),
        )),
    };
    let through = match cancelled {
        Ok((through, _)) => through,
        Err(err) => {
            eprintln!(
                "weft: error: could not cancel task {id}; it may still be running (to cancel it: weft cancel {id}): {err}"
            );
            return exit::for_error(&err.into());
        }
    };
    let rest = Events::Followed(through.follow(id, seen.next_seq, wait));
    // Printed while it lasts; a reader gone now changes nothing, as the
    // task is being cancelled already.
    let mut sink = |event: &TaskEvent| {
        let _ = printer.event(event);
    };
    let settle = tokio::time::timeout(wait, drive(&through, rest, seen, &mut sink));
    tokio::select! {
        result = settle => {
            // It may have finished before the cancel landed.
            if let Ok(Ok(task)) = result
                && task.state != TaskState::Cancelled
            {
                printer.finished(&task);
                return exit::for_task(&task);
            }
        }
        () = &mut interrupt => {}
    }
    exit::CANCELLED
}

/// Cancels task `id` through `client`, and while no coordinator answers,
/// through whichever of its addresses serves now ([`Client::redial`]),
/// for up to `wait`. Answers the client whose coordinator took the cancel
/// (or said the task had already ended), and which of the two it was.
pub(crate) async fn cancel_through_any(
    client: &Client,
    id: TaskId,
    wait: Duration,
) -> Result<(Client, Cancel), Error> {
    let deadline = tokio::time::Instant::now() + wait;
    let mut through = client.clone();
    let mut backoff = Duration::from_millis(100);
    loop {
        let tried = tokio::time::timeout_at(deadline, through.cancel(id)).await;
        let err = match tried {
            Ok(Ok(_)) => return Ok((through, Cancel::Taken)),
            // The only FAILED_PRECONDITION Cancel answers: the task is final.
            Ok(Err(Error::FailedPrecondition(_))) => return Ok((through, Cancel::AlreadyFinal)),
            Ok(Err(err)) if err.is_unavailable() => err,
            Ok(Err(err)) => return Err(err),
            Err(_) => {
                return Err(Error::Unavailable(format!(
                    "no coordinator took the cancel within {wait:?}"
                )));
            }
        };
        if tokio::time::Instant::now() + backoff >= deadline {
            return Err(err);
        }
        tracing::debug!(task_id = %id, error = %err, "cancel not taken; dialing again");
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(1));
        if let Ok(Ok(next)) = tokio::time::timeout_at(deadline, client.redial()).await {
            through = next;
        }
    }
}

/// What a coordinator answered to a cancel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Cancel {
    /// It took the cancel: the task was not final.
    Taken,
    /// The task had already ended; nothing was cancelled.
    AlreadyFinal,
}

/// Prints why a queued task is still waiting, if the coordinator says.
async fn pending_hint(client: &Client, id: TaskId) {
    if let Ok(task) = client.get(id).await
        && task.state == TaskState::Queued
        && !task.pending_reason.is_empty()
    {
        eprintln!("{}", pending_line(id, &task.pending_reason));
    }
}

/// What [`pending_hint`] prints: the reason [`printable`] (it may name a
/// label or concurrency key whoever submitted the task chose).
fn pending_line(id: TaskId, reason: &str) -> String {
    format!("weft: task {id} is waiting: {}", printable(reason))
}

/// Writes a followed task's events: output chunks to stdout/stderr as they
/// come (text), or one JSON object per event (json).
pub struct Printer {
    format: OutputFormat,
    /// Where results go: stdout, but for tests.
    out: Box<dyn Write + Send>,
    /// Print every state change on stderr (`watch`), not just requeues.
    verbose: bool,
    /// Print the handler's returned output at the end (`call`, `run`).
    print_result: bool,
    /// What the latest attempt streamed on stdout (up to
    /// [`MAX_STREAMED_KEPT`]), so a returned output that only repeats it
    /// (the built-in `echo`) is not printed twice.
    streamed: Vec<u8>,
    streamed_attempt: u32,
    streamed_overflow: bool,
}

/// Streamed stdout kept to compare with the returned output.
const MAX_STREAMED_KEPT: usize = 1024 * 1024;

impl Printer {
    /// A printer for `format`.
    pub fn new(format: OutputFormat, verbose: bool, print_result: bool) -> Self {
        Printer {
            format,
            out: Box::new(io::stdout()),
            verbose,
            print_result,
            streamed: Vec::new(),
            streamed_attempt: 0,
            streamed_overflow: false,
        }
    }

    fn keep_streamed(&mut self, attempt: u32, data: &[u8]) {
        if !self.print_result {
            return;
        }
        if attempt != self.streamed_attempt {
            self.streamed.clear();
            self.streamed_overflow = false;
            self.streamed_attempt = attempt;
        }
        if self.streamed.len() + data.len() > MAX_STREAMED_KEPT {
            self.streamed_overflow = true;
        } else {
            self.streamed.extend_from_slice(data);
        }
    }

    /// True when the task's returned output is exactly what its attempt
    /// already streamed on stdout.
    fn repeats_stream(&self, task: &Task) -> bool {
        !self.streamed_overflow
            && self.streamed_attempt == task.attempt.0
            && self.streamed == task.output.as_ref()
    }

    /// Writes `data` to the printer's stdout and flushes.
    fn write(&mut self, data: &[u8]) -> io::Result<()> {
        write_flushed(&mut self.out, data)
    }

    /// Handles one event, and says [`Flow::Stop`] once stdout's reader is
    /// gone (other write errors are ignored, as before).
    pub fn event(&mut self, event: &TaskEvent) -> Flow {
        let written = if self.format == OutputFormat::Json {
            self.write(format!("{}\n", event_json(event)).as_bytes())
        } else {
            self.text_event(event)
        };
        flow_after(&written)
    }

    fn text_event(&mut self, event: &TaskEvent) -> io::Result<()> {
        match &event.body {
            EventBody::Output { stream, data } => match stream {
                OutputStream::Stdout => {
                    self.keep_streamed(event.attempt.0, data);
                    return self.write(data);
                }
                OutputStream::Stderr => write_stderr(data),
            },
            EventBody::State {
                state,
                node_name,
                reason,
            } => {
                let requeued = *state == TaskState::Queued && event.attempt.0 > 0;
                // Waiting for something no connected node offers (a
                // handler): said at once, not after the usual hint delay.
                let waiting = *state == TaskState::Queued && reason.starts_with("waiting:");
                if (requeued || waiting) && !self.verbose {
                    eprintln!("weft: task {}: {}", event.task_id, printable(reason));
                } else if self.verbose && !state.is_final() {
                    // The final state is said once, by `finished`.
                    eprintln!(
                        "{}",
                        state_line(event, *state, node_name.as_deref(), reason)
                    );
                }
            }
            EventBody::Progress { fraction, message } => {
                if self.verbose {
                    eprintln!(
                        "weft: task {} progress {:.0}% {}",
                        event.task_id,
                        fraction * 100.0,
                        printable(message)
                    );
                }
            }
            EventBody::Finished(_) => {}
        }
        Ok(())
    }

    /// Handles the final task (after its `Finished` event).
    pub fn finished(&mut self, task: &Task) {
        if self.format == OutputFormat::Json {
            return; // the `finished` event line carried the task
        }
        if self.print_result && !task.output.is_empty() {
            // Printed already if it only repeats what was streamed.
            // The task has ended: a reader gone now has nothing to stop.
            if !self.repeats_stream(task) {
                let _ = self.write(&task.output);
            }
            if std::io::stdout().is_terminal() && !task.output.ends_with(b"\n") {
                let _ = self.write(b"\n");
            }
        }
        if let Some(line) = failure_line(task) {
            eprintln!("{line}");
        }
        if self.verbose && task.state == TaskState::Succeeded {
            eprintln!("weft: task {} succeeded", task.id);
        }
    }
}

/// A state change as `watch` prints it on stderr: the node only while the
/// task is on one (a queued task is on none, even if it ran before), and
/// the event's seq, which `watch --from-seq` resumes from. One line: the
/// node's name and the reason [`printable`].
fn state_line(event: &TaskEvent, state: TaskState, node: Option<&str>, reason: &str) -> String {
    let node = match (state, node) {
        (TaskState::Queued, _) | (_, None) => String::new(),
        (_, Some(node)) => format!(" on {}", printable(node)),
    };
    let reason = if reason.is_empty() {
        String::new()
    } else {
        format!(": {}", printable(reason))
    };
    format!(
        "weft: task {} {state}{node} (attempt {}, seq {}){reason}",
        event.task_id, event.attempt, event.seq
    )
}

/// The stderr line for a task that did not succeed (`None` if it did):
/// the node's name [`printable`]; the error too, but line by line, so a
/// handler's traceback still reads as one ([`printable_lines`]).
pub fn failure_line(task: &Task) -> Option<String> {
    let what = match task.state {
        TaskState::Succeeded => return None,
        TaskState::Failed => "failed",
        TaskState::Cancelled => "was cancelled",
        TaskState::TimedOut => "timed out",
        TaskState::UpstreamFailed => "never ran: a task it runs after did not succeed",
        TaskState::Skipped => "was skipped by its rule",
        TaskState::Pending | TaskState::Queued | TaskState::Assigned | TaskState::Running => {
            "did not finish"
        }
    };
    let mut line = format!("weft: task {} {what}", task.id);
    if let Some(node) = &task.node_name {
        line.push_str(&format!(" on {}", printable(node)));
    }
    // What the coordinator's error already says (`exited with code 3
    // (attempt 1 of 1)`) is not said twice.
    let mut details = Vec::new();
    if !task.error.contains("(attempt ") {
        details.push(format!("attempt {}", task.attempt));
    }
    if let Some(code) = task.exit_code
        && !task.error.contains(&format!("code {code}"))
    {
        details.push(format!("exit code {code}"));
    }
    if !details.is_empty() {
        line.push_str(&format!(" ({})", details.join(", ")));
    }
    if !task.error.is_empty() {
        line.push_str(&format!(": {}", printable_lines(&task.error, "  ")));
    }
    Some(line)
}

/// Collects a task's stdout, keeping only the latest attempt's (an earlier
/// attempt's output is dropped when a retry starts producing its own).
#[derive(Debug, Default)]
pub struct LastAttemptOutput {
    attempt: Attempt,
    data: Vec<u8>,
}

impl LastAttemptOutput {
    /// Adds a chunk of `attempt`'s output.
    pub fn push(&mut self, attempt: Attempt, chunk: &[u8]) {
        if attempt > self.attempt {
            self.attempt = attempt;
            self.data.clear();
        }
        if attempt == self.attempt {
            self.data.extend_from_slice(chunk);
        }
    }

    /// The collected bytes.
    pub fn into_bytes(self) -> Vec<u8> {
        self.data
    }
}

/// Whether to go on after a write to stdout: not once its reader is gone
/// (`| head`). Other errors are ignored, as they always were.
pub fn flow_after(written: &io::Result<()>) -> Flow {
    match written {
        Err(err) if err.kind() == io::ErrorKind::BrokenPipe => Flow::Stop,
        Ok(()) | Err(_) => Flow::Continue,
    }
}

/// Writes to stdout and flushes. A closed pipe (`| head`) is
/// [`io::ErrorKind::BrokenPipe`]: the caller decides whether to stop.
pub fn write_stdout(data: &[u8]) -> io::Result<()> {
    write_flushed(&mut io::stdout().lock(), data)
}

fn write_flushed(out: &mut dyn Write, data: &[u8]) -> io::Result<()> {
    out.write_all(data)?;
    out.flush()
}

/// Writes to stderr, ignoring errors.
pub fn write_stderr(data: &[u8]) {
    let mut err = std::io::stderr().lock();
    let _ = err.write_all(data).and_then(|()| err.flush());
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(state: TaskState, attempt: u32) -> TaskEvent {
        TaskEvent {
            task_id: TaskId::new(),
            seq: 7,
            attempt: Attempt(attempt),
            body: EventBody::State {
                state,
                node_name: Some("rust-3".into()),
                reason: String::new(),
            },
        }
    }

    #[test]
    fn a_requeued_task_is_on_no_node_and_state_lines_carry_their_seq() {
        let requeued = event(TaskState::Queued, 2);
        let line = state_line(&requeued, TaskState::Queued, Some("rust-3"), "retrying");
        assert!(
            line.ends_with(" queued (attempt 2, seq 7): retrying"),
            "{line}"
        );
        let running = event(TaskState::Running, 2);
        let line = state_line(&running, TaskState::Running, Some("rust-3"), "");
        assert!(
            line.ends_with(" running on rust-3 (attempt 2, seq 7)"),
            "{line}"
        );
    }

    #[test]
    fn the_failure_line_says_the_attempt_and_exit_code_once() {
        let task = Task {
            node_name: Some("n1".into()),
            exit_code: Some(3),
            error: "exited with code 3 (attempt 1 of 1)".into(),
            failures: 1,
            ..crate::testing::task(TaskState::Failed)
        };
        let line = failure_line(&task).expect("failed");
        assert!(
            line.ends_with(" failed on n1: exited with code 3 (attempt 1 of 1)"),
            "{line}"
        );
        let bare = Task {
            error: String::new(),
            ..task
        };
        let line = failure_line(&bare).expect("failed");
        assert!(
            line.ends_with(" failed on n1 (attempt 1, exit code 3)"),
            "{line}"
        );
    }

    #[test]
    fn state_and_pending_lines_escape_names_and_reasons() {
        let pwn = "\x1b]0;pwn\x07";
        let running = event(TaskState::Running, 1);
        let line = state_line(
            &running,
            TaskState::Running,
            Some(&format!("n{pwn}")),
            &format!("r{pwn}\nx"),
        );
        assert!(!line.contains(['\x1b', '\x07', '\n']), "{line}");
        assert!(
            line.contains(" running on n\\u{1b}]0;pwn\\u{7} (attempt 1, seq 7): r\\u{1b}"),
            "{line}"
        );
        assert!(line.ends_with("\\u{7}\\nx"), "{line}");
        let line = pending_line(TaskId::new(), &format!("concurrency key k{pwn}\nx"));
        assert!(
            line.ends_with(" is waiting: concurrency key k\\u{1b}]0;pwn\\u{7}\\nx"),
            "{line}"
        );
    }

    #[test]
    fn the_failure_line_escapes_the_node_and_keeps_a_tracebacks_lines() {
        let task = Task {
            node_name: Some("n\x1b[2J".into()),
            error: "KeyError: 'x\x1b[2J'\n\nTraceback (most recent call last):\n  \
                    File \"h.py\"\n"
                .into(),
            failures: 1,
            ..crate::testing::task(TaskState::Failed)
        };
        let line = failure_line(&task).expect("failed");
        assert!(!line.contains('\x1b'), "{line}");
        assert!(
            line.ends_with(
                " failed on n\\u{1b}[2J (attempt 1): KeyError: 'x\\u{1b}[2J'\n\n  \
                 Traceback (most recent call last):\n    File \"h.py\""
            ),
            "{line}"
        );
    }

    /// A client whose coordinator never answers (nothing listens on port 1).
    fn unreachable_client() -> Client {
        let url = "http://127.0.0.1:1";
        let channel = tonic::transport::Channel::from_static(url).connect_lazy();
        Client::from_channel(url, channel)
    }

    #[tokio::test]
    async fn a_followed_stream_that_gave_up_is_not_resumed_for_a_second_window() {
        let client = unreachable_client();
        let running = TaskEvent {
            seq: 0,
            ..event(TaskState::Running, 1)
        };
        let gave_up = Error::Unavailable("could not resume within 30s".into());
        let events: EventStream = Box::pin(futures::stream::iter([Ok(running), Err(gave_up)]));
        let mut seen = Seen::default();
        let ended = tokio::time::timeout(
            Duration::from_secs(5),
            drive(&client, Events::Followed(events), &mut seen, &mut |_| {}),
        )
        .await
        .expect("the follow's error ends it at once, not after another window");
        assert!(
            matches!(&ended, Err(Error::Unavailable(m)) if m.contains("within 30s")),
            "{ended:?}"
        );
        assert_eq!(seen.next_seq, 1);
    }

    #[tokio::test]
    async fn a_cancel_no_coordinator_took_exits_unavailable_not_cancelled() {
        let client = unreachable_client();
        let id = TaskId::new();
        let mut seen = Seen {
            id: Some(id),
            next_seq: 3,
        };
        let mut printer = Printer::new(OutputFormat::Text, false, true);
        let wait = Duration::from_millis(600);
        let started = std::time::Instant::now();
        let code = cancel_interrupted(
            &client,
            id,
            &mut seen,
            &mut printer,
            wait,
            std::future::pending(),
        )
        .await;
        assert_eq!(code, exit::UNAVAILABLE);
        assert!(started.elapsed() < wait * 3, "{:?}", started.elapsed());
    }

    /// Stdout whose reader is gone (`| head` exited).
    struct ClosedPipe;

    impl Write for ClosedPipe {
        fn write(&mut self, _: &[u8]) -> io::Result<usize> {
            Err(io::ErrorKind::BrokenPipe.into())
        }
        fn flush(&mut self) -> io::Result<()> {
            Err(io::ErrorKind::BrokenPipe.into())
        }
    }

    fn output(data: &'static [u8]) -> TaskEvent {
        TaskEvent {
            body: EventBody::Output {
                stream: OutputStream::Stdout,
                data: bytes::Bytes::from_static(data),
            },
            ..event(TaskState::Running, 1)
        }
    }

    #[test]
    fn the_printer_says_stop_once_stdouts_reader_is_gone() {
        for format in [OutputFormat::Text, OutputFormat::Json] {
            let mut printer = Printer::new(format, false, true);
            printer.out = Box::new(ClosedPipe);
            assert_eq!(printer.event(&output(b"y\n")), Flow::Stop, "{format:?}");
        }
        let mut printer = Printer::new(OutputFormat::Text, false, true);
        printer.out = Box::new(Vec::new());
        assert_eq!(printer.event(&output(b"y\n")), Flow::Continue);
    }

    #[tokio::test]
    async fn a_stop_from_the_sink_ends_the_drive_before_the_task_ends() {
        let client = unreachable_client();
        let events: EventStream = Box::pin(
            futures::stream::iter([Ok(output(b"a")), Ok(output(b"b"))])
                .chain(futures::stream::pending()),
        );
        let mut seen = Seen::default();
        let mut sink = |_: &TaskEvent| Flow::Stop;
        let ended = tokio::time::timeout(
            Duration::from_secs(5),
            drive_until(&client, Events::Once(events), &mut seen, &mut sink),
        )
        .await
        .expect("a stop ends the drive at once");
        assert!(matches!(ended, Ok(Driven::Stopped)), "{ended:?}");
        assert_eq!(seen.next_seq, 8);
    }

    /// Ctrl-C presses: one, which lets `then` go on, and no more.
    fn one_press_then(then: futures::channel::oneshot::Sender<()>) -> Interrupts {
        Box::pin(
            futures::stream::once(async move {
                let _ = then.send(());
            })
            .chain(futures::stream::pending()),
        )
    }

    /// Text output into memory.
    fn quiet_printer() -> Printer {
        let mut printer = Printer::new(OutputFormat::Text, false, true);
        printer.out = Box::new(Vec::new());
        printer
    }

    fn queued(id: TaskId) -> TaskEvent {
        TaskEvent {
            task_id: id,
            seq: 0,
            ..event(TaskState::Queued, 0)
        }
    }

    #[tokio::test]
    async fn ctrl_c_before_the_first_event_waits_for_it_and_cancels_that_task() {
        let client = unreachable_client();
        let id = TaskId::new();
        let (pressed, first_event) = futures::channel::oneshot::channel();
        // Run has answered; the first event comes only after Ctrl-C.
        let events: EventStream = Box::pin(
            futures::stream::once(async move {
                let _ = first_event.await;
                Ok(queued(id))
            })
            .chain(futures::stream::pending()),
        );
        let mut interrupts = one_press_then(pressed);
        let mut seen = Seen::default();
        let mut printer = quiet_printer();
        let follow = Follow {
            owns_task: true,
            interrupted: None,
            cancel_wait: Duration::from_millis(600),
            stdout_closed: Box::pin(std::future::pending()),
        };
        let code = tokio::time::timeout(
            Duration::from_secs(10),
            follow_with(
                &client,
                Events::Once(events),
                &mut seen,
                &mut printer,
                &mut interrupts,
                follow,
            ),
        )
        .await
        .expect("the cancel gives up within its wait")
        .expect("no stream error");
        // The cancel of that task went to a coordinator that never answers.
        assert_eq!((seen.id, code), (Some(id), exit::UNAVAILABLE));
    }

    #[tokio::test]
    async fn ctrl_c_while_run_is_in_flight_waits_for_its_answer_and_cancels_that_task() {
        let client = unreachable_client();
        let id = TaskId::new();
        let (pressed, answer) = futures::channel::oneshot::channel();
        // Run answers only after Ctrl-C.
        let run = async move {
            let _ = answer.await;
            let events: EventStream =
                Box::pin(futures::stream::iter([Ok(queued(id))]).chain(futures::stream::pending()));
            Ok(events)
        };
        let mut interrupts = one_press_then(pressed);
        let mut printer = quiet_printer();
        let code = tokio::time::timeout(
            Duration::from_secs(10),
            submit_and_follow(
                &client,
                run,
                &mut printer,
                &mut interrupts,
                Duration::from_millis(600),
            ),
        )
        .await
        .expect("the cancel gives up within its wait")
        .expect("no stream error");
        // Not 130 "before the task was submitted": the cancel of that task
        // went to a coordinator that never answers.
        assert_eq!(code, exit::UNAVAILABLE);
    }

    /// Stdout's reader goes away after `after`, with nothing written.
    fn closed_after(after: Duration) -> Closed {
        Box::pin(tokio::time::sleep(after))
    }

    /// Follows `events` with stdout closing after 100 ms: the exit code,
    /// and what was learned of the task.
    async fn follow_until_closed(events: EventStream, owns_task: bool) -> (u8, Seen) {
        let client = unreachable_client();
        let mut interrupts: Interrupts = Box::pin(futures::stream::pending());
        let mut seen = Seen::default();
        let mut printer = quiet_printer();
        let follow = Follow {
            owns_task,
            interrupted: None,
            cancel_wait: Duration::from_millis(600),
            stdout_closed: closed_after(Duration::from_millis(100)),
        };
        let code = tokio::time::timeout(
            Duration::from_secs(20),
            follow_with(
                &client,
                Events::Once(events),
                &mut seen,
                &mut printer,
                &mut interrupts,
                follow,
            ),
        )
        .await
        .expect("a closed stdout ends the follow without a write")
        .expect("no stream error");
        (code, seen)
    }

    #[tokio::test]
    async fn stdout_closing_while_a_task_prints_nothing_cancels_it() {
        let id = TaskId::new();
        let events: EventStream =
            Box::pin(futures::stream::iter([Ok(queued(id))]).chain(futures::stream::pending()));
        let (code, seen) = follow_until_closed(events, true).await;
        // The cancel of that task went to a coordinator that never answers.
        assert_eq!((seen.id, code), (Some(id), exit::UNAVAILABLE));
    }

    #[tokio::test]
    async fn stdout_closing_before_the_first_event_waits_for_it_and_cancels_that_task() {
        let id = TaskId::new();
        let events: EventStream = Box::pin(
            futures::stream::once(async move {
                tokio::time::sleep(Duration::from_millis(300)).await;
                Ok(queued(id))
            })
            .chain(futures::stream::pending()),
        );
        let (code, seen) = follow_until_closed(events, true).await;
        assert_eq!((seen.id, code), (Some(id), exit::UNAVAILABLE));
    }

    #[tokio::test]
    async fn stdout_closing_stops_a_watch_and_leaves_the_task_alone() {
        let id = TaskId::new();
        let events: EventStream =
            Box::pin(futures::stream::iter([Ok(queued(id))]).chain(futures::stream::pending()));
        let (code, _) = follow_until_closed(events, false).await;
        assert_eq!(code, exit::CLOSED_PIPE);
    }

    #[test]
    fn a_task_that_ended_before_its_cancel_is_not_said_to_be_cancelled() {
        let id = TaskId::new();
        let line = already_ended_line(id, Some(TaskState::Succeeded));
        assert!(!line.contains("cancelled task"), "{line}");
        assert!(line.contains("had already ended (succeeded)"), "{line}");
    }

    #[test]
    fn a_watch_stopped_before_any_event_says_where_to_resume() {
        let id = TaskId::new();
        let line = stopped_watching_line(&Seen::resuming(id, 42));
        assert!(
            line.ends_with(&format!("(resume: weft watch {id} --from-seq 42)")),
            "{line}"
        );
    }

    #[test]
    fn only_the_latest_attempts_output_is_kept() {
        let mut out = LastAttemptOutput::default();
        out.push(Attempt(1), b"first ");
        out.push(Attempt(1), b"try");
        out.push(Attempt(2), b"second");
        out.push(Attempt(1), b" late chunk of attempt 1");
        assert_eq!(out.into_bytes(), b"second");
    }
}
