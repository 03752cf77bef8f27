//! `WaitManyBatches`: a `WaitMany` feed with the records that are ready
//! together sent in one `TaskBatch`.
//!
//! A client's cost per stream message (a Python client's especially) is
//! far above its cost per record, and final records arrive from the
//! driver a commit at a time; so whatever is ready when the stream is
//! polled goes out as one message. A batch holds at most
//! [`MAX_BATCH_TASKS`] records and stays within [`BATCH_BYTES`] encoded
//! bytes, except a single record larger than that, which goes alone (as
//! `WaitMany` would send it). Nothing is waited for to fill a batch.

use std::pin::Pin;
use std::task::{Context, Poll};

use futures::Stream;
use prost::Message;
use tonic::Status;
use weft_proto::pb;

/// Most records in one batch.
pub(crate) const MAX_BATCH_TASKS: usize = 1024;
/// Encoded bytes a batch stays within (a record larger than this goes alone).
pub(crate) const BATCH_BYTES: usize = 1024 * 1024;

/// The records of `inner` in batches of those ready together.
pub(crate) struct Batches<S> {
    inner: S,
    /// The item that did not fit the last batch (a record, or the error
    /// that ends the stream), sent first next time.
    held: Option<Result<pb::Task, Status>>,
    done: bool,
}

impl<S> Batches<S> {
    pub(crate) fn new(inner: S) -> Self {
        Batches {
            inner,
            held: None,
            done: false,
        }
    }
}

impl<S> Stream for Batches<S>
where
    S: Stream<Item = Result<pb::Task, Status>> + Unpin,
{
    type Item = Result<pb::TaskBatch, Status>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        let mut tasks = Vec::new();
        let mut bytes = 0;
        match this.held.take() {
            Some(Err(status)) => return Poll::Ready(Some(Err(status))),
            Some(Ok(task)) => {
                bytes += task.encoded_len();
                tasks.push(task);
            }
            None => {}
        }
        while !this.done && tasks.len() < MAX_BATCH_TASKS && bytes < BATCH_BYTES {
            match Pin::new(&mut this.inner).poll_next(cx) {
                Poll::Ready(Some(Ok(task))) => {
                    let len = task.encoded_len();
                    if !tasks.is_empty() && bytes + len > BATCH_BYTES {
                        this.held = Some(Ok(task));
                        break;
                    }
                    bytes += len;
                    tasks.push(task);
                }
                Poll::Ready(Some(Err(status))) => {
                    if tasks.is_empty() {
                        return Poll::Ready(Some(Err(status)));
                    }
                    // The records before the error go out first.
                    this.held = Some(Err(status));
                    break;
                }
                Poll::Ready(None) => this.done = true,
                Poll::Pending if tasks.is_empty() => return Poll::Pending,
                Poll::Pending => break,
            }
        }
        if tasks.is_empty() {
            return Poll::Ready(None);
        }
        Poll::Ready(Some(Ok(pb::TaskBatch { tasks })))
    }
}

#[cfg(test)]
mod tests {
    use futures::StreamExt;
    use futures::stream;

    use super::*;

    fn task(id: &str, output: usize) -> pb::Task {
        pb::Task {
            id: id.to_string(),
            output: vec![7; output].into(),
            ..Default::default()
        }
    }

    fn ids(batch: &pb::TaskBatch) -> Vec<&str> {
        batch.tasks.iter().map(|t| t.id.as_str()).collect()
    }

    #[tokio::test]
    async fn records_ready_together_go_in_one_batch_in_their_order() {
        let items = (0..5).map(|i| Ok(task(&i.to_string(), 1)));
        let batches: Vec<_> = Batches::new(stream::iter(items)).collect().await;
        assert_eq!(batches.len(), 1);
        assert_eq!(ids(batches[0].as_ref().unwrap()), ["0", "1", "2", "3", "4"]);
    }

    #[tokio::test]
    async fn a_batch_keeps_within_its_count_and_bytes_and_a_large_record_goes_alone() {
        let many = (0..MAX_BATCH_TASKS + 3).map(|i| Ok(task(&i.to_string(), 1)));
        let sizes: Vec<usize> = Batches::new(stream::iter(many))
            .map(|b| b.unwrap().tasks.len())
            .collect()
            .await;
        assert_eq!(sizes, [MAX_BATCH_TASKS, 3]);

        let large = [
            Ok(task("a", BATCH_BYTES / 2)),
            Ok(task("b", BATCH_BYTES)),
            Ok(task("c", 10)),
        ];
        let batches: Vec<_> = Batches::new(stream::iter(large)).collect().await;
        let got: Vec<Vec<&str>> = batches.iter().map(|b| ids(b.as_ref().unwrap())).collect();
        assert_eq!(got, [vec!["a"], vec!["b"], vec!["c"]]);
        for batch in &batches {
            let batch = batch.as_ref().unwrap();
            assert!(batch.tasks.len() == 1 || batch.encoded_len() <= BATCH_BYTES);
        }
    }

    #[tokio::test]
    async fn records_before_an_error_are_sent_then_the_error() {
        let items = [
            Ok(task("a", 1)),
            Err(Status::unavailable("gone")),
            Ok(task("b", 1)),
        ];
        let mut batches = Batches::new(stream::iter(items));
        assert_eq!(ids(&batches.next().await.unwrap().unwrap()), ["a"]);
        let error = batches.next().await.unwrap().unwrap_err();
        assert_eq!(error.code(), tonic::Code::Unavailable);
    }

    #[tokio::test]
    async fn nothing_is_waited_for_to_fill_a_batch() {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let mut batches = Batches::new(tokio_stream::wrappers::UnboundedReceiverStream::new(rx));
        tx.send(Ok(task("a", 1))).unwrap();
        assert_eq!(ids(&batches.next().await.unwrap().unwrap()), ["a"]);
        tx.send(Ok(task("b", 1))).unwrap();
        tx.send(Ok(task("c", 1))).unwrap();
        assert_eq!(ids(&batches.next().await.unwrap().unwrap()), ["b", "c"]);
        drop(tx);
        assert!(batches.next().await.is_none());
    }
}
