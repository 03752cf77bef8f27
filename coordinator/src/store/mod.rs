//! The task store: durable task records and per-task event logs.
//!
//! The store is written only by the driver, once per inbox batch, through
//! [`Store::commit`] (group commit). Services read it directly (`Get`, `List`,
//! `Watch` history) because every reply is sent only after its batch is
//! committed, so a reader never sees less than what was acknowledged.
//!
//! Records are plain data (no channels, no tonic types), so a durable
//! implementation only has to serialize them (`codec` does, with prost).
//!
//! Reads and commits may touch the disk: async callers run them on the
//! blocking pool (the crate-private `store::blocking` helper), never on a
//! runtime worker.
//!
//! Layout:
//! - `record` — what is stored: [`TaskRecord`], [`TaskEvent`] and
//!   [`EventBody`], [`Record`] (one write), [`Loaded`] (what a restart
//!   reads back), [`NodeIdentityRecord`] (a joined node).
//! - `engine` — the [`Store`] trait every engine implements,
//!   [`StoreError`], [`ListQuery`]/[`ListPage`] (a bounded, filtered
//!   list scan), and the blocking-pool helper.
//! - `codec` — records <-> protobuf bytes, a record's wire form for the
//!   services, and its size estimated without encoding it (a list page's
//!   byte budget).
//! - [`redb`] — [`RedbStore`], the older durable store (one file), read
//!   when a data dir is moved to the log.
//! - `seal` — the checksum every value the durable store writes ends in,
//!   checked on every read, and the one-time upgrade of older stores.
//! - [`marker`] — the data dir's `STORE_ID` file: a store existed here, so
//!   a missing or empty store file is refused, never replaced.
//! - [`pg`] — [`PgStore`], the store in PostgreSQL (`--database-url`).
//! - [`memory`] — [`MemoryStore`], the in-memory store (tests, `weft local`,
//!   `--in-memory`).
//! - [`migrate`] — [`open_data_dir`](migrate::open_data_dir): a data
//!   dir's store (the log), moving a redb data dir to it once;
//!   [`copy_store`](migrate::copy_store): one store copied into another
//!   through the trait.
//! - `power_cut` (tests only) — a simulated disk (one file, or a
//!   directory of files) that loses what was not synced at a power cut;
//!   `power_cut_tests` cuts power under the redb store with it, and
//!   `log/power_cut_tests.rs` under the log store.

use weft_proto::TaskId;

pub(crate) mod codec;
#[cfg(test)]
mod damage_tests;
mod engine;
#[cfg(test)]
mod job_tests;
#[cfg(test)]
mod list_tests;
pub mod log;
pub mod marker;
pub mod memory;
pub mod migrate;
#[cfg(test)]
mod migrate_tests;
pub mod pg;
#[cfg(test)]
mod power_cut;
#[cfg(test)]
mod power_cut_tests;
mod record;
#[cfg(test)]
mod recovery_memory_tests;
pub mod redb;
mod schedule;
mod seal;
#[cfg(test)]
mod tests;

pub use engine::{ListPage, ListQuery, Store, StoreError};
pub(crate) use engine::{blocking, panic_message};
pub use log::LogStore;
pub use memory::MemoryStore;
pub use pg::PgStore;
pub use record::{
    AttemptRecord, EventBody, FinalAttempt, Loaded, MAX_ATTEMPT_HISTORY, MAX_RECENTLY_FINAL,
    NodeIdentityRecord, Record, TaskEvent, TaskRecord,
};
pub use redb::RedbStore;
pub use schedule::ScheduleRecord;
pub(crate) use schedule::{decode_schedule, encode_schedule};

/// The ids [`Store::expire`] must keep, looked up as it walks its due
/// tasks: a hash set when there are more than a few.
pub(crate) struct KeepSet<'a> {
    few: &'a [TaskId],
    many: Option<crate::IdSet<TaskId>>,
}

impl<'a> KeepSet<'a> {
    pub(crate) fn new(keep: &'a [TaskId]) -> KeepSet<'a> {
        KeepSet {
            few: keep,
            many: (keep.len() > 8).then(|| keep.iter().copied().collect()),
        }
    }

    pub(crate) fn holds(&self, id: TaskId) -> bool {
        match &self.many {
            Some(many) => many.contains(&id),
            None => self.few.contains(&id),
        }
    }
}
