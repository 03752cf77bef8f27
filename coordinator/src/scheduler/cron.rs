//! Cron schedules: named schedules that submit a task at set times.
//!
//! Sans-I/O like the rest of the scheduler: time is `Now.wall`, and
//! [`Scheduler::next_wakeup`] includes the next fire, so nothing polls.
//!
//! The rules:
//! - **Exactly once.** A fire submits the schedule's task (a job of its
//!   own) and writes the schedule's record with the new `last_fire` in the
//!   SAME batch of records: the driver's one commit makes both durable or
//!   neither. A fire time at or before `last_fire` (or before the schedule
//!   was created or last resumed: `since`) is never fired again.
//! - **Overlap** (the previous fire's task is not final): SKIP records the
//!   fire as skipped; QUEUE submits anyway; CANCEL_RUNNING cancels the
//!   previous task and submits (one on a node is cancelled only once this
//!   fire's task is queued, so a full queue leaves it running).
//! - **Catch-up** (fire times that passed while the coordinator was down,
//!   computed at start from `last_fire`): NONE fires none of them, ONE the
//!   latest, ALL every one, oldest first, at most [`MAX_CATCH_UP`] (the
//!   latest ones). A running coordinator that wakes late past several fire
//!   times (a stall, the clock set forward) treats the older ones the same
//!   way and fires the latest.
//! - **Paused** schedules do not fire, and on resume do not catch up what
//!   passed while paused.
//! - **A full queue** at a fire: the fire is recorded as skipped (counted
//!   in `skipped`), with a warning; never an error.
//!
//! Each fired task carries its fire time: its name is `NAME@FIRE_TIME`
//! (the task's own name, or the schedule's, then the fire time in RFC 3339,
//! UTC), and an exec task gets `WEFT_SCHEDULE` and `WEFT_FIRE_TIME` in its
//! environment. Create checks the task as a fire builds it, so a spec at a
//! limit is refused then rather than at every fire. A schedule's task spec
//! keeps no trace context: each fire starts a trace of its own.
//!
//! Fire times in a zone, daylight-saving changes included: [`times`].

use std::collections::{BTreeMap, VecDeque};
use std::ops::Bound;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use chrono::{DateTime, SecondsFormat, Utc};
use croner::parser::{CronParser, Seconds, Year};

use weft_proto::convert::timestamp;
use weft_proto::limits::SpecLimits;
use weft_proto::{ConversionError, TaskId, TaskKind, TaskSpec, TaskState, pb};

use super::{Now, Scheduler};
use crate::error::Error;
use crate::store::ScheduleRecord;

mod times;

use times::{FireTimes, floor_second};

/// Most schedules a coordinator keeps.
pub const MAX_SCHEDULES: usize = 10_000;
/// Most missed fire times one schedule fires on catch-up ALL.
pub const MAX_CATCH_UP: usize = 1_000;
/// Longest a wakeup for a schedule is put off, so a wall clock set
/// forward is noticed within this.
const MAX_SLEEP: Duration = Duration::from_secs(60);
/// The longest schedule name.
const MAX_NAME: usize = 128;
/// The longest cron expression and time zone name, in bytes.
const MAX_CRON_BYTES: usize = 256;
/// The most bytes a schedule's task spec takes (encoded): every schedule's
/// spec is kept in memory and listed to readers.
pub const MAX_SCHEDULE_TASK_BYTES: usize = 64 * 1024;
/// The most bytes of schedules one `ListSchedules` page holds, encoded: a
/// quarter of gRPC's default 4 MiB decode limit (and the smallest
/// `--max-message-size`), so any client decodes a page, where every
/// schedule at once may take 10,000 x 64 KiB.
pub const LIST_PAGE_BYTES: usize = 1024 * 1024;
/// The most bytes of a refused value an error message quotes.
const QUOTED_BYTES: usize = 64;
/// What each fire of an exec task sets in its environment.
const FIRE_ENV: [&str; 2] = ["WEFT_SCHEDULE", "WEFT_FIRE_TIME"];

/// A schedule's spec, checked: what the rules read.
#[derive(Clone, Debug)]
pub struct ParsedSchedule {
    /// The spec as created (what is stored and listed).
    pub spec: pb::ScheduleSpec,
    times: FireTimes,
    task: TaskSpec,
    overlap: pb::OverlapPolicy,
    catch_up: pb::CatchUp,
}

fn invalid(field: &'static str, reason: impl Into<String>) -> Error {
    Error::InvalidArgument(ConversionError::Invalid {
        field,
        reason: reason.into(),
    })
}

/// `value` quoted for an error message: at most [`QUOTED_BYTES`] of it, so
/// an over-long value does not come back whole in the answer.
fn quoted(value: &str) -> String {
    if value.len() <= QUOTED_BYTES {
        return format!("{value:?}");
    }
    let mut end = QUOTED_BYTES;
    while !value.is_char_boundary(end) {
        end -= 1;
    }
    format!("{:?}... ({} bytes)", &value[..end], value.len())
}

/// The cron parser: five fields, or six with seconds first; no years.
fn parser() -> CronParser {
    CronParser::builder()
        .seconds(Seconds::Optional)
        .year(Year::Disallowed)
        .build()
}

impl ParsedSchedule {
    /// Checks a `CreateSchedule` spec: INVALID_ARGUMENT naming the field
    /// (`spec.name`, `spec.cron` with the parser's reason, `spec.time_zone`,
    /// `spec.task` checked as Submit checks a task, and as each fire builds
    /// it, `spec.overlap`, `spec.catch_up`). A refused value is quoted cut
    /// to its first [`QUOTED_BYTES`].
    /// `limits`: Submit's (`None` on restart: the stored spec was checked
    /// when created, and a rule added since must not stop it firing).
    pub fn parse(spec: pb::ScheduleSpec, limits: Option<&SpecLimits>) -> Result<Self, Error> {
        let mut spec = spec;
        // A trace context in a schedule would make every fire, for months,
        // part of the one trace its creator was in: each fire starts its own.
        if let Some(task) = &mut spec.task {
            task.trace = None;
        }
        check_name("spec.name", &spec.name)?;
        if limits.is_some() {
            for (field, value) in [
                ("spec.cron", &spec.cron),
                ("spec.time_zone", &spec.time_zone),
            ] {
                if value.len() > MAX_CRON_BYTES {
                    return Err(invalid(
                        field,
                        format!("{}: at most {MAX_CRON_BYTES} bytes", quoted(value)),
                    ));
                }
            }
        }
        let cron = parser().parse(spec.cron.trim()).map_err(|err| {
            invalid(
                "spec.cron",
                format!(
                    "{}: {err} (five fields: minute hour day-of-month month day-of-week, or six with seconds first)",
                    quoted(&spec.cron)
                ),
            )
        })?;
        let tz = match spec.time_zone.trim() {
            "" => chrono_tz::UTC,
            zone => zone.parse::<chrono_tz::Tz>().map_err(|_| {
                invalid(
                    "spec.time_zone",
                    format!(
                        "{} is not an IANA time zone (e.g. Europe/Paris, UTC)",
                        quoted(zone)
                    ),
                )
            })?,
        };
        let Some(task) = spec.task.clone() else {
            return Err(Error::InvalidArgument(ConversionError::MissingField(
                "spec.task",
            )));
        };
        if !task.after.is_empty() {
            return Err(invalid(
                "spec.task.after",
                "a scheduled task has no `after`",
            ));
        }
        if !task.r#ref.is_empty() {
            return Err(invalid("spec.task.ref", "a scheduled task has no `ref`"));
        }
        if task.not_before.is_some() {
            return Err(invalid(
                "spec.task.not_before",
                "a scheduled task starts at its fire time",
            ));
        }
        if !task.secret_env.is_empty() {
            return Err(invalid(
                "spec.task.secret_env",
                "a schedule keeps its task spec where readers see it; give secrets to the nodes instead",
            ));
        }
        if let Some(limits) = limits {
            check_task(&task, limits)?;
        }
        let task = limits
            .map_or(Ok(()), |limits| limits.check(&task))
            .and_then(|()| TaskSpec::try_from(task))
            .map_err(|err| match err {
                too_large @ ConversionError::TooLarge { .. } => Error::InvalidArgument(too_large),
                other => invalid("spec.task", other.to_string()),
            })?;
        if let Some(limits) = limits {
            // What each fire submits: a longer name, two more variables.
            let fired = fired_spec(&task, &spec.name, &fire_time_text(SystemTime::UNIX_EPOCH));
            limits.check(&fired.into()).map_err(|err| {
                invalid(
                    "spec.task",
                    format!(
                        "{err}, once a fire adds `@FIRE_TIME` ({} bytes) to the task's name and {} to an exec task's environment",
                        1 + fire_time_text(SystemTime::UNIX_EPOCH).len(),
                        FIRE_ENV.join(" and ")
                    ),
                )
            })?;
        }
        let overlap = match pb::OverlapPolicy::try_from(spec.overlap) {
            Ok(pb::OverlapPolicy::Unspecified) => pb::OverlapPolicy::Skip,
            Ok(policy) => policy,
            Err(_) => return Err(invalid("spec.overlap", "SKIP, QUEUE or CANCEL_RUNNING")),
        };
        let catch_up = match pb::CatchUp::try_from(spec.catch_up) {
            Ok(pb::CatchUp::Unspecified) => pb::CatchUp::One,
            Ok(policy) => policy,
            Err(_) => return Err(invalid("spec.catch_up", "NONE, ONE or ALL")),
        };
        spec.overlap = overlap.into();
        spec.catch_up = catch_up.into();
        let parsed = ParsedSchedule {
            spec,
            times: FireTimes::new(cron, tz),
            task,
            overlap,
            catch_up,
        };
        // An expression no date matches (the 30th of February) would never
        // fire, and every look for its next time searches for centuries.
        if parsed.next_after(SystemTime::now()).is_none() {
            return Err(invalid(
                "spec.cron",
                format!(
                    "{} matches no date: it would never fire",
                    quoted(&parsed.spec.cron)
                ),
            ));
        }
        Ok(parsed)
    }

    /// The first fire time after `t` (whole seconds), if any.
    fn next_after(&self, t: SystemTime) -> Option<SystemTime> {
        self.times.next_after(t)
    }

    /// The latest fire time before `t` (whole seconds), if any.
    fn previous_before(&self, t: SystemTime) -> Option<SystemTime> {
        self.times.previous_before(t)
    }

    /// Fire times after `after` up to `now` included, oldest first: the
    /// latest `max` of them.
    fn missed(&self, after: SystemTime, now: SystemTime, max: usize) -> Vec<SystemTime> {
        let mut out = Vec::new();
        let mut cursor = floor_second(now) + Duration::from_secs(1);
        while out.len() < max {
            match self.previous_before(cursor) {
                Some(t) if t > after => {
                    out.push(t);
                    cursor = t;
                }
                _ => break,
            }
        }
        out.reverse();
        out
    }
}

/// What create checks of a schedule's task beyond Submit's checks: its
/// size, and no variable of its own where a fire sets one.
fn check_task(task: &pb::TaskSpec, limits: &SpecLimits) -> Result<(), Error> {
    let size = prost::Message::encoded_len(task);
    let max = MAX_SCHEDULE_TASK_BYTES.min(limits.max_spec_bytes);
    if size > max {
        return Err(invalid(
            "spec.task",
            format!("{size} bytes; a schedule's task takes at most {max}"),
        ));
    }
    let set_by_fire = match &task.kind {
        Some(pb::task_spec::Kind::Exec(exec)) => {
            FIRE_ENV.iter().find(|name| exec.env.contains_key(**name))
        }
        _ => None,
    };
    if let Some(name) = set_by_fire {
        return Err(invalid(
            "spec.task.exec.env",
            format!(
                "{name} is set by each fire ({}); give the variable another name",
                FIRE_ENV.join(", ")
            ),
        ));
    }
    Ok(())
}

/// A schedule name's rule: 1 to [`MAX_NAME`] characters of
/// `[A-Za-z0-9_.:-]`; INVALID_ARGUMENT naming `field` otherwise. Also
/// what a `ListSchedules` page token (a name) must be.
pub(crate) fn check_name(field: &'static str, name: &str) -> Result<(), Error> {
    if name.is_empty()
        || name.len() > MAX_NAME
        || !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_.:-".contains(&b))
    {
        return Err(invalid(
            field,
            format!(
                "{}: 1 to {MAX_NAME} characters of A-Z a-z 0-9 _ . : -",
                quoted(name)
            ),
        ));
    }
    Ok(())
}

/// A fire time as fired tasks carry it: RFC 3339, UTC, whole seconds.
pub fn fire_time_text(t: SystemTime) -> String {
    DateTime::<Utc>::from(t).to_rfc3339_opts(SecondsFormat::Secs, true)
}

/// One `ListSchedules` page ([`Scheduler::list_schedules`]).
#[derive(Debug, Default)]
pub struct SchedulePage {
    /// By name.
    pub schedules: Vec<pb::Schedule>,
    /// The last listed schedule's name when more follow it; `None`: no more.
    pub next: Option<String>,
}

/// One schedule in the scheduler.
#[derive(Debug)]
struct Entry {
    record: ScheduleRecord,
    /// `None` when the stored spec no longer parses (it is listed, and
    /// never fires; logged at start).
    parsed: Option<Arc<ParsedSchedule>>,
    /// Missed fire times still to fire (catch-up at start), oldest first.
    backlog: VecDeque<SystemTime>,
    /// The next fire time after those (`None`: paused, or never again).
    next: Option<SystemTime>,
}

impl Entry {
    /// The first fire time it will handle.
    fn upcoming(&self) -> Option<SystemTime> {
        if self.record.paused {
            return None;
        }
        self.backlog.front().copied().or(self.next)
    }

    fn to_pb(&self) -> pb::Schedule {
        let record = &self.record;
        pb::Schedule {
            spec: Some(record.spec.clone()),
            paused: record.paused,
            created_at: Some(timestamp(record.created_at)),
            next_fire: self.upcoming().map(timestamp),
            last_fire: record.last_fire.map(timestamp),
            last_task_id: record
                .last_task
                .map(|id| id.to_string())
                .unwrap_or_default(),
            fired: record.fired,
            skipped: record.skipped,
        }
    }
}

/// Every schedule by name, and when the next one is due.
pub(crate) struct Schedules {
    by_name: BTreeMap<String, Entry>,
    /// Ids for fired tasks (ULIDs of the fire's wall time).
    ids: ulid::Generator,
    /// The latest fire's job id: each fire is a job of its own, its id
    /// made as a Submit's are (`graph::submit_ids`), so `job_of` holds.
    last_job: u128,
    /// When `tick` next has a schedule to look at.
    next_due: Option<Instant>,
    /// Fires that submitted a task, and fires skipped, since start.
    pub fires: u64,
    pub skips: u64,
}

impl std::fmt::Debug for Schedules {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Schedules")
            .field("by_name", &self.by_name)
            .field("next_due", &self.next_due)
            .finish_non_exhaustive()
    }
}

impl Default for Schedules {
    fn default() -> Self {
        Schedules {
            by_name: BTreeMap::new(),
            ids: ulid::Generator::new(),
            last_job: 0,
            next_due: None,
            fires: 0,
            skips: 0,
        }
    }
}

impl Schedules {
    /// When the next schedule is due, for `next_wakeup`.
    pub fn next_due(&self) -> Option<Instant> {
        self.next_due
    }

    /// Recomputes `next_due` after a change.
    fn plan(&mut self, now: Now) {
        self.next_due = self
            .by_name
            .values()
            .filter_map(Entry::upcoming)
            .map(|at| {
                let wait = at.duration_since(now.wall).unwrap_or_default();
                now.instant + wait.min(MAX_SLEEP)
            })
            .min();
    }

    fn new_id(&mut self, now: Now) -> TaskId {
        let ulid = self
            .ids
            .generate_from_datetime(now.wall)
            .unwrap_or_else(|_| ulid::Ulid::from_datetime(now.wall));
        let ids = super::graph::submit_ids(ulid.0, &mut self.last_job, 1);
        ids.first()
            .copied()
            .unwrap_or_else(|| TaskId::from_ulid(ulid))
    }
}

impl Scheduler {
    /// Creates a schedule (checked by [`ParsedSchedule::parse`]): its first
    /// fire is the first fire time after now. ALREADY_EXISTS for a name in
    /// use, RESOURCE_EXHAUSTED past [`MAX_SCHEDULES`].
    pub fn create_schedule(
        &mut self,
        parsed: ParsedSchedule,
        now: Now,
    ) -> Result<pb::Schedule, Error> {
        let name = parsed.spec.name.clone();
        if self.schedules.by_name.contains_key(&name) {
            return Err(Error::ScheduleExists(name));
        }
        if self.schedules.by_name.len() >= MAX_SCHEDULES {
            return Err(Error::TooManySchedules { max: MAX_SCHEDULES });
        }
        let record = ScheduleRecord {
            spec: parsed.spec.clone(),
            paused: false,
            created_at: now.wall,
            since: now.wall,
            last_fire: None,
            last_task: None,
            fired: 0,
            skipped: 0,
        };
        let entry = Entry {
            next: parsed.next_after(now.wall),
            parsed: Some(Arc::new(parsed)),
            record,
            backlog: VecDeque::new(),
        };
        self.out.write_schedule(Arc::new(entry.record.clone()));
        let view = entry.to_pb();
        tracing::info!(schedule = %name, cron = %entry.record.spec.cron, "schedule created");
        self.schedules.by_name.insert(name, entry);
        self.schedules.plan(now);
        Ok(view)
    }

    /// A page of schedules by name, from the first after `after` (`None`:
    /// from the first): at most `limit`, and stopping before the one that
    /// would take the page past `max_bytes` encoded, but never empty while
    /// one is left.
    pub fn list_schedules(
        &self,
        after: Option<&str>,
        limit: usize,
        max_bytes: usize,
    ) -> SchedulePage {
        let from = match after {
            Some(name) => Bound::Excluded(name),
            None => Bound::Unbounded,
        };
        let mut rest = self
            .schedules
            .by_name
            .range::<str, _>((from, Bound::Unbounded))
            .peekable();
        let mut page = SchedulePage::default();
        let mut bytes = 0;
        while let Some((_, entry)) = rest.peek() {
            if page.schedules.len() >= limit.max(1) {
                break;
            }
            let schedule = entry.to_pb();
            // As a `repeated Schedule` field entry: tag, length, message.
            let size = prost::encoding::message::encoded_len(1, &schedule);
            if !page.schedules.is_empty() && bytes + size > max_bytes {
                break;
            }
            bytes += size;
            page.schedules.push(schedule);
            rest.next();
        }
        if rest.peek().is_some() {
            page.next = page
                .schedules
                .last()
                .and_then(|s| s.spec.as_ref())
                .map(|spec| spec.name.clone());
        }
        page
    }

    /// Pauses or resumes a schedule. A resumed one fires next at the first
    /// fire time after now: what passed while paused is not caught up.
    pub fn pause_schedule(
        &mut self,
        name: &str,
        paused: bool,
        now: Now,
    ) -> Result<pb::Schedule, Error> {
        let entry = self
            .schedules
            .by_name
            .get_mut(name)
            .ok_or_else(|| Error::ScheduleNotFound(name.to_owned()))?;
        if entry.record.paused != paused {
            entry.record.paused = paused;
            entry.backlog.clear();
            if paused {
                entry.next = None;
            } else {
                entry.record.since = now.wall;
                entry.next = entry.parsed.as_ref().and_then(|p| p.next_after(now.wall));
            }
            self.out.write_schedule(Arc::new(entry.record.clone()));
            tracing::info!(schedule = %name, paused, "schedule paused or resumed");
        }
        let view = entry.to_pb();
        self.schedules.plan(now);
        Ok(view)
    }

    /// Deletes a schedule; the tasks it fired are kept.
    pub fn delete_schedule(&mut self, name: &str, now: Now) -> Result<(), Error> {
        if self.schedules.by_name.remove(name).is_none() {
            return Err(Error::ScheduleNotFound(name.to_owned()));
        }
        self.out.delete_schedule(name);
        tracing::info!(schedule = %name, "schedule deleted");
        self.schedules.plan(now);
        Ok(())
    }

    /// Puts back the stored schedules at start, after the live tasks (so
    /// the overlap policy sees which fired tasks still run), and works out
    /// from each one's `last_fire` what it missed while the coordinator was
    /// down: its catch-up policy picks which of those fire at the first
    /// tick.
    pub fn restore_schedules(&mut self, records: Vec<ScheduleRecord>, now: Now) {
        for record in records {
            let name = record.name().to_owned();
            let parsed = match ParsedSchedule::parse(record.spec.clone(), None) {
                Ok(parsed) => Some(Arc::new(parsed)),
                Err(err) => {
                    tracing::error!(schedule = %name, error = %err, "stored schedule no longer parses; it will not fire (delete and create it again)");
                    None
                }
            };
            let mut entry = Entry {
                record,
                parsed,
                backlog: VecDeque::new(),
                next: None,
            };
            if let (Some(parsed), false) = (&entry.parsed, entry.record.paused) {
                let after = entry
                    .record
                    .last_fire
                    .map_or(entry.record.since, |last| last.max(entry.record.since));
                let max = match parsed.catch_up {
                    pb::CatchUp::All => MAX_CATCH_UP,
                    pb::CatchUp::None => 0,
                    _ => 1,
                };
                let missed = parsed.missed(after, now.wall, max);
                if !missed.is_empty() {
                    tracing::info!(schedule = %name, missed = missed.len(), catch_up = ?parsed.catch_up, "schedule catches up fire times missed while the coordinator was down");
                }
                entry.backlog = missed.into();
                entry.next = parsed.next_after(now.wall);
            }
            self.schedules.by_name.insert(name, entry);
        }
        self.schedules.plan(now);
    }

    /// Fires every schedule that is due (called by `tick`).
    pub(super) fn fire_schedules(&mut self, now: Now) {
        match self.schedules.next_due {
            Some(due) if due <= now.instant => {}
            _ => return,
        }
        let mut fires: Vec<(String, SystemTime)> = Vec::new();
        for (name, entry) in self.schedules.by_name.iter_mut() {
            if entry.record.paused {
                continue;
            }
            let Some(parsed) = entry.parsed.clone() else {
                continue;
            };
            fires.extend(entry.backlog.drain(..).map(|t| (name.clone(), t)));
            // Woken late past several fire times: the older ones follow the
            // catch-up policy; the latest fires.
            let keep = match parsed.catch_up {
                pb::CatchUp::All => MAX_CATCH_UP,
                _ => 1,
            };
            let mut due = Vec::new();
            while let Some(next) = entry.next.filter(|n| *n <= now.wall) {
                if due.len() > MAX_CATCH_UP {
                    // Far behind (the clock jumped): the latest `keep` fire
                    // times up to now, and on from now.
                    let after = due
                        .first()
                        .map_or(next, |first| *first - Duration::from_secs(1));
                    due = parsed.missed(after, now.wall, keep);
                    entry.next = parsed.next_after(now.wall);
                    break;
                }
                due.push(next);
                entry.next = parsed.next_after(next);
            }
            let skip = due.len().saturating_sub(keep);
            fires.extend(due.into_iter().skip(skip).map(|t| (name.clone(), t)));
        }
        for (name, at) in fires {
            self.fire(&name, at, now);
        }
        self.schedules.plan(now);
    }

    /// Handles one fire time of one schedule: submits its task (or skips,
    /// by its overlap policy or a full queue) and records the schedule with
    /// this `last_fire`, in the same batch.
    fn fire(&mut self, name: &str, at: SystemTime, now: Now) {
        let Some(entry) = self.schedules.by_name.get(name) else {
            return;
        };
        let Some(parsed) = entry.parsed.clone() else {
            return;
        };
        if entry.record.last_fire.is_some_and(|last| at <= last) || at <= entry.record.since {
            return; // handled already: never twice
        }
        let previous = entry
            .record
            .last_task
            .filter(|id| self.tasks.contains_key(id));
        let when = fire_time_text(at);
        let (submit, replaces) = match (parsed.overlap, previous) {
            (pb::OverlapPolicy::Skip, Some(previous)) => {
                tracing::info!(schedule = %name, fire = %when, running = %previous, "fire skipped: the previous fire's task is not final (overlap SKIP)");
                (false, None)
            }
            (pb::OverlapPolicy::CancelRunning, Some(previous)) => (true, Some(previous)),
            _ => (true, None),
        };
        let cancel = |scheduler: &mut Scheduler, previous: TaskId| {
            let reason = format!("cancelled by schedule {name}: its fire at {when} replaces it");
            scheduler.cancel(previous, &reason, now);
        };
        // A queued task ends at cancel, making room for this fire's; one on
        // a node stays live (and counts in the queue) until its node
        // reports, so it is cancelled only once this fire's task is queued:
        // a full queue then skips the fire and leaves it running.
        let replaces = match replaces {
            Some(previous) if self.is_placed(previous) => Some(previous),
            Some(previous) => {
                cancel(self, previous);
                None
            }
            None => None,
        };
        let mut submitted = None;
        if submit {
            let id = self.schedules.new_id(now);
            let spec = fired_spec(&parsed.task, name, &when);
            match self.submit(vec![(id, spec)], now) {
                Ok(()) => submitted = Some(id),
                Err(err) => {
                    tracing::warn!(schedule = %name, fire = %when, error = %err, "fire skipped: its task could not be queued");
                }
            }
        }
        if let (Some(previous), Some(_)) = (replaces, submitted) {
            cancel(self, previous);
        }
        match submitted {
            Some(_) => self.schedules.fires += 1,
            None => self.schedules.skips += 1,
        }
        let Some(entry) = self.schedules.by_name.get_mut(name) else {
            return;
        };
        let record = &mut entry.record;
        record.last_fire = Some(at);
        match submitted {
            Some(id) => {
                record.last_task = Some(id);
                record.fired += 1;
            }
            None => record.skipped += 1,
        }
        self.out.write_schedule(Arc::new(record.clone()));
    }
}

impl Scheduler {
    /// Whether a live task is on a node (assigned or running): a cancel
    /// leaves it live until the node reports.
    fn is_placed(&self, id: TaskId) -> bool {
        self.tasks
            .get(&id)
            .is_some_and(|task| matches!(task.state, TaskState::Assigned | TaskState::Running))
    }
}

/// The task one fire submits: the schedule's `task`, named
/// `NAME@FIRE_TIME`, and for exec, with [`FIRE_ENV`] in its environment.
fn fired_spec(task: &TaskSpec, schedule: &str, when: &str) -> TaskSpec {
    let mut spec = task.clone();
    let base = if spec.name.is_empty() {
        schedule
    } else {
        spec.name.as_str()
    };
    spec.name = format!("{base}@{when}");
    if let TaskKind::Exec(exec) = &mut spec.kind {
        let [schedule_var, fire_time_var] = FIRE_ENV;
        exec.env.insert(schedule_var.into(), schedule.into());
        exec.env.insert(fire_time_var.into(), when.into());
    }
    spec
}
