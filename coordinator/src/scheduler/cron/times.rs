//! When a cron expression fires in a time zone: its fire times, around
//! daylight-saving changes too. Plain functions of time; no state, no clock.
//!
//! Two kinds of expression, told apart as Vixie cron tells them:
//! - **Fixed times**: the seconds (when given), minute and hour fields hold
//!   no `*` and no step, only values, lists and ranges (`30 2 * * *`,
//!   `0 2,14 * * *`, `0 9-17 * * 1-5`, `@daily`). Each matching wall-clock
//!   time fires once: in the hour autumn repeats, at its first occurrence;
//!   one the spring gap skips, at the first instant after the gap (several
//!   skipped ones fire there once, together). Worked out here, on the wall
//!   clock, since croner gives this rule only to expressions whose three
//!   fields each hold one value.
//! - **Repeating**: a `*` or a step in one of those fields (`*/30 * * * *`,
//!   `0 * * * *`, `@hourly`). Croner's rule: a wall-clock time the autumn
//!   hour repeats fires at both occurrences, one the spring gap skips does
//!   not fire.

use std::time::{Duration, SystemTime};

use chrono::{DateTime, LocalResult, NaiveDateTime, TimeDelta, TimeZone, Utc};
use croner::{Cron, CronComponent};

/// Most matching wall-clock times one search steps over that fire at or
/// before its start (those of a repeated hour, or of a gap): an hour's
/// worth of seconds, twice.
const MAX_STEPS: usize = 2 * 3600;
/// Longest a daylight-saving gap or repeated range is looked for, in
/// minutes (a day: Samoa skipped 30 December 2011).
const MAX_SHIFT_MINUTES: i64 = 25 * 60;

/// A parsed expression in its zone.
#[derive(Clone, Debug)]
pub(crate) struct FireTimes {
    cron: Cron,
    tz: chrono_tz::Tz,
    /// Fixed times (see the module's doc), handled here; else croner's.
    fixed: bool,
}

impl FireTimes {
    pub(crate) fn new(cron: Cron, tz: chrono_tz::Tz) -> Self {
        let plain = |field: &CronComponent| !field.from_wildcard && field.step == 1;
        let pattern = &cron.pattern;
        let fixed = plain(&pattern.seconds) && plain(&pattern.minutes) && plain(&pattern.hours);
        FireTimes { cron, tz, fixed }
    }

    /// The first fire time after `t` (whole seconds), if any.
    pub(crate) fn next_after(&self, t: SystemTime) -> Option<SystemTime> {
        let t = DateTime::<Utc>::from(floor_second(t));
        if !self.fixed {
            return self
                .cron
                .find_next_occurrence(&t.with_timezone(&self.tz), false)
                .ok()
                .map(|next| SystemTime::from(next.with_timezone(&Utc)));
        }
        // Fire instants grow with their wall-clock times, so the answer is
        // the first match after `t`'s own wall-clock time whose instant is
        // after `t` (those of a repeated hour's first pass are not, when
        // `t` is in its second pass).
        let mut cursor = t.with_timezone(&self.tz).naive_local();
        for _ in 0..MAX_STEPS {
            let wall = self.cron.find_next_occurrence(&cursor, false).ok()?;
            let at = self.instant_of(wall)?;
            if at > t {
                return Some(SystemTime::from(at));
            }
            cursor = wall;
        }
        None
    }

    /// The latest fire time before `t` (whole seconds), if any.
    pub(crate) fn previous_before(&self, t: SystemTime) -> Option<SystemTime> {
        let t = DateTime::<Utc>::from(floor_second(t));
        if !self.fixed {
            return self
                .cron
                .find_previous_occurrence(&t.with_timezone(&self.tz), false)
                .ok()
                .map(|prev| SystemTime::from(prev.with_timezone(&Utc)));
        }
        let wall = t.with_timezone(&self.tz).naive_local();
        // In a repeated range's second pass, every wall-clock time of the
        // range fired at its first pass, before `t`: look from its end.
        let mut cursor = match self.tz.from_local_datetime(&wall) {
            LocalResult::Ambiguous(_, later) if later.with_timezone(&Utc) == t => {
                self.repeated_range_end(wall)?
            }
            _ => wall,
        };
        for _ in 0..MAX_STEPS {
            let wall = self.cron.find_previous_occurrence(&cursor, false).ok()?;
            let at = self.instant_of(wall)?;
            if at < t {
                return Some(SystemTime::from(at));
            }
            cursor = wall;
        }
        None
    }

    /// When a matching wall-clock time fires: its instant, the first of
    /// two in a repeated range, the first instant after a gap.
    fn instant_of(&self, wall: NaiveDateTime) -> Option<DateTime<Utc>> {
        let resolved = match self.tz.from_local_datetime(&wall) {
            LocalResult::None => {
                let after =
                    self.first_wall_time_where(wall, |r| !matches!(r, LocalResult::None))?;
                self.tz.from_local_datetime(&after)
            }
            resolved => resolved,
        };
        resolved.earliest().map(|at| at.with_timezone(&Utc))
    }

    /// The first wall-clock time after a repeated range that `wall` is in.
    fn repeated_range_end(&self, wall: NaiveDateTime) -> Option<NaiveDateTime> {
        self.first_wall_time_where(wall, |r| !matches!(r, LocalResult::Ambiguous(..)))
    }

    /// The first wall-clock time after `wall` (to the second) that `done`
    /// holds for, when it holds on from there: by minutes, then back by
    /// seconds (offsets were not always whole minutes).
    fn first_wall_time_where(
        &self,
        wall: NaiveDateTime,
        done: impl Fn(&LocalResult<DateTime<chrono_tz::Tz>>) -> bool,
    ) -> Option<NaiveDateTime> {
        let holds = |at: NaiveDateTime| done(&self.tz.from_local_datetime(&at));
        let minute = TimeDelta::minutes(1);
        let second = TimeDelta::seconds(1);
        let mut at = wall;
        for _ in 0..MAX_SHIFT_MINUTES {
            at += minute;
            if holds(at) {
                while at - second > wall && holds(at - second) {
                    at -= second;
                }
                return Some(at);
            }
        }
        None
    }
}

/// `t` without its fraction of a second.
pub(crate) fn floor_second(t: SystemTime) -> SystemTime {
    let since = t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    SystemTime::UNIX_EPOCH + Duration::from_secs(since.as_secs())
}
