//! Checksums on stored values: every value the durable store writes (task
//! records, events, secrets, tokens, node identities) ends in a CRC32C of
//! its key and its bytes, and every read checks it before decoding, so a
//! changed byte on disk is refused as damage instead of served.
//!
//! The key is part of the sum, so a value found under another key (a page
//! written to the wrong place) is damage too. A mismatch is
//! [`StoreError::Damaged`], naming the table and the key.
//!
//! Stores written before checksums (schema 1) are rewritten once, when
//! first opened by this version: see [`migrate`]; so are the limits of a
//! store written before they had checksums (schema 3). This file knows nothing of
//! what the values mean; `codec.rs` does.

use std::borrow::Borrow;

use redb::{Key, ReadableTable, TableDefinition, WriteTransaction};

use super::engine::StoreError;

/// Bytes the checksum adds to each value.
pub(crate) const CHECKSUM_LEN: usize = 4;

/// A stored value's key, as the checksum covers it and as damage is
/// reported.
#[derive(Debug, Clone, Copy)]
pub(super) enum SealKey<'a> {
    /// Tasks, secrets, node identities: by id.
    Id(u128),
    /// Events: task id and seq.
    Event(u128, u64),
    /// Tokens: by token id.
    Name(&'a str),
}

impl SealKey<'_> {
    fn crc(self) -> u32 {
        match self {
            SealKey::Id(id) => crc32c::crc32c(&id.to_be_bytes()),
            SealKey::Event(id, seq) => {
                crc32c::crc32c_append(crc32c::crc32c(&id.to_be_bytes()), &seq.to_be_bytes())
            }
            SealKey::Name(name) => crc32c::crc32c(name.as_bytes()),
        }
    }

    /// The key as a log line or an error names it: ids as ULIDs, as the
    /// CLI shows them.
    fn describe(self) -> String {
        match self {
            SealKey::Id(id) => ulid::Ulid(id).to_string(),
            SealKey::Event(id, seq) => format!("{} event {seq}", ulid::Ulid(id)),
            SealKey::Name(name) => format!("{name:?}"),
        }
    }
}

/// `value` (encoded with room for the checksum) with its checksum appended.
pub(super) fn seal(key: SealKey<'_>, mut value: Vec<u8>) -> Vec<u8> {
    let crc = crc32c::crc32c_append(key.crc(), &value);
    value.extend_from_slice(&crc.to_le_bytes());
    value
}

/// The bytes of a stored value whose checksum matches; damage otherwise.
pub(super) fn open<'v>(
    table: &'static str,
    key: SealKey<'_>,
    stored: &'v [u8],
) -> Result<&'v [u8], StoreError> {
    let damaged = |reason: &'static str| {
        let err = StoreError::Damaged {
            table,
            key: key.describe(),
            reason,
        };
        tracing::error!(table, key = %key.describe(), reason, "the store is damaged");
        err
    };
    let Some(split) = stored.len().checked_sub(CHECKSUM_LEN) else {
        return Err(damaged("value shorter than its checksum"));
    };
    let (value, sum) = stored.split_at(split);
    let mut expected = [0u8; CHECKSUM_LEN];
    expected.copy_from_slice(sum);
    if crc32c::crc32c_append(key.crc(), value) != u32::from_le_bytes(expected) {
        return Err(damaged("checksum mismatch"));
    }
    Ok(value)
}

/// Values rewritten per step of a [`migrate`], so no step holds a whole
/// table in memory.
const MIGRATE_STEP: usize = if cfg!(test) { 3 } else { 4096 };

/// Rewrites every value of `table` (written without checksums) with its
/// checksum, inside `txn`: the one-time upgrade of a schema-1 store. Keys
/// are `Copy` (ids, (id, seq)); see [`migrate_named`] for the tables
/// keyed by strings. Returns how many values were rewritten.
pub(super) fn migrate<K>(
    txn: &WriteTransaction,
    table: TableDefinition<K, &'static [u8]>,
    key_of: impl Fn(K) -> SealKey<'static>,
) -> Result<u64, StoreError>
where
    K: for<'a> Key<SelfType<'a> = K> + Copy + Ord + Borrow<K> + 'static,
{
    let backend = |e: redb::Error| StoreError::Backend {
        op: "adding checksums to an older store",
        message: e.to_string(),
    };
    let mut table = txn.open_table(table).map_err(|e| backend(e.into()))?;
    let mut done = 0u64;
    let mut after: Option<K> = None;
    loop {
        let range = match after {
            Some(last) => table.range(last..).map_err(|e| backend(e.into()))?,
            None => table.range::<K>(..).map_err(|e| backend(e.into()))?,
        };
        let mut step: Vec<(K, Vec<u8>)> = Vec::with_capacity(MIGRATE_STEP);
        for entry in range {
            let (k, v) = entry.map_err(|e| backend(e.into()))?;
            let k = k.value();
            if after.is_some_and(|last| k <= last) {
                continue;
            }
            step.push((k, v.value().to_vec()));
            if step.len() == MIGRATE_STEP {
                break;
            }
        }
        let Some(&(last, _)) = step.last() else {
            return Ok(done);
        };
        for (k, v) in step {
            let mut room = Vec::with_capacity(v.len() + CHECKSUM_LEN);
            room.extend_from_slice(&v);
            table
                .insert(k, seal(key_of(k), room).as_slice())
                .map_err(|e| backend(e.into()))?;
            done += 1;
        }
        after = Some(last);
    }
}

/// [`migrate`] for a table of few values keyed by strings (tokens by id,
/// limits by "kind/name").
pub(super) fn migrate_named(
    txn: &WriteTransaction,
    table: TableDefinition<&'static str, &'static [u8]>,
) -> Result<u64, StoreError> {
    let backend = |e: redb::Error| StoreError::Backend {
        op: "adding checksums to an older store",
        message: e.to_string(),
    };
    let mut table = txn.open_table(table).map_err(|e| backend(e.into()))?;
    let all: Vec<(String, Vec<u8>)> = table
        .iter()
        .map_err(|e| backend(e.into()))?
        .map(|entry| {
            entry
                .map(|(k, v)| (k.value().to_owned(), v.value().to_vec()))
                .map_err(|e| backend(e.into()))
        })
        .collect::<Result<_, _>>()?;
    let count = all.len() as u64;
    for (k, v) in all {
        let sealed = seal(SealKey::Name(&k), v);
        table
            .insert(k.as_str(), sealed.as_slice())
            .map_err(|e| backend(e.into()))?;
    }
    Ok(count)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sealed_value_opens_and_any_changed_byte_or_other_key_is_damage() {
        let key = SealKey::Event(7, 3);
        let sealed = seal(key, b"payload".to_vec());
        assert_eq!(sealed.len(), 7 + CHECKSUM_LEN);
        assert_eq!(open("events", key, &sealed).ok(), Some(&b"payload"[..]));
        for i in 0..sealed.len() {
            let mut bad = sealed.clone();
            bad[i] ^= 0x01;
            assert!(
                matches!(
                    open("events", key, &bad),
                    Err(StoreError::Damaged {
                        table: "events",
                        ..
                    })
                ),
                "byte {i} flipped went unnoticed"
            );
        }
        let moved = open("events", SealKey::Event(7, 4), &sealed);
        assert!(moved.is_err(), "a value under another key went unnoticed");
        let Err(err) = open("tasks", SealKey::Id(1), b"ab") else {
            panic!("a value shorter than its checksum was read");
        };
        assert!(err.to_string().contains("table tasks"), "{err}");
    }
}
