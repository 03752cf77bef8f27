//! [`Client::follow`]: a task's event stream that survives a broken
//! connection, a coordinator restart, or (for a client connected with
//! several addresses) a failover to another coordinator, by watching again
//! from the last seen seq + 1, within a resume window. Nothing else here.

use std::time::{Duration, Instant};

use futures::StreamExt;

use weft_proto::{ConversionError, TaskId};

use crate::error::Error;
use crate::types::TaskEvent;
use crate::{Client, EventStream, drain};

impl Client {
    /// Like [`Client::watch`], but when the stream breaks (the coordinator
    /// restarted, the connection dropped) it watches again from the last
    /// seen `seq + 1`, for up to `resume_window` of failing tries in a row,
    /// then yields [`Error::Unavailable`] and ends. A break starts a new
    /// run of tries, with the whole window, only after a watch that
    /// yielded an event or stayed open at least the window (a quiet task, a
    /// long sleep); a watch that breaks sooner with nothing yielded (one
    /// that breaks as soon as it opens, a proxy that cuts every stream
    /// after a second or two) is one more try of the same run, so such
    /// breaks end it after the window. Errors that retrying
    /// cannot fix (NotFound, ...) end it at once, as does a `from_seq`
    /// past the last event of a task that has ended
    /// ([`Error::InvalidArgument`]: nothing will come). A client connected with
    /// several addresses ([`Client::connect_any`]) dials through them
    /// again ([`Client::redial`]) before each try after a break, so the
    /// watch goes on at whichever coordinator serves now. Events are never
    /// yielded twice nor skipped: each try starts after the last one
    /// yielded. An event whose seq leaves no next one (`u64::MAX`) ends it
    /// with [`Error::Protocol`].
    pub fn follow(&self, id: TaskId, from_seq: u64, resume_window: Duration) -> EventStream {
        let state = Follow {
            client: self.clone(),
            id,
            next_seq: from_seq,
            inner: None,
            resume_window,
            failing_since: None,
            opened_at: None,
            backoff: FOLLOW_BACKOFF_MIN,
            done: false,
            broken: false,
        };
        Box::pin(futures::stream::unfold(state, Follow::next))
    }
}

const FOLLOW_BACKOFF_MIN: Duration = Duration::from_millis(100);
const FOLLOW_BACKOFF_MAX: Duration = Duration::from_secs(1);
/// The least time a watch with no event must have stayed open for its
/// break to start a new run of tries; the window, when longer, is the
/// bar. Shorter, and a coordinator that takes the watch and fails it at
/// once would be retried without end; a bar under the window, and so would
/// one (or a proxy) that fails every watch after a little longer.
const FOLLOW_HEALTHY_AFTER: Duration = FOLLOW_BACKOFF_MAX;

/// The state of a [`Client::follow`] stream.
struct Follow {
    client: Client,
    id: TaskId,
    /// Where to resume: the seq after the last event yielded.
    next_seq: u64,
    inner: Option<EventStream>,
    resume_window: Duration,
    /// Start of the current run of failed tries; `None` while healthy.
    failing_since: Option<Instant>,
    /// When the open watch (`inner`) was opened.
    opened_at: Option<Instant>,
    backoff: Duration,
    done: bool,
    /// The last stream or try failed: with several addresses, dial
    /// through them before watching again.
    broken: bool,
}

impl Follow {
    async fn next(mut self) -> Option<(Result<TaskEvent, Error>, Follow)> {
        loop {
            if self.done {
                if let Some(inner) = self.inner.take() {
                    drain(inner).await;
                }
                return None;
            }
            if self.inner.is_none() && self.broken && self.client.has_standbys() {
                match self.client.redial().await {
                    Ok(client) => {
                        if client.url != self.client.url {
                            tracing::info!(
                                task_id = %self.id,
                                coordinator = %client.url,
                                "resuming the watch on another coordinator"
                            );
                        }
                        self.client = client;
                        self.broken = false;
                    }
                    Err(err) => {
                        if let Some(err) = self.failed(err).await {
                            return Some((Err(err), self));
                        }
                        continue;
                    }
                }
            }
            let inner = match &mut self.inner {
                Some(inner) => inner,
                None => match self.client.watch(self.id, self.next_seq).await {
                    Ok(stream) => {
                        self.opened_at = Some(Instant::now());
                        self.inner.insert(stream)
                    }
                    Err(err) => {
                        if let Some(err) = self.failed(err).await {
                            return Some((Err(err), self));
                        }
                        continue;
                    }
                },
            };
            match inner.next().await {
                Some(Ok(event)) => {
                    if event.seq < self.next_seq {
                        continue; // replayed after a resume; already yielded
                    }
                    let Some(next_seq) = event.seq.checked_add(1) else {
                        self.done = true;
                        return Some((
                            Err(Error::Protocol(ConversionError::Invalid {
                                field: "seq",
                                reason: format!(
                                    "event seq {} of task {} leaves no next seq",
                                    event.seq, self.id
                                ),
                            })),
                            self,
                        ));
                    };
                    self.next_seq = next_seq;
                    self.failing_since = None;
                    self.backoff = FOLLOW_BACKOFF_MIN;
                    self.done = event.finished().is_some();
                    return Some((Ok(event), self));
                }
                Some(Err(err)) => {
                    self.inner = None;
                    if let Some(err) = self.failed(err).await {
                        return Some((Err(err), self));
                    }
                }
                None => {
                    // Ended without the final event: the coordinator closed
                    // the stream (shutting down), or the task had ended
                    // before the seq asked for (nothing is left to send).
                    self.inner = None;
                    if let Some(err) =
                        Follow::past_the_end(&self.client, self.id, self.next_seq).await
                    {
                        self.done = true;
                        return Some((Err(err), self));
                    }
                    let err = Error::Unavailable(format!(
                        "the coordinator at {} closed the watch of task {}",
                        self.client.url, self.id
                    ));
                    if let Some(err) = self.failed(err).await {
                        return Some((Err(err), self));
                    }
                }
            }
        }
    }

    /// When the task has ended and its last event came before the seq to
    /// watch from, the error that says so (retrying cannot help). `None`
    /// otherwise, also when the task cannot be read now.
    /// (A free function of what it reads: `Follow` is not `Sync`.)
    async fn past_the_end(client: &Client, id: TaskId, from_seq: u64) -> Option<Error> {
        let task = client.get(id).await.ok()?;
        (task.state.is_final() && task.next_seq <= from_seq).then(|| {
            Error::InvalidArgument(format!(
                "task {id} ended at seq {}; there is nothing from seq {from_seq} (watch from an earlier seq, or see it with get)",
                task.next_seq.saturating_sub(1),
            ))
        })
    }

    /// Records a failed try. Answers the error to yield when it is final
    /// (not retryable, or failing for longer than the window); otherwise
    /// sleeps the backoff and answers `None` (try again).
    async fn failed(&mut self, err: Error) -> Option<Error> {
        self.broken = true;
        // (A watch that yielded an event has already ended the run.)
        if let Some(opened) = self.opened_at.take()
            && opened.elapsed() >= self.resume_window.max(FOLLOW_HEALTHY_AFTER)
        {
            // The watch that broke had stayed open longer than the window:
            // this break is the first of a new run, not one more of an
            // old one.
            self.failing_since = None;
            self.backoff = FOLLOW_BACKOFF_MIN;
        }
        let since = *self.failing_since.get_or_insert_with(Instant::now);
        if !err.is_retryable() {
            self.done = true;
            return Some(err);
        }
        if since.elapsed() >= self.resume_window {
            self.done = true;
            return Some(Error::Unavailable(format!(
                "lost the coordinator at {} while watching task {} and could not resume within {:?}: {err}",
                self.client.url, self.id, self.resume_window
            )));
        }
        tracing::debug!(task_id = %self.id, error = %err, "watch broke; resuming");
        tokio::time::sleep(self.backoff).await;
        self.backoff = (self.backoff * 2).min(FOLLOW_BACKOFF_MAX);
        None
    }
}
