//! Opening a log: every segment read once, in order, each frame's checksum
//! checked and its records applied to a fresh index.
//!
//! The last segment may end in zeros after its last frame: the active
//! segment is kept written with zeros ahead of its end (`ZERO_AHEAD` in
//! `mod.rs`). There, a frame that starts with zeros followed only by zeros
//! to the end of the file is that unused rest, not damage, and stays for
//! the writer. Every other segment was cut to its frames and synced before
//! the next one was made, so zeros there are a bad frame like any other.
//!
//! A commit is written whole, then synced, and the next one is written
//! only after that sync returned; a segment is started only after the one
//! before it was synced. So the only frame a crash can leave unfinished
//! is the last one of the last segment, and no later frame of this log
//! follows it: such a frame (short, or failing its checksum) was never
//! acknowledged and is cut off. A bad frame anywhere else, or followed by a
//! frame of this log numbered after the last good one (its checksum salted
//! with the store id, so bytes inside a task's data that merely look like a
//! frame do not count), was synced and then changed: damage, and the start
//! is refused. Frames out of order (a segment from another copy of the log)
//! are damage too.

use std::path::Path;
use std::sync::Arc;

use super::frame::{self, FRAME_HEADER, Kind};
use super::fs::{LogDir, LogFile};
use super::index::{Index, Segment};
use super::{StoreError, Writer, create_segment, io_error, segment_name};

/// Reads a segment forward through a window, so a log of small frames is
/// not read a few bytes per system call.
pub(super) struct Reader<'f> {
    file: &'f dyn LogFile,
    len: u64,
    window: Vec<u8>,
    start: u64,
}

const WINDOW: usize = 8 << 20;

impl<'f> Reader<'f> {
    pub(super) fn new(file: &'f dyn LogFile, len: u64) -> Self {
        Reader {
            file,
            len,
            window: Vec::new(),
            start: 0,
        }
    }

    /// The `n` bytes at `at`; `None` past the end of the file.
    fn bytes(&mut self, at: u64, n: usize) -> std::io::Result<Option<&[u8]>> {
        let Some(end) = at.checked_add(n as u64).filter(|end| *end <= self.len) else {
            return Ok(None);
        };
        let have = self.start + self.window.len() as u64;
        if at < self.start || end > have {
            let size = (n.max(WINDOW) as u64).min(self.len - at) as usize;
            self.window.resize(size, 0);
            self.file.read_exact_at(&mut self.window, at)?;
            self.start = at;
        }
        let from = (at - self.start) as usize;
        Ok(Some(&self.window[from..from + n]))
    }

    /// The number and payload of a whole, valid frame at `at` of the log
    /// of store `salt` (0: a segment's header frame); `None` if the frame
    /// there is short or fails its checksum.
    pub(super) fn frame(&mut self, at: u64, salt: u64) -> std::io::Result<Option<(u64, Vec<u8>)>> {
        let Some(header) = self.bytes(at, FRAME_HEADER)? else {
            return Ok(None);
        };
        let (len, crc, seq) = frame::frame_header(header);
        if len == 0 {
            return Ok(None);
        }
        let Some(payload) = self.bytes(at + FRAME_HEADER as u64, len)? else {
            return Ok(None);
        };
        if frame::frame_crc(salt, seq, payload) != crc {
            return Ok(None);
        }
        Ok(Some((seq, payload.to_vec())))
    }

    /// Whether every byte from `at` to the end of the file is zero.
    fn zeros_to_end(&mut self, at: u64) -> std::io::Result<bool> {
        const CHUNK: usize = 1 << 20;
        let mut q = at;
        while q < self.len {
            let n = (self.len - q).min(CHUNK as u64) as usize;
            let Some(bytes) = self.bytes(q, n)? else {
                return Ok(false);
            };
            if bytes.iter().any(|b| *b != 0) {
                return Ok(false);
            }
            q += n as u64;
        }
        Ok(true)
    }

    /// Whether a valid frame of the log of store `salt`, numbered after
    /// `last`, starts anywhere after `at`: one written after the frame at
    /// `at` was synced, so that one was whole once.
    fn valid_frame_after(&mut self, at: u64, salt: u64, last: u64) -> std::io::Result<bool> {
        let mut q = at + 1;
        while q + (FRAME_HEADER + frame::RECORD_HEADER) as u64 <= self.len {
            let Some(header) = self.bytes(q, FRAME_HEADER + 1)? else {
                break;
            };
            let (len, _, seq) = frame::frame_header(header);
            let plausible = len >= frame::RECORD_HEADER
                && seq > last
                && header[FRAME_HEADER] <= Kind::LAST as u8
                && q + (FRAME_HEADER + len) as u64 <= self.len;
            if plausible && self.frame(q, salt)?.is_some() {
                return Ok(true);
            }
            q += 1;
        }
        Ok(false)
    }
}

/// Reads the log in `dir` into an index; returns it, the writer on the
/// last segment, and the store id. See the module docs.
pub(super) fn recover(
    dir: &dyn LogDir,
    label: &Path,
    create: Option<u64>,
) -> Result<(Index, Writer, u64), StoreError> {
    let unreadable = |message: String| StoreError::Unreadable {
        path: label.to_owned(),
        message,
    };
    let mut numbers: Vec<u32> = dir
        .list()
        .map_err(|e| StoreError::Open {
            path: label.to_owned(),
            message: format!("listing the log: {e}"),
        })?
        .iter()
        .filter_map(|name| name.strip_suffix(".seg")?.parse().ok())
        .collect();
    numbers.sort_unstable();
    let mut index = Index::new();
    let mut store_id: Option<u64> = None;
    // The number of the last frame read.
    let mut last_seq: Option<u64> = None;
    let mut last: Option<(u32, Arc<dyn LogFile>, u64, u64)> = None;
    let count = numbers.len();
    let started = std::time::Instant::now();
    for (i, &no) in numbers.iter().enumerate() {
        let is_last = i + 1 == count;
        let name = segment_name(no);
        let file = dir
            .open(&name)
            .map_err(|e| io_error("opening a segment", &e))?;
        let mut file_len = file.len().map_err(|e| io_error("opening a segment", &e))?;
        let mut reader = Reader::new(&*file, file_len);
        let mut at = 0u64;
        let mut header_seen = false;
        index
            .segments
            .insert(no, Segment::new(Arc::clone(&file), file_len));
        loop {
            // A segment's header frame is salted with 0: the store id is
            // in it.
            let salt = if header_seen {
                store_id.unwrap_or(0)
            } else {
                0
            };
            let frame = reader
                .frame(at, salt)
                .map_err(|e| io_error("reading the log", &e))?;
            let Some((seq, payload)) = frame else {
                if at == file_len {
                    break;
                }
                let unused = is_last
                    && reader
                        .zeros_to_end(at)
                        .map_err(|e| io_error("reading the log", &e))?;
                if unused {
                    // A frame lost to zeros here would read the same: say
                    // where the frames ended, for whoever looks into it.
                    tracing::debug!(segment = %name, frames_end = at, zeros = file_len - at, "the log's last segment ends in zeros written ahead");
                    break;
                }
                // A bad frame: an unfinished commit only at the very end.
                let later = reader
                    .valid_frame_after(at, store_id.unwrap_or(0), last_seq.unwrap_or(0))
                    .map_err(|e| io_error("reading the log", &e))?;
                if !is_last || later {
                    return Err(StoreError::Damaged {
                        table: "log",
                        key: format!("{name} at byte {at}"),
                        reason: "a frame fails its checksum and is not the last one written",
                    });
                }
                tracing::warn!(
                    segment = %name,
                    offset = at,
                    bytes = file_len - at,
                    "cutting off an unfinished commit at the end of the log (a crash before its sync returned; it was never acknowledged)"
                );
                file.set_len(at)
                    .and_then(|()| file.sync_data())
                    .map_err(|e| io_error("cutting an unfinished commit", &e))?;
                file_len = at;
                break;
            };
            let first_in_segment = !header_seen;
            if !header_seen {
                let (raw, _) = frame::record(&payload, false)
                    .map_err(|e| unreadable(format!("{name}: {e}")))?;
                let parsed = (raw.kind == Kind::Header)
                    .then(|| frame::parse_header(raw.body))
                    .flatten();
                let Some((format, id, seg)) = parsed else {
                    return Err(unreadable(format!(
                        "{name} does not start with a segment header"
                    )));
                };
                if format > frame::FORMAT {
                    return Err(unreadable(format!(
                        "{name} is in log format {format}, newer than this coordinator's ({}); run a newer coordinator",
                        frame::FORMAT
                    )));
                }
                if seg != no || store_id.is_some_and(|s| s != id) {
                    return Err(unreadable(format!(
                        "{name} belongs to another log (store {id:016x}, segment {seg})"
                    )));
                }
                store_id = Some(id);
                header_seen = true;
            }
            // Numbered one after another within a segment, and upwards
            // from one segment to the next (compaction removes segments
            // from the middle too).
            let in_order = match last_seq {
                None => true,
                Some(last) if first_in_segment => seq > last,
                Some(last) => seq == last + 1,
            };
            if !in_order {
                return Err(StoreError::Damaged {
                    table: "log",
                    key: format!("{name} at byte {at}"),
                    reason: "a frame out of sequence (a segment from another copy of the log?)",
                });
            }
            last_seq = Some(seq);
            index
                .apply_frame(no, at + FRAME_HEADER as u64, &payload, &|_| None)
                .map_err(|e| unreadable(format!("{name} at byte {at}: {e}")))?;
            at += (FRAME_HEADER + payload.len()) as u64;
        }
        if let Some(segment) = index.segments.get_mut(&no) {
            segment.len = at;
        }
        if !header_seen {
            // Only the last segment can lack its header: made, then the
            // crash came before the header was synced. Nothing is in it.
            if !is_last {
                return Err(StoreError::Damaged {
                    table: "log",
                    key: name,
                    reason: "a sealed segment without its header",
                });
            }
            if create.is_none() && last.is_none() {
                // The only segment of a log that existed: lost, not new.
                return Err(StoreError::Missing {
                    path: label.to_owned(),
                    marker: label.to_owned(),
                    what: format!("holds no log ({name} is empty or cut short)"),
                });
            }
            index.segments.remove(&no);
            dir.remove(&name)
                .and_then(|()| dir.sync())
                .map_err(|e| io_error("removing an unfinished segment", &e))?;
            continue;
        }
        last = Some((no, file, at, file_len));
    }
    index.check().map_err(|(id, what)| StoreError::Damaged {
        table: "log",
        key: ulid::Ulid(id).to_string(),
        reason: what,
    })?;
    let (store_id, (active, file, len, end)) = match (store_id, last) {
        (Some(id), Some(last)) => (id, last),
        _ => {
            let Some(id) = create else {
                return Err(StoreError::Missing {
                    path: label.to_owned(),
                    marker: label.to_owned(),
                    what: "holds no log".into(),
                });
            };
            let no = numbers.last().map_or(1, |n| n + 1);
            let seq = last_seq.map_or(1, |s| s + 1);
            last_seq = Some(seq);
            let (file, len) = create_segment(dir, no, id, seq)?;
            index
                .segments
                .insert(no, Segment::new(Arc::clone(&file), len));
            (id, (no, file, len, len))
        }
    };
    tracing::debug!(
        path = %label.display(),
        segments = index.segments.len(),
        tasks = index.tasks.len(),
        seconds = started.elapsed().as_secs_f64(),
        "log read"
    );
    Ok((
        index,
        Writer {
            active,
            file,
            len,
            end,
            seq: last_seq.unwrap_or(0),
            buf: Vec::new(),
            pending: Default::default(),
            broken: None,
        },
        store_id,
    ))
}
