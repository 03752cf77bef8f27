//! Compaction: a sealed segment whose bytes are all dead (superseded,
//! expired) is removed; otherwise the oldest sealed segment's current
//! records are copied, verbatim, to the head of the log, and then it is
//! removed.
//!
//! Only the oldest segment is ever copied, and a segment holding a
//! deletion (an expiry, a deleted schedule or limit) is removed only once
//! it is the oldest: a deletion must outlive every older record of what
//! it deleted, or that record would come back at the next open. Copies
//! are checked against the index and appended under the writer's lock, so
//! a record changed meanwhile is never copied over its newer self.

use super::frame::{self, FRAME_HEADER};
use super::index::Loc;
use super::recover::Reader;
use super::{Inner, StoreError, io_error, segment_name};

/// Bytes of records copied per frame.
const COPY_BATCH: usize = 1 << 20;

impl Inner {
    /// The segment being written: the newest.
    fn active_segment(index: &super::Index) -> u32 {
        index.segments.keys().next_back().copied().unwrap_or(0)
    }

    /// Whether a compaction step has work: a dead segment can be removed,
    /// or copying the oldest is due ([`copy_due`](Self::copy_due)).
    pub(super) fn compaction_due(&self) -> bool {
        let Ok(index) = self.index.read() else {
            return false;
        };
        let active = Self::active_segment(&index);
        if self.removable(&index, active).is_some() {
            return true;
        }
        self.copy_due(&index, active)
    }

    /// Whether the sealed segments hold more dead bytes than live ones, and
    /// at least a segment's worth: then copying the oldest is worth it.
    fn copy_due(&self, index: &super::Index, active: u32) -> bool {
        let (dead, live) = index.garbage(active);
        let floor = self
            .segment_bytes
            .load(std::sync::atomic::Ordering::Relaxed);
        dead > 0 && dead >= live.max(floor)
    }

    /// A sealed segment nothing current is in that may go now.
    fn removable(&self, index: &super::Index, active: u32) -> Option<u32> {
        let oldest = index.segments.keys().next().copied();
        index
            .segments
            .iter()
            .find(|(no, s)| **no != active && s.live == 0 && (!s.deletes || Some(**no) == oldest))
            .map(|(no, _)| *no)
    }

    /// See [`LogStore::compact_step`](super::LogStore::compact_step).
    pub(super) fn compact_step(&self) -> Result<bool, StoreError> {
        let _one = self.compacting.lock().map_err(|_| StoreError::Poisoned)?;
        let (active, removable, oldest) = {
            let index = self.read_index()?;
            let active = Self::active_segment(&index);
            let oldest = index
                .segments
                .iter()
                .next()
                .filter(|(no, _)| **no != active && self.copy_due(&index, active))
                .map(|(no, s)| (*no, std::sync::Arc::clone(&s.file), s.len));
            (active, self.removable(&index, active), oldest)
        };
        if let Some(no) = removable {
            self.remove_segment(no)?;
            return Ok(true);
        }
        let Some((no, file, len)) = oldest else {
            return Ok(false);
        };
        debug_assert!(no != active);
        let mut reader = Reader::new(&*file, len);
        let mut batch: Vec<(Loc, Vec<u8>)> = Vec::new();
        let mut batch_bytes = 0;
        let mut at = 0u64;
        while at < len {
            // A segment's header frame is salted with 0.
            let salt = if at == 0 { 0 } else { self.store_id };
            let Some((_, payload)) = reader
                .frame(at, salt)
                .map_err(|e| io_error("compacting: reading a segment", &e))?
            else {
                return Err(StoreError::Damaged {
                    table: "log",
                    key: format!("{} at byte {at}", segment_name(no)),
                    reason: "a frame fails its checksum",
                });
            };
            let payload_at = at + FRAME_HEADER as u64;
            at = payload_at + payload.len() as u64;
            for entry in frame::records(&payload) {
                let (at, raw) = entry.map_err(|e| {
                    StoreError::Inconsistent(format!("compacting {}: {e}", segment_name(no)))
                })?;
                let loc = Loc {
                    seg: no,
                    off: u32::try_from(payload_at + at as u64).unwrap_or(u32::MAX),
                    len: u32::try_from(raw.bytes.len()).unwrap_or(u32::MAX),
                };
                batch_bytes += raw.bytes.len();
                batch.push((loc, raw.bytes.to_vec()));
            }
            if batch_bytes >= COPY_BATCH {
                self.copy(&mut batch)?;
                batch_bytes = 0;
            }
        }
        self.copy(&mut batch)?;
        let left = self.read_index()?.segments.get(&no).map_or(0, |s| s.live);
        if left > 0 {
            return Err(StoreError::Inconsistent(format!(
                "compacting {}: {left} bytes still current after copying",
                segment_name(no)
            )));
        }
        self.remove_segment(no)?;
        Ok(true)
    }

    /// Appends the records of `batch` that are still current, as one frame.
    fn copy(&self, batch: &mut Vec<(Loc, Vec<u8>)>) -> Result<(), StoreError> {
        if batch.is_empty() {
            return Ok(());
        }
        let mut writer = self.lock_writer()?;
        let mut buf = std::mem::take(&mut writer.buf);
        buf.clear();
        buf.resize(FRAME_HEADER, 0);
        {
            let index = self.read_index()?;
            for (loc, bytes) in batch.iter() {
                let current =
                    frame::record(bytes, false).is_ok_and(|(raw, _)| index.is_current(&raw, *loc));
                if current {
                    buf.extend_from_slice(bytes);
                }
            }
        }
        batch.clear();
        if buf.len() == FRAME_HEADER {
            writer.buf = buf;
            return Ok(());
        }
        self.append(&mut writer, buf, &|_| None)
    }

    /// Removes a segment's file (then syncs the directory) and forgets it.
    fn remove_segment(&self, no: u32) -> Result<(), StoreError> {
        self.dir
            .remove(&segment_name(no))
            .map_err(|e| io_error("compacting: removing a segment", &e))?;
        self.index
            .write()
            .map_err(|_| StoreError::Poisoned)?
            .segments
            .remove(&no);
        self.dir
            .sync()
            .map_err(|e| io_error("compacting: syncing the log directory", &e))?;
        tracing::debug!(segment = %segment_name(no), "log segment compacted away");
        Ok(())
    }

    /// The background compaction thread: waits to be woken (or polls), and
    /// compacts while it is due.
    pub(super) fn compact_loop(&self) {
        loop {
            {
                let Ok(stop) = self.wake.0.lock() else {
                    return;
                };
                if *stop {
                    return;
                }
                let Ok((stop, _)) = self.wake.1.wait_timeout(stop, super::COMPACT_POLL) else {
                    return;
                };
                if *stop {
                    return;
                }
            }
            while self.compaction_due() {
                if self.wake.0.lock().map_or(true, |stop| *stop) {
                    return;
                }
                match self.compact_step() {
                    Ok(true) => {}
                    Ok(false) => break,
                    Err(err) => {
                        tracing::warn!(error = %err, "log compaction failed; retrying later");
                        break;
                    }
                }
            }
        }
    }
}
