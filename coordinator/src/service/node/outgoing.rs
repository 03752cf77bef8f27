//! A node session's outgoing stream: the driver's messages for the node
//! ([`ToNode`]), encoded as they leave ([`codec::encode`]).
//!
//! It ends when the session closes (its node lost, replaced or revoked, the
//! coordinator stopping), whether or not the node reads it: what is still
//! queued for the node then (specs, secret environments, the rest of an
//! `Assign` split over several messages) is dropped at once, by the task
//! [`outgoing`] hands back, not when the stream is next polled, which for
//! a node that stopped reading (HTTP/2 flow control holds its stream back)
//! is never. The one exception is a final refusal (`ToNode::Revoked`): it
//! stays, the stream's last item. No decisions here: what is sent and when
//! a session closes are the driver's.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::task::{Context, Poll, Waker};

use bytes::Bytes;
use futures::Stream;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tonic::Status;

use super::codec::{self, Encoded};
use crate::driver::ToNode;

/// A session's outgoing stream (see the module docs).
pub(super) struct Outgoing {
    queue: Arc<Mutex<Queue>>,
    max_message_size: usize,
    traced: bool,
}

/// What the stream has still to send, shared with the task that empties
/// it when the session closes.
struct Queue {
    /// The session's channel, until the session closes or every sender
    /// is gone.
    rx: Option<mpsc::Receiver<ToNode>>,
    /// The wire messages of one [`ToNode`] not all sent yet (an `Assign`
    /// split over several, a batch of Cancels).
    partial: Option<Encoded>,
    /// After the close: the refusal still to send, the stream's last item.
    last: Option<Result<Bytes, Status>>,
    /// The stream's waker while it waits for a message: the close wakes it
    /// (the channel may not, its senders being still about).
    waker: Option<Waker>,
}

/// The outgoing stream of a session whose messages arrive on `rx`, and the
/// task (to spawn) that ends it once `token` (the session's) is cancelled.
/// The task holds the stream's queue weakly: a stream the node dropped
/// frees it at once.
pub(super) fn outgoing(
    rx: mpsc::Receiver<ToNode>,
    token: CancellationToken,
    max_message_size: usize,
    traced: bool,
) -> (Outgoing, impl Future<Output = ()> + Send + 'static) {
    let queue = Arc::new(Mutex::new(Queue {
        rx: Some(rx),
        partial: None,
        last: None,
        waker: None,
    }));
    let weak = Arc::downgrade(&queue);
    let closer = async move {
        token.cancelled().await;
        close(&weak, max_message_size, traced);
    };
    let stream = Outgoing {
        queue,
        max_message_size,
        traced,
    };
    (stream, closer)
}

/// Ends the stream: no more messages are taken, the queued ones are
/// dropped but a final refusal, which becomes the last item.
fn close(queue: &Weak<Mutex<Queue>>, max_message_size: usize, traced: bool) {
    let Some(queue) = queue.upgrade() else {
        return; // the stream is gone, and what it held with it
    };
    let mut queue = queue.lock().unwrap_or_else(PoisonError::into_inner);
    let Some(mut rx) = queue.rx.take() else {
        return; // ended already: every sender was gone and it was read
    };
    rx.close();
    while let Ok(message) = rx.try_recv() {
        if let ToNode::Revoked = message {
            queue.last = codec::encode(message, max_message_size, traced).next();
        }
    }
    queue.partial = None;
    if let Some(waker) = queue.waker.take() {
        waker.wake();
    }
}

impl Stream for Outgoing {
    type Item = Result<Bytes, Status>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        let mut queue = this.queue.lock().unwrap_or_else(PoisonError::into_inner);
        loop {
            if let Some(item) = queue.partial.as_mut().and_then(Iterator::next) {
                return Poll::Ready(Some(item));
            }
            queue.partial = None;
            let Some(rx) = queue.rx.as_mut() else {
                return Poll::Ready(queue.last.take());
            };
            match rx.poll_recv(cx) {
                Poll::Ready(Some(message)) => {
                    queue.partial =
                        Some(codec::encode(message, this.max_message_size, this.traced));
                }
                Poll::Ready(None) => queue.rx = None,
                Poll::Pending => {
                    queue.waker = Some(cx.waker().clone());
                    return Poll::Pending;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use futures::StreamExt;

    use weft_proto::{Attempt, TaskId, TaskSpec, limits};

    use super::*;
    use crate::scheduler::Assignment;

    fn assign(spec: &Arc<TaskSpec>) -> ToNode {
        ToNode::Assign(vec![Assignment {
            task_id: TaskId::new(),
            attempt: Attempt(1),
            spec: Arc::clone(spec),
            secret_env: None,
            parents: Vec::new(),
        }])
    }

    #[tokio::test]
    async fn an_open_session_sends_what_is_queued_in_order() {
        let spec = Arc::new(TaskSpec::call("noop", "in"));
        let (tx, rx) = mpsc::channel(8);
        let token = CancellationToken::new();
        let (mut stream, _closer) = outgoing(rx, token, limits::DEFAULT_MAX_MESSAGE_BYTES, false);
        for message in [assign(&spec), ToNode::Heartbeat] {
            tx.try_send(message).unwrap_or_else(|_| panic!("room"));
        }
        use prost::Message;
        use weft_proto::pb::coordinator_message::Body;
        let mut bodies = Vec::new();
        for _ in 0..2 {
            let bytes = stream.next().await.and_then(Result::ok).expect("a message");
            let message = weft_proto::pb::CoordinatorMessage::decode(bytes).expect("decodes");
            bodies.push(message.body);
        }
        assert!(matches!(bodies[0], Some(Body::Assign(_))), "{bodies:?}");
        assert!(matches!(bodies[1], Some(Body::Heartbeat(_))), "{bodies:?}");
    }

    /// A node that stopped reading: its stream is never polled again, yet
    /// what was queued for it goes once its session closes.
    #[tokio::test]
    async fn a_closed_sessions_queue_is_dropped_though_the_node_never_reads() {
        let spec = Arc::new(TaskSpec::call("noop", "in"));
        let before = Arc::strong_count(&spec);
        let (tx, rx) = mpsc::channel(8);
        let token = CancellationToken::new();
        let (mut stream, closer) =
            outgoing(rx, token.clone(), limits::DEFAULT_MAX_MESSAGE_BYTES, false);
        let closing = tokio::spawn(closer);
        for _ in 0..3 {
            tx.try_send(assign(&spec))
                .unwrap_or_else(|_| panic!("room"));
        }
        assert_eq!(Arc::strong_count(&spec), before + 3);
        // The session closes (lost, replaced): its senders go.
        drop(tx);
        token.cancel();
        closing.await.unwrap_or_else(|err| panic!("{err}"));
        assert_eq!(Arc::strong_count(&spec), before, "the queue is dropped");
        // Read after all, it has ended: nothing of the old session.
        assert!(stream.next().await.is_none());
    }

    #[tokio::test]
    async fn a_revoked_session_ends_with_its_refusal_and_nothing_before_it() {
        let spec = Arc::new(TaskSpec::call("noop", "in"));
        let before = Arc::strong_count(&spec);
        let (tx, rx) = mpsc::channel(8);
        let token = CancellationToken::new();
        let (mut stream, closer) =
            outgoing(rx, token.clone(), limits::DEFAULT_MAX_MESSAGE_BYTES, false);
        let closing = tokio::spawn(closer);
        tx.try_send(assign(&spec))
            .unwrap_or_else(|_| panic!("room"));
        // As `Sessions::close_with` does: the refusal, then the close.
        tx.try_send(ToNode::Revoked)
            .unwrap_or_else(|_| panic!("room"));
        token.cancel();
        closing.await.unwrap_or_else(|err| panic!("{err}"));
        assert_eq!(Arc::strong_count(&spec), before);
        match stream.next().await {
            Some(Err(status)) => assert_eq!(status.code(), tonic::Code::PermissionDenied),
            other => panic!("not the refusal: {other:?}"),
        }
        assert!(stream.next().await.is_none());
        drop(tx);
    }
}
