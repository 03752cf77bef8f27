//! What a node session's reader holds while the driver cannot take more:
//! the node's messages, read off the stream at once and merged where the
//! order allows (the reader bounds it in bytes).
//!
//! Why it exists: HTTP/2 (h2) charges every small DATA frame received but
//! not yet read by the application against one budget per connection (about
//! 2,000 frames of a few bytes with the default window), and answers
//! `GOAWAY ENHANCE_YOUR_CALM` when it runs out, failing every rpc on that
//! connection. A node's heartbeats, credits and small event batches are
//! such frames, so the reader never leaves them unread behind a busy
//! driver: it keeps reading into this backlog instead.
//!
//! Merging keeps the backlog small under a flood of small messages without
//! changing what the driver concludes: heartbeats fold into whatever is
//! queued (every command shows the node alive), consecutive grants are
//! summed, and events join the last queued batch, which may move them ahead
//! of a grant queued after that batch but never a grant ahead of events (the
//! scheduler caps a grant by the room free when it applies it, so a grant
//! applied later is never cut more). `Draining` is never crossed. A merged
//! batch stays within one message's worth of bytes.
//!
//! A plain struct: no channels, no runtime. The reader (`mod.rs`) decides
//! when to read and when to hand an item to the driver.

use std::collections::VecDeque;

use crate::scheduler::NodeTaskEvent;

/// Bytes counted for each queued item besides its events' own.
const ITEM_COST: usize = 64;

/// What a node said, decoded, as the backlog holds it.
#[derive(Debug, PartialEq)]
pub(super) enum Item {
    /// Slots granted (summed).
    Credits(u32),
    /// Alive; only ever queued alone.
    Heartbeat,
    /// Attempt events in order, and the bytes counted for them.
    Events(Vec<NodeTaskEvent>, usize),
    /// The node drains.
    Draining,
}

impl Item {
    fn cost(&self) -> usize {
        match self {
            Item::Events(_, bytes) => ITEM_COST + bytes,
            Item::Credits(_) | Item::Heartbeat | Item::Draining => ITEM_COST,
        }
    }
}

/// A node session's undelivered messages (see the module docs).
pub(super) struct Backlog {
    items: VecDeque<Item>,
    bytes: usize,
    /// Most bytes of events merged into one batch.
    batch: usize,
}

impl Backlog {
    /// An empty backlog, merging event batches up to `batch` bytes each.
    pub(super) fn new(batch: usize) -> Backlog {
        Backlog {
            items: VecDeque::new(),
            bytes: 0,
            batch,
        }
    }

    /// True when nothing waits for the driver.
    pub(super) fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// Bytes held (what the reader bounds).
    pub(super) fn bytes(&self) -> usize {
        self.bytes
    }

    /// The oldest item, to hand to the driver.
    pub(super) fn pop(&mut self) -> Option<Item> {
        let item = self.items.pop_front()?;
        self.bytes -= item.cost();
        Some(item)
    }

    /// Adds what the node sent next, merged where it may be.
    pub(super) fn push(&mut self, item: Item) {
        // A lone queued heartbeat says nothing the next item does not.
        if matches!(item, Item::Heartbeat) && !self.items.is_empty() {
            return;
        }
        if matches!(self.items.back(), Some(Item::Heartbeat)) {
            self.pop_back();
        }
        let len = self.items.len();
        match item {
            Item::Credits(grant) => {
                if let Some(Item::Credits(queued)) = self.items.back_mut() {
                    *queued = queued.saturating_add(grant);
                    return;
                }
                self.push_back(Item::Credits(grant));
            }
            Item::Events(events, bytes) => {
                // The last batch, or the one just before a trailing grant.
                let target = match self.items.back() {
                    Some(Item::Events(..)) => len.checked_sub(1),
                    Some(Item::Credits(_)) => len.checked_sub(2),
                    _ => None,
                };
                let merged = target.and_then(|i| match self.items.get_mut(i) {
                    Some(Item::Events(queued, queued_bytes))
                        if *queued_bytes + bytes <= self.batch =>
                    {
                        Some((queued, queued_bytes))
                    }
                    _ => None,
                });
                match merged {
                    Some((queued, queued_bytes)) => {
                        queued.extend(events);
                        *queued_bytes += bytes;
                        self.bytes += bytes;
                    }
                    None => self.push_back(Item::Events(events, bytes)),
                }
            }
            Item::Draining => {
                if !matches!(self.items.back(), Some(Item::Draining)) {
                    self.push_back(Item::Draining);
                }
            }
            Item::Heartbeat => self.push_back(Item::Heartbeat),
        }
    }

    fn push_back(&mut self, item: Item) {
        self.bytes += item.cost();
        self.items.push_back(item);
    }

    fn pop_back(&mut self) {
        if let Some(item) = self.items.pop_back() {
            self.bytes -= item.cost();
        }
    }
}

/// Bytes counted for `events` that arrived as `encoded` bytes on the wire:
/// those, and what each decoded event costs besides.
pub(super) fn event_bytes(encoded: usize, events: &[NodeTaskEvent]) -> usize {
    encoded + std::mem::size_of_val(events)
}

#[cfg(test)]
mod tests {
    use weft_proto::{Attempt, TaskId};

    use super::*;
    use crate::scheduler::NodeEventBody;

    fn events(n: usize) -> Item {
        let events: Vec<_> = (0..n)
            .map(|_| NodeTaskEvent {
                task_id: TaskId::new(),
                attempt: Attempt(1),
                body: NodeEventBody::Started,
            })
            .collect();
        let bytes = event_bytes(40 * n, &events);
        Item::Events(events, bytes)
    }

    fn kinds(backlog: &mut Backlog) -> Vec<String> {
        let mut out = Vec::new();
        while let Some(item) = backlog.pop() {
            out.push(match item {
                Item::Credits(g) => format!("C{g}"),
                Item::Heartbeat => "H".into(),
                Item::Events(e, _) => format!("E{}", e.len()),
                Item::Draining => "D".into(),
            });
        }
        assert_eq!(backlog.bytes(), 0, "every byte counted is released");
        out
    }

    #[test]
    fn a_flood_of_small_messages_stays_a_few_items() {
        let mut backlog = Backlog::new(16 << 20);
        for _ in 0..10_000 {
            backlog.push(Item::Heartbeat);
            backlog.push(events(1));
            backlog.push(Item::Credits(1));
            backlog.push(Item::Heartbeat);
        }
        assert_eq!(kinds(&mut backlog), ["E10000", "C10000"]);
    }

    #[test]
    fn grants_never_move_ahead_of_the_events_they_follow() {
        let mut backlog = Backlog::new(1 << 20);
        backlog.push(Item::Credits(2));
        backlog.push(events(1));
        backlog.push(Item::Credits(1));
        backlog.push(events(2));
        backlog.push(Item::Credits(3));
        // The grant of 2 came before any event; the later events join the
        // first batch, ahead of the grants that followed it (summed).
        assert_eq!(kinds(&mut backlog), ["C2", "E3", "C4"]);
    }

    #[test]
    fn draining_is_never_crossed_and_a_lone_heartbeat_is_kept() {
        let mut backlog = Backlog::new(1 << 20);
        backlog.push(Item::Heartbeat);
        assert_eq!(kinds(&mut backlog), ["H"]);
        backlog.push(events(1));
        backlog.push(Item::Draining);
        backlog.push(Item::Draining);
        backlog.push(events(1));
        backlog.push(Item::Credits(1));
        assert_eq!(kinds(&mut backlog), ["E1", "D", "E1", "C1"]);
    }

    #[test]
    fn a_merged_batch_stays_within_one_message() {
        let one = match events(1) {
            Item::Events(_, bytes) => bytes,
            _ => unreachable!(),
        };
        let mut backlog = Backlog::new(3 * one);
        for _ in 0..7 {
            backlog.push(events(1));
        }
        assert_eq!(kinds(&mut backlog), ["E3", "E3", "E1"]);
    }
}
