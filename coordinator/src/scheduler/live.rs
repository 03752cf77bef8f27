//! The table of live tasks: compact entries in a chunked slab, found by id
//! through a hash index that holds only slot numbers.
//!
//! A million tasks may wait at once, so the table's own overhead counts. A
//! `HashMap<TaskId, LiveTask>` keeps whole entries in its bucket array,
//! which doubles at once and stays between half and 7/8 full: right after
//! it grows, every task pays for about two entry-sized buckets. Here the
//! entries sit in fixed-size chunks allocated one at a time (at most one
//! partly used chunk of slack, never a copy of the whole table), and the
//! index's buckets are 4-byte slot numbers (5 bytes with hashbrown's
//! control byte), so its empty buckets cost little.
//!
//! Freed slots are reused (a free list through the slab). When the table
//! becomes empty it gives its memory back, keeping one chunk.

use std::hash::BuildHasher;

use hashbrown::HashTable;

use weft_proto::TaskId;

use super::task::LiveTask;

/// Entries per chunk of the slab.
const CHUNK: usize = 4096;

/// End of the free list.
const NONE: u32 = u32::MAX;

/// Most live tasks the table can hold (slot numbers are `u32`).
pub(crate) const CAPACITY: usize = NONE as usize;

/// A task id as two words, so an entry needs 8-byte alignment, not the
/// 16 bytes of `u128`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct Key(u64, u64);

impl From<TaskId> for Key {
    fn from(id: TaskId) -> Self {
        let bits = id.as_u128();
        // Truncation is the point: the high and low halves.
        Key((bits >> 64) as u64, bits as u64)
    }
}

impl From<Key> for TaskId {
    fn from(key: Key) -> Self {
        TaskId::from_u128((u128::from(key.0) << 64) | u128::from(key.1))
    }
}

#[derive(Debug)]
enum Slot {
    Taken { key: Key, task: LiveTask },
    Free { next: u32 },
}

/// Live tasks by id. See the module docs.
#[derive(Debug, Default)]
pub(crate) struct LiveTasks {
    /// Chunks of `CHUNK` slots; each has that capacity from the start, so
    /// it never moves.
    chunks: Vec<Vec<Slot>>,
    /// Slot numbers, hashed by their entry's id.
    index: HashTable<u32>,
    hasher: foldhash::fast::RandomState,
    /// First free slot, or `NONE`.
    free: u32,
    len: usize,
}

fn slot(chunks: &[Vec<Slot>], number: u32) -> &Slot {
    let n = number as usize;
    &chunks[n / CHUNK][n % CHUNK]
}

fn slot_mut(chunks: &mut [Vec<Slot>], number: u32) -> &mut Slot {
    let n = number as usize;
    &mut chunks[n / CHUNK][n % CHUNK]
}

fn key_at(chunks: &[Vec<Slot>], number: u32) -> Option<Key> {
    match slot(chunks, number) {
        Slot::Taken { key, .. } => Some(*key),
        Slot::Free { .. } => None,
    }
}

impl LiveTasks {
    /// An empty table.
    pub fn new() -> Self {
        LiveTasks {
            free: NONE,
            ..LiveTasks::default()
        }
    }

    /// How many tasks it holds.
    pub fn len(&self) -> usize {
        self.len
    }

    fn hash(&self, key: Key) -> u64 {
        self.hasher.hash_one(key)
    }

    fn find(&self, id: TaskId) -> Option<u32> {
        let key = Key::from(id);
        let chunks = &self.chunks;
        self.index
            .find(self.hash(key), |n| key_at(chunks, *n) == Some(key))
            .copied()
    }

    /// True when `id` is live.
    pub fn contains_key(&self, id: &TaskId) -> bool {
        self.find(*id).is_some()
    }

    /// The live task `id`.
    pub fn get(&self, id: &TaskId) -> Option<&LiveTask> {
        match slot(&self.chunks, self.find(*id)?) {
            Slot::Taken { task, .. } => Some(task),
            Slot::Free { .. } => None,
        }
    }

    /// The live task `id`, to change.
    pub fn get_mut(&mut self, id: &TaskId) -> Option<&mut LiveTask> {
        let number = self.find(*id)?;
        match slot_mut(&mut self.chunks, number) {
            Slot::Taken { task, .. } => Some(task),
            Slot::Free { .. } => None,
        }
    }

    /// Adds `task` as `id`, replacing a task already there. The caller
    /// keeps the count under [`CAPACITY`].
    pub fn insert(&mut self, id: TaskId, task: LiveTask) {
        if let Some(old) = self.get_mut(&id) {
            *old = task;
            return;
        }
        let key = Key::from(id);
        let taken = Slot::Taken { key, task };
        let number = if self.free != NONE {
            let number = self.free;
            let slot = slot_mut(&mut self.chunks, number);
            if let Slot::Free { next } = slot {
                self.free = *next;
            }
            *slot = taken;
            number
        } else {
            if self.chunks.last().is_none_or(|c| c.len() == CHUNK) {
                self.chunks.push(Vec::with_capacity(CHUNK));
            }
            let last = self.chunks.len() - 1;
            let chunk = &mut self.chunks[last];
            chunk.push(taken);
            u32::try_from(last * CHUNK + chunk.len() - 1).unwrap_or(NONE)
        };
        let hash = self.hash(key);
        let (chunks, hasher) = (&self.chunks, &self.hasher);
        self.index.insert_unique(hash, number, |n| {
            hasher.hash_one(key_at(chunks, *n).unwrap_or(Key(0, 0)))
        });
        self.len += 1;
    }

    /// Takes the task `id` out.
    pub fn remove(&mut self, id: &TaskId) -> Option<LiveTask> {
        let key = Key::from(*id);
        let hash = self.hash(key);
        let chunks = &self.chunks;
        let entry = self
            .index
            .find_entry(hash, |n| key_at(chunks, *n) == Some(key))
            .ok()?;
        let (number, _) = entry.remove();
        let freed = Slot::Free { next: self.free };
        let Slot::Taken { task, .. } = std::mem::replace(slot_mut(&mut self.chunks, number), freed)
        else {
            return None;
        };
        self.free = number;
        self.len -= 1;
        if self.len == 0 && self.chunks.len() > 1 {
            // A backlog drained: give its memory back.
            self.chunks.truncate(1);
            self.chunks[0].clear();
            self.free = NONE;
            self.index = HashTable::new();
        }
        Some(task)
    }
}

#[cfg(test)]
mod tests {
    use std::time::SystemTime;

    use super::super::task::LiveSpec;
    use super::*;

    fn task(attempt: u32) -> LiveTask {
        let spec = LiveSpec::Inline {
            len: 0,
            data: [0; super::super::task::INLINE_INPUT],
        };
        let mut task = LiveTask::new(spec, 0, SystemTime::now());
        task.attempt = attempt;
        task
    }

    #[test]
    fn tasks_are_found_by_id_after_inserts_and_removes_across_chunks() {
        let mut live = LiveTasks::new();
        let ids: Vec<TaskId> = (0..3 * CHUNK as u128 + 7).map(TaskId::from_u128).collect();
        for (i, id) in ids.iter().enumerate() {
            live.insert(*id, task(i as u32));
        }
        assert_eq!(live.len(), ids.len());
        for (i, id) in ids.iter().enumerate().filter(|(i, _)| i % 3 == 0) {
            assert_eq!(live.remove(id).map(|t| t.attempt), Some(i as u32));
        }
        assert!(live.remove(&ids[0]).is_none(), "removed twice");
        // Freed slots are reused; every id still finds its own task.
        let more: Vec<TaskId> = (1..=CHUNK as u128)
            .map(|i| TaskId::from_u128(i << 80 | 1))
            .collect();
        for id in &more {
            live.insert(*id, task(7));
        }
        assert_eq!(live.chunks.len(), 4, "freed slots were not reused");
        for (i, id) in ids.iter().enumerate() {
            let found = live.get(id).map(|t| t.attempt);
            assert_eq!(found, (i % 3 != 0).then_some(i as u32), "task {i}");
        }
        assert!(more.iter().all(|id| live.contains_key(id)));
        if let Some(task) = live.get_mut(&more[0]) {
            task.attempt = 9;
        }
        assert_eq!(live.get(&more[0]).map(|t| t.attempt), Some(9));
    }

    #[test]
    fn an_emptied_table_gives_its_memory_back_and_works_on() {
        let mut live = LiveTasks::new();
        let ids: Vec<TaskId> = (0..2 * CHUNK as u128).map(TaskId::from_u128).collect();
        for id in &ids {
            live.insert(*id, task(1));
        }
        for id in &ids {
            live.remove(id);
        }
        assert_eq!((live.len(), live.chunks.len()), (0, 1));
        assert_eq!(live.index.capacity(), 0);
        live.insert(ids[5], task(2));
        assert_eq!(live.get(&ids[5]).map(|t| t.attempt), Some(2));
        assert!(live.get(&ids[4]).is_none());
    }

    #[test]
    fn inserting_an_id_again_replaces_its_task() {
        let mut live = LiveTasks::new();
        let id = TaskId::new();
        live.insert(id, task(1));
        live.insert(id, task(2));
        assert_eq!(live.len(), 1);
        assert_eq!(live.remove(&id).map(|t| t.attempt), Some(2));
    }

    #[test]
    fn a_slot_is_no_bigger_than_its_task_and_id() {
        let slot = std::mem::size_of::<Slot>();
        assert!(
            slot <= std::mem::size_of::<LiveTask>() + 16,
            "slot is {slot} bytes"
        );
    }
}
