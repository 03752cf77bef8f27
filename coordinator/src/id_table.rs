//! A table of entries by task id: compact entries in a chunked slab, found
//! through a hash index that holds only slot numbers. The scheduler keeps
//! its live tasks in one (`scheduler::live`), the log store its index of
//! every task in the retention window in another (`store::log::index`).
//!
//! A million entries may be held at once, so the table's own overhead
//! counts. A `HashMap<TaskId, V>` keeps whole entries in its bucket array,
//! which doubles at once and stays between half and 7/8 full: right after
//! it grows, every entry pays for about two entry-sized buckets, and while
//! it grows the old and the new array are both held. Here the entries sit
//! in fixed-size chunks allocated one at a time (at most one partly used
//! chunk of slack, never a copy of the whole table), and the index's
//! buckets are 4-byte slot numbers (5 bytes with hashbrown's control
//! byte), so its empty buckets and its growth cost little.
//!
//! Unlike a B-tree, finding an entry costs the same however the ids
//! arrive: a queue served in priority or fair order touches its tasks'
//! entries out of id order, which in a tree of a million ids means a walk
//! through cold nodes per lookup; here it is one index probe and one slot.
//!
//! Freed slots are reused (a free list through the slab). When the table
//! becomes empty it gives its memory back, keeping one chunk.

use std::hash::BuildHasher;

use hashbrown::HashTable;

use weft_proto::TaskId;

/// Entries per chunk of the slab.
const CHUNK: usize = 4096;

/// End of the free list.
const NONE: u32 = u32::MAX;

/// Most entries a table can hold (slot numbers are `u32`).
pub(crate) const CAPACITY: usize = NONE as usize;

/// What a table is keyed by: a task id, as itself or as its 128 bits.
pub(crate) trait TableKey: Copy {
    fn to_bits(self) -> u128;
    fn from_bits(bits: u128) -> Self;
}

impl TableKey for TaskId {
    fn to_bits(self) -> u128 {
        self.as_u128()
    }

    fn from_bits(bits: u128) -> Self {
        TaskId::from_u128(bits)
    }
}

impl TableKey for u128 {
    fn to_bits(self) -> u128 {
        self
    }

    fn from_bits(bits: u128) -> Self {
        bits
    }
}

/// A task id as two words, so an entry needs 8-byte alignment, not the
/// 16 bytes of `u128`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct Key(u64, u64);

impl Key {
    fn of(key: impl TableKey) -> Key {
        let bits = key.to_bits();
        // Truncation is the point: the high and low halves.
        Key((bits >> 64) as u64, bits as u64)
    }

    fn bits(self) -> u128 {
        (u128::from(self.0) << 64) | u128::from(self.1)
    }
}

#[derive(Debug)]
enum Slot<V> {
    Taken { key: Key, value: V },
    Free { next: u32 },
}

/// Entries by task id. See the module docs.
#[derive(Debug)]
pub(crate) struct IdTable<K, V> {
    /// Chunks of `CHUNK` slots; each has that capacity from the start, so
    /// it never moves.
    chunks: Vec<Vec<Slot<V>>>,
    /// Slot numbers, hashed by their entry's id.
    index: HashTable<u32>,
    hasher: foldhash::fast::RandomState,
    /// First free slot, or `NONE`.
    free: u32,
    len: usize,
    key: std::marker::PhantomData<K>,
}

impl<K, V> Default for IdTable<K, V> {
    fn default() -> Self {
        IdTable {
            chunks: Vec::new(),
            index: HashTable::new(),
            hasher: foldhash::fast::RandomState::default(),
            free: NONE,
            len: 0,
            key: std::marker::PhantomData,
        }
    }
}

fn slot<V>(chunks: &[Vec<Slot<V>>], number: u32) -> &Slot<V> {
    let n = number as usize;
    &chunks[n / CHUNK][n % CHUNK]
}

fn slot_mut<V>(chunks: &mut [Vec<Slot<V>>], number: u32) -> &mut Slot<V> {
    let n = number as usize;
    &mut chunks[n / CHUNK][n % CHUNK]
}

fn key_at<V>(chunks: &[Vec<Slot<V>>], number: u32) -> Option<Key> {
    match slot(chunks, number) {
        Slot::Taken { key, .. } => Some(*key),
        Slot::Free { .. } => None,
    }
}

impl<K: TableKey, V> IdTable<K, V> {
    /// An empty table.
    pub fn new() -> Self {
        IdTable::default()
    }

    /// How many entries it holds.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when it holds none.
    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn find(&self, key: Key) -> Option<u32> {
        let chunks = &self.chunks;
        self.index
            .find(self.hasher.hash_one(key), |n| {
                key_at(chunks, *n) == Some(key)
            })
            .copied()
    }

    /// True when `id` has an entry.
    pub fn contains_key(&self, id: &K) -> bool {
        self.find(Key::of(*id)).is_some()
    }

    /// The entry of `id`.
    pub fn get(&self, id: &K) -> Option<&V> {
        match slot(&self.chunks, self.find(Key::of(*id))?) {
            Slot::Taken { value, .. } => Some(value),
            Slot::Free { .. } => None,
        }
    }

    /// The entry of `id`, to change.
    pub fn get_mut(&mut self, id: &K) -> Option<&mut V> {
        let number = self.find(Key::of(*id))?;
        match slot_mut(&mut self.chunks, number) {
            Slot::Taken { value, .. } => Some(value),
            Slot::Free { .. } => None,
        }
    }

    /// Looks up each of `ids` and drops what it found: with nothing
    /// between them, lookups of entries far apart in memory (a batch of
    /// tasks served out of order) wait for it side by side, so the
    /// batch's work after finds them in cache instead of missing once per
    /// task.
    pub fn warm(&self, ids: impl Iterator<Item = K>) {
        for id in ids {
            std::hint::black_box(self.find(Key::of(id)));
        }
    }

    /// Where the entry of `id` is: a slot number for
    /// [`get_or_insert_at`](Self::get_or_insert_at), good until that
    /// entry is removed.
    pub fn slot_of(&self, id: &K) -> Option<u32> {
        self.find(Key::of(*id))
    }

    /// The entry in slot `number` when it is `id`'s.
    pub fn at(&self, number: u32, id: &K) -> Option<&V> {
        let n = number as usize;
        match self.chunks.get(n / CHUNK)?.get(n % CHUNK)? {
            Slot::Taken { key, value } if *key == Key::of(*id) => Some(value),
            _ => None,
        }
    }

    /// The entry of `id`, made with `make` if it has none, looking first
    /// in slot `hint` (from [`slot_of`](Self::slot_of)): an entry found
    /// there needs no index probe. A stale hint (or `None`) only costs
    /// the probe.
    pub fn get_or_insert_at(
        &mut self,
        hint: Option<u32>,
        id: K,
        make: impl FnOnce() -> V,
    ) -> &mut V {
        let key = Key::of(id);
        let hinted = hint.filter(|n| self.at(*n, &id).is_some());
        let number = match hinted.or_else(|| self.find(key)) {
            Some(number) => number,
            None => self.insert_new(key, make()),
        };
        match slot_mut(&mut self.chunks, number) {
            Slot::Taken { value, .. } => value,
            // `number` was just found or filled.
            Slot::Free { .. } => unreachable!("a found slot is taken"),
        }
    }

    /// Adds `value` as `id`'s entry, replacing one already there (and
    /// answering it). The caller keeps the count under [`CAPACITY`].
    pub fn insert(&mut self, id: K, value: V) -> Option<V> {
        if let Some(old) = self.get_mut(&id) {
            return Some(std::mem::replace(old, value));
        }
        self.insert_new(Key::of(id), value);
        None
    }

    /// Puts a new entry in a slot and indexes it: its slot number.
    fn insert_new(&mut self, key: Key, value: V) -> u32 {
        let taken = Slot::Taken { key, value };
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
        let hash = self.hasher.hash_one(key);
        let (chunks, hasher) = (&self.chunks, &self.hasher);
        self.index.insert_unique(hash, number, |n| {
            hasher.hash_one(key_at(chunks, *n).unwrap_or(Key(0, 0)))
        });
        self.len += 1;
        number
    }

    /// Takes the entry of `id` out.
    pub fn remove(&mut self, id: &K) -> Option<V> {
        let key = Key::of(*id);
        let hash = self.hasher.hash_one(key);
        let chunks = &self.chunks;
        let entry = self
            .index
            .find_entry(hash, |n| key_at(chunks, *n) == Some(key))
            .ok()?;
        let (number, _) = entry.remove();
        let freed = Slot::Free { next: self.free };
        let Slot::Taken { value, .. } =
            std::mem::replace(slot_mut(&mut self.chunks, number), freed)
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
        Some(value)
    }

    /// Every entry with its id, in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = (K, &V)> {
        self.chunks.iter().flatten().filter_map(|slot| match slot {
            Slot::Taken { key, value } => Some((K::from_bits(key.bits()), value)),
            Slot::Free { .. } => None,
        })
    }

    /// Slab chunks allocated (tests: memory given back).
    #[cfg(test)]
    pub fn chunks(&self) -> usize {
        self.chunks.len()
    }

    /// The index's bucket capacity (tests: memory given back).
    #[cfg(test)]
    pub fn index_capacity(&self) -> usize {
        self.index.capacity()
    }

    /// Bytes one slot takes (tests: the slab's overhead per entry).
    #[cfg(test)]
    pub fn slot_size() -> usize {
        std::mem::size_of::<Slot<V>>()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_slot_hint_finds_its_entry_and_a_stale_one_falls_back_to_the_index() {
        let mut table: IdTable<u128, u32> = IdTable::new();
        for id in 0..(CHUNK as u128 + 10) {
            table.insert(id, id as u32);
        }
        let slot = table.slot_of(&5).expect("a slot");
        assert_eq!(table.at(slot, &5), Some(&5));
        assert_eq!(table.at(slot, &6), None, "a slot answers only its own id");
        assert_eq!(table.at(u32::MAX - 1, &5), None, "past the slab");
        *table.get_or_insert_at(Some(slot), 5, || 0) += 100;
        assert_eq!(table.get(&5), Some(&105));
        // The slot freed and taken by another id: the hint is stale.
        table.remove(&5);
        table.insert(99_999, 7);
        assert_eq!(table.slot_of(&99_999), Some(slot));
        assert_eq!(*table.get_or_insert_at(Some(slot), 5, || 42), 42);
        assert_eq!((table.get(&5), table.get(&99_999)), (Some(&42), Some(&7)));
        let other = table.slot_of(&6);
        assert_eq!(*table.get_or_insert_at(other, 7, || 0), 7);
    }

    #[test]
    fn entries_are_found_by_id_after_inserts_and_removes_across_chunks() {
        let mut table: IdTable<TaskId, u32> = IdTable::new();
        let ids: Vec<TaskId> = (0..3 * CHUNK as u128 + 7).map(TaskId::from_u128).collect();
        for (i, id) in ids.iter().enumerate() {
            assert_eq!(table.insert(*id, i as u32), None);
        }
        assert_eq!(table.len(), ids.len());
        for (i, id) in ids.iter().enumerate().filter(|(i, _)| i % 3 == 0) {
            assert_eq!(table.remove(id), Some(i as u32));
        }
        assert!(table.remove(&ids[0]).is_none(), "removed twice");
        // Freed slots are reused; every id still finds its own entry.
        let more: Vec<TaskId> = (1..=CHUNK as u128)
            .map(|i| TaskId::from_u128(i << 80 | 1))
            .collect();
        for id in &more {
            table.insert(*id, 7);
        }
        assert_eq!(table.chunks(), 4, "freed slots were not reused");
        for (i, id) in ids.iter().enumerate() {
            let found = table.get(id).copied();
            assert_eq!(found, (i % 3 != 0).then_some(i as u32), "entry {i}");
        }
        assert!(more.iter().all(|id| table.contains_key(id)));
        if let Some(value) = table.get_mut(&more[0]) {
            *value = 9;
        }
        assert_eq!(table.get(&more[0]), Some(&9));
        let mut seen: Vec<(TaskId, u32)> = table.iter().map(|(k, v)| (k, *v)).collect();
        seen.sort();
        let mut expected: Vec<(TaskId, u32)> = ids
            .iter()
            .enumerate()
            .filter(|(i, _)| i % 3 != 0)
            .map(|(i, id)| (*id, i as u32))
            .chain(more.iter().map(|id| (*id, 7)))
            .collect();
        for entry in expected.iter_mut().filter(|(id, _)| *id == more[0]) {
            entry.1 = 9;
        }
        expected.sort();
        assert_eq!(seen, expected, "iter yields every entry once, with its id");
    }

    #[test]
    fn an_emptied_table_gives_its_memory_back_and_works_on() {
        let mut table: IdTable<u128, u8> = IdTable::new();
        for id in 0..2 * CHUNK as u128 {
            table.insert(id, 1);
        }
        for id in 0..2 * CHUNK as u128 {
            table.remove(&id);
        }
        assert!(table.is_empty());
        assert_eq!(table.chunks(), 1);
        assert_eq!(table.index_capacity(), 0);
        table.insert(5, 2);
        assert_eq!(table.get(&5), Some(&2));
        assert!(table.get(&4).is_none());
    }

    #[test]
    fn inserting_an_id_again_replaces_its_entry() {
        let mut table: IdTable<TaskId, u32> = IdTable::new();
        let id = TaskId::new();
        assert_eq!(table.insert(id, 1), None);
        assert_eq!(table.insert(id, 2), Some(1));
        assert_eq!(table.len(), 1);
        *table.get_or_insert_at(None, id, || 5) += 1;
        assert_eq!(table.remove(&id), Some(3));
        assert_eq!(
            *table.get_or_insert_at(None, id, || 5),
            5,
            "made when absent"
        );
        assert_eq!(table.len(), 1);
    }
}
