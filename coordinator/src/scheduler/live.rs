//! The table of live tasks: the crate's [`IdTable`] of compact
//! [`LiveTask`]s (see `id_table.rs` for why a slab and a hash index of
//! slot numbers, not a `HashMap` of whole entries).

use weft_proto::TaskId;

pub(crate) use crate::id_table::CAPACITY;
use crate::id_table::IdTable;

use super::task::LiveTask;

/// Live tasks by id.
pub(crate) type LiveTasks = IdTable<TaskId, LiveTask>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_slot_is_no_bigger_than_its_task_and_id() {
        let slot = LiveTasks::slot_size();
        assert!(
            slot <= std::mem::size_of::<LiveTask>() + 16,
            "slot is {slot} bytes"
        );
    }
}
