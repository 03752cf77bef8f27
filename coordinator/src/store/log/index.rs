//! The log store's in-memory index: where the latest record of everything
//! is, rebuilt at open by reading the log once, and kept by applying each
//! commit's frame the same way, so what a restart rebuilds is what the
//! running store had.
//!
//! Per task it keeps the place of its record and of each event, and its
//! head (state, last change, attempt, outcome), so `List` by state,
//! retention and the recently finished results need no read. Per segment
//! it keeps how many of its bytes are still the latest of something
//! (`live`): compaction copies those and deletes the file.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use super::frame::{self, Key, Kind, Raw, TaskHead};
use super::fs::LogFile;
use crate::id_table::IdTable;

/// Where a record is: segment, offset in it, length.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Loc {
    pub seg: u32,
    pub off: u32,
    pub len: u32,
}

impl Loc {
    /// Not (yet) seen: an event recovery met before an older one.
    pub const NONE: Loc = Loc {
        seg: u32::MAX,
        off: 0,
        len: 0,
    };

    pub fn is_none(self) -> bool {
        self.seg == u32::MAX
    }
}

/// One task in the index.
#[derive(Clone, Debug)]
pub(super) struct TaskEntry {
    /// Its latest record ([`Loc::NONE`] while recovery has seen only events).
    pub record: Loc,
    /// Its spec, written once ([`Loc::NONE`] until seen).
    pub spec: Loc,
    pub head: TaskHead,
    /// Its events, by seq.
    pub events: Events,
    pub secrets: Option<Loc>,
}

/// One segment file.
#[derive(Clone, Debug)]
pub(super) struct Segment {
    pub file: Arc<dyn LogFile>,
    /// Bytes written to it.
    pub len: u64,
    /// Bytes of it that are the latest record of something.
    pub live: u64,
    /// It holds a deletion (an expiry, a deleted schedule or limit): it
    /// may go only once every older segment has, or the deleted records
    /// there would come back at the next open.
    pub deletes: bool,
}

impl Segment {
    /// A segment `len` bytes long, nothing in it current yet.
    pub fn new(file: Arc<dyn LogFile>, len: u64) -> Segment {
        Segment {
            file,
            len,
            live: 0,
            deletes: false,
        }
    }
}

/// The index. See the module docs.
#[derive(Debug, Default)]
pub(super) struct Index {
    /// Every task by id, found in one probe however out of order its
    /// changes come (a queue served by priority or fair share touches its
    /// tasks far from id order); ordered scans go through `by_state`.
    pub tasks: IdTable<u128, TaskEntry>,
    /// Task ids by state number.
    pub by_state: Vec<BTreeSet<u128>>,
    /// Final tasks by (last change in ms, id).
    pub finals: BTreeSet<(u64, u128)>,
    pub tokens: BTreeMap<String, Loc>,
    pub nodes: BTreeMap<u128, Loc>,
    pub schedules: BTreeMap<String, Loc>,
    pub limits: BTreeMap<String, Loc>,
    pub segments: BTreeMap<u32, Segment>,
}

impl Index {
    pub fn new() -> Index {
        Index {
            by_state: vec![BTreeSet::new(); weft_proto::TASK_STATES + 1],
            ..Index::default()
        }
    }

    /// The ids in state number `state`.
    pub fn in_state(&self, state: u8) -> Option<&BTreeSet<u128>> {
        self.by_state.get(usize::from(state))
    }

    /// Up to `take` ids of tasks with a record in `range`, from its low
    /// end (`ascending`) or its high end: every such task is in exactly
    /// one state's set, so this merges the sets' ends.
    pub fn ids_in(&self, range: std::ops::Range<u128>, ascending: bool, take: usize) -> Vec<u128> {
        let mut ids: Vec<u128> = Vec::new();
        for set in &self.by_state {
            let found = set.range(range.clone());
            if ascending {
                ids.extend(found.take(take));
            } else {
                ids.extend(found.rev().take(take));
            }
        }
        if ascending {
            ids.sort_unstable();
        } else {
            ids.sort_unstable_by(|a, b| b.cmp(a));
        }
        ids.truncate(take);
        ids
    }

    fn state_set(&mut self, state: u8) -> &mut BTreeSet<u128> {
        state_set(&mut self.by_state, state)
    }

    /// `loc` is no longer the latest of anything.
    fn dead(&mut self, loc: Loc) {
        dead(&mut self.segments, loc);
    }

    fn alive(&mut self, loc: Loc) {
        alive(&mut self.segments, loc);
    }

    fn replace(&mut self, old: Option<Loc>) {
        if let Some(old) = old.filter(|l| !l.is_none()) {
            self.dead(old);
        }
    }

    /// Applies the frame whose payload is `payload`, written at `off` (the
    /// payload's offset) in segment `seg`.
    ///
    /// A task's records in a commit mostly follow each other (its record,
    /// then its events), so a run of records of one task finds its entry
    /// once, not once per record.
    ///
    /// `hint` may say where a task's entry is (a slot of [`IdTable`],
    /// looked up while the commit was encoded), so applying it needs no
    /// second index probe; `None` is always right.
    pub fn apply_frame(
        &mut self,
        seg: u32,
        off: u64,
        payload: &[u8],
        hint: &dyn Fn(u128) -> Option<u32>,
    ) -> Result<(), &'static str> {
        let mut run: Vec<(Raw<'_>, Loc)> = Vec::new();
        for entry in frame::records(payload) {
            let (at, raw) = entry?;
            let loc = Loc {
                seg,
                off: u32::try_from(off + at as u64).map_err(|_| "a segment past 4 GiB")?,
                len: u32::try_from(raw.bytes.len()).map_err(|_| "a record past 4 GiB")?,
            };
            let Some(id) = task_part(&raw) else {
                self.apply_run(&mut run, hint)?;
                self.apply(raw, loc)?;
                continue;
            };
            if run
                .first()
                .and_then(|(r, _)| task_part(r))
                .is_some_and(|r| r != id)
            {
                self.apply_run(&mut run, hint)?;
            }
            run.push((raw, loc));
        }
        self.apply_run(&mut run, hint)
    }

    /// Applies (and empties) `run`: records of one task, each a task
    /// record, its spec or an event, found with one lookup.
    fn apply_run(
        &mut self,
        run: &mut Vec<(Raw<'_>, Loc)>,
        hint: &dyn Fn(u128) -> Option<u32>,
    ) -> Result<(), &'static str> {
        let Some(id) = run.first().and_then(|(raw, _)| task_part(raw)) else {
            return Ok(());
        };
        let Index {
            tasks,
            by_state,
            finals,
            segments,
            ..
        } = self;
        let entry = tasks.get_or_insert_at(hint(id), id, || TaskEntry {
            record: Loc::NONE,
            spec: Loc::NONE,
            head: TaskHead::NONE,
            events: Events::new(),
            secrets: None,
        });
        for (raw, loc) in run.drain(..) {
            let old = match (raw.kind, raw.key) {
                (Kind::Task, _) => {
                    let head = TaskHead::parse(raw.body).ok_or("a task record without its head")?;
                    let record = std::mem::replace(&mut entry.record, loc);
                    let old = std::mem::replace(&mut entry.head, head);
                    let moved = record.is_none() || old.state != head.state;
                    if !record.is_none() {
                        if moved {
                            state_set(by_state, old.state).remove(&id);
                        }
                        if old.is_final() {
                            finals.remove(&(old.updated_ms, id));
                        }
                    }
                    if moved {
                        state_set(by_state, head.state).insert(id);
                    }
                    if head.is_final() {
                        finals.insert((head.updated_ms, id));
                    }
                    record
                }
                (Kind::Spec, _) => std::mem::replace(&mut entry.spec, loc),
                (_, Key::Event(_, seq)) => {
                    let seq = usize::try_from(seq).map_err(|_| "an event seq past memory")?;
                    if entry.events.len() <= seq {
                        grow_events(&mut entry.events, seq);
                    }
                    std::mem::replace(&mut entry.events[seq], loc)
                }
                _ => return Err("a record whose key does not fit its kind"),
            };
            if !old.is_none() {
                dead(segments, old);
            }
            alive(segments, loc);
        }
        Ok(())
    }

    fn apply(&mut self, raw: Raw<'_>, loc: Loc) -> Result<(), &'static str> {
        match (raw.kind, raw.key) {
            (Kind::Header, _) => {}
            (Kind::Secrets, Key::Id(id)) => {
                let old = match self.tasks.get_mut(&id) {
                    Some(entry) => entry.secrets.replace(loc),
                    // Secrets come after their task record in a commit; a
                    // compacted copy may come before a later copy of the
                    // record, so keep them on an entry of their own.
                    None => {
                        self.tasks.insert(
                            id,
                            TaskEntry {
                                record: Loc::NONE,
                                spec: Loc::NONE,
                                head: TaskHead::NONE,
                                events: Events::new(),
                                secrets: Some(loc),
                            },
                        );
                        None
                    }
                };
                self.replace(old);
                self.alive(loc);
            }
            (Kind::ForgetSecrets, Key::Id(id)) => {
                let old = self.tasks.get_mut(&id).and_then(|e| e.secrets.take());
                self.replace(old);
            }
            (Kind::Expired, Key::Id(id)) => {
                if let Some(entry) = self.tasks.remove(&id) {
                    let mut gone = entry.events;
                    gone.push(entry.record);
                    gone.push(entry.spec);
                    gone.extend(entry.secrets);
                    for loc in gone {
                        self.replace(Some(loc));
                    }
                    if !entry.record.is_none() {
                        self.state_set(entry.head.state).remove(&id);
                        if entry.head.is_final() {
                            self.finals.remove(&(entry.head.updated_ms, id));
                        }
                    }
                }
                self.mark_deletes(loc.seg);
            }
            (Kind::Schedule | Kind::Limit | Kind::Token, Key::Name(name)) => {
                let old = self.named(raw.kind).insert(name.to_owned(), loc);
                self.replace(old);
                self.alive(loc);
            }
            (Kind::DeleteSchedule | Kind::DeleteLimit, Key::Name(name)) => {
                let old = self.named(raw.kind).remove(name);
                self.replace(old);
                self.mark_deletes(loc.seg);
            }
            (Kind::Node, Key::Id(id)) => {
                let old = self.nodes.insert(id, loc);
                self.replace(old);
                self.alive(loc);
            }
            _ => return Err("a record whose key does not fit its kind"),
        }
        Ok(())
    }

    /// The table of named records a kind writes or deletes in: schedules,
    /// limits or tokens.
    fn named(&mut self, kind: Kind) -> &mut BTreeMap<String, Loc> {
        match kind {
            Kind::Schedule | Kind::DeleteSchedule => &mut self.schedules,
            Kind::Limit | Kind::DeleteLimit => &mut self.limits,
            _ => &mut self.tokens,
        }
    }

    fn mark_deletes(&mut self, seg: u32) {
        if let Some(segment) = self.segments.get_mut(&seg) {
            segment.deletes = true;
        }
    }

    /// Whether `raw`, found at `loc`, is still the latest of what it keeps:
    /// what compaction copies.
    pub fn is_current(&self, raw: &Raw<'_>, loc: Loc) -> bool {
        match (raw.kind, raw.key) {
            (Kind::Task, Key::Id(id)) => self.tasks.get(&id).is_some_and(|e| e.record == loc),
            (Kind::Spec, Key::Id(id)) => self.tasks.get(&id).is_some_and(|e| e.spec == loc),
            (Kind::Event, Key::Event(id, seq)) => self.tasks.get(&id).is_some_and(|e| {
                usize::try_from(seq)
                    .ok()
                    .and_then(|s| e.events.get(s))
                    .is_some_and(|l| *l == loc)
            }),
            (Kind::Secrets, Key::Id(id)) => {
                self.tasks.get(&id).is_some_and(|e| e.secrets == Some(loc))
            }
            (Kind::Schedule, Key::Name(name)) => self.schedules.get(name) == Some(&loc),
            (Kind::Limit, Key::Name(name)) => self.limits.get(name) == Some(&loc),
            (Kind::Token, Key::Name(name)) => self.tokens.get(name) == Some(&loc),
            (Kind::Node, Key::Id(id)) => self.nodes.get(&id) == Some(&loc),
            _ => false,
        }
    }

    /// After recovery: every task has its record and every event up to
    /// its last; a final task keeps no secrets (their deletion may have
    /// been compacted away before the secrets were). `Err` names a task
    /// and what is missing.
    pub fn check(&mut self) -> Result<(), (u128, &'static str)> {
        let mut drop_secrets = Vec::new();
        // The lowest id at fault is the one named, whatever the table's order.
        let mut fault: Option<(u128, &'static str)> = None;
        for (id, entry) in self.tasks.iter() {
            let missing = if entry.record.is_none() {
                Some("events or secrets without their task record")
            } else if entry.spec.is_none() {
                Some("a task record without its spec")
            } else if entry.events.iter().any(|l| l.is_none()) {
                Some("a gap in its events")
            } else {
                None
            };
            if let Some(what) = missing {
                if fault.is_none_or(|(first, _)| id < first) {
                    fault = Some((id, what));
                }
            } else if entry.head.is_final() && entry.secrets.is_some() {
                drop_secrets.push(id);
            }
        }
        if let Some(fault) = fault {
            return Err(fault);
        }
        for id in drop_secrets {
            let old = self.tasks.get_mut(&id).and_then(|e| e.secrets.take());
            self.replace(old);
        }
        Ok(())
    }

    /// Bytes of sealed segments (all but `active`) that are no longer the
    /// latest of anything, and bytes that are.
    pub fn garbage(&self, active: u32) -> (u64, u64) {
        self.segments
            .iter()
            .filter(|(no, _)| **no != active)
            .fold((0, 0), |(dead, live), (_, s)| {
                (dead + s.len.saturating_sub(s.live), live + s.live)
            })
    }
}

/// The task a task record, spec or event belongs to; `None` for any other
/// record.
fn task_part(raw: &Raw<'_>) -> Option<u128> {
    match (raw.kind, raw.key) {
        (Kind::Task | Kind::Spec, Key::Id(id)) | (Kind::Event, Key::Event(id, _)) => Some(id),
        _ => None,
    }
}

/// A task's event locations, by seq: the first inline (a task waiting
/// queued has one, and a million may wait), the rest on the heap. As big
/// as a `Vec`, so a queued task's event costs no allocation, and its
/// second event allocates once, without copying a first allocation.
pub(super) type Events = smallvec::SmallVec<[Loc; 1]>;

/// Events a short task writes in all (queued, assigned, running, its
/// final state, finished): what its list takes room for at once when its
/// second event comes.
const SHORT_TASK_EVENTS: usize = 5;

/// Makes `events` long enough for event `seq`. A task waiting queued has
/// one event, held inline; once it is assigned it takes room for a short
/// task's whole life in one step, and only a task with more (output,
/// retries) grows it further.
fn grow_events(events: &mut Events, seq: usize) {
    let want = seq + 1;
    if events.capacity() < want {
        let room = match seq {
            0 => want,
            _ => want.max(SHORT_TASK_EVENTS).max(events.capacity() * 2),
        };
        events.reserve_exact(room - events.len());
    }
    events.resize(want, Loc::NONE);
}

/// The ids in state number `state` (the last set takes any larger number).
fn state_set(by_state: &mut [BTreeSet<u128>], state: u8) -> &mut BTreeSet<u128> {
    let last = by_state.len() - 1;
    &mut by_state[usize::from(state).min(last)]
}

/// `loc` is no longer the latest of anything.
fn dead(segments: &mut BTreeMap<u32, Segment>, loc: Loc) {
    if let Some(segment) = segments.get_mut(&loc.seg) {
        segment.live = segment.live.saturating_sub(u64::from(loc.len));
    }
}

/// `loc` is now the latest of something.
fn alive(segments: &mut BTreeMap<u32, Segment>, loc: Loc) {
    if let Some(segment) = segments.get_mut(&loc.seg) {
        segment.live += u64::from(loc.len);
    }
}

#[cfg(test)]
mod tests {
    use super::{Events, Loc, SHORT_TASK_EVENTS, grow_events};

    fn at(off: u32) -> Loc {
        Loc {
            seg: 1,
            off,
            len: 8,
        }
    }

    #[test]
    fn a_queued_tasks_event_is_inline_and_a_short_tasks_life_fits_one_allocation() {
        assert_eq!(
            std::mem::size_of::<Events>(),
            std::mem::size_of::<Vec<Loc>>(),
            "no bigger than the Vec it replaced"
        );
        let mut events = Events::new();
        grow_events(&mut events, 0);
        events[0] = at(0);
        assert!(
            !events.spilled(),
            "a queued task's one event allocates nothing"
        );
        assert_eq!(events.capacity(), 1);
        grow_events(&mut events, 1);
        assert!(events.spilled());
        assert_eq!(events[0], at(0), "the inline event moved with the list");
        let room = events.capacity();
        assert!(room >= SHORT_TASK_EVENTS, "{room}");
        for seq in 1..SHORT_TASK_EVENTS {
            if events.len() <= seq {
                grow_events(&mut events, seq);
            }
            events[seq] = at(seq as u32);
        }
        assert_eq!(
            events.capacity(),
            room,
            "no growth within a short task's life"
        );
        // Past it (output, retries) it doubles; a seq met out of order
        // leaves the ones before it unseen.
        grow_events(&mut events, 40);
        assert_eq!(events.len(), 41);
        assert!(events[SHORT_TASK_EVENTS..40].iter().all(|l| l.is_none()));
        assert_eq!(events[3], at(3));
    }
}
