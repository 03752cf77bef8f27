//! Dashboard sessions: what the `weft_session` cookie stands for.
//!
//! Logging in trades a client token for a session id (256 random bits,
//! URL-safe base64); the session keeps the token in memory only and every
//! request through it checks the token again (`TokenIndex::authenticate`),
//! so a revoked or expired token stops working at once, cookie or not.
//! Sessions are bounded, each ended after [`SESSION_IDLE`] without a
//! request: at most [`MAX_SESSIONS_PER_TOKEN`] per token (a login past it
//! ends that token's session used least recently), and at most
//! [`MAX_SESSIONS`] in all (a login past it ends the least recently used
//! session of the token holding the most; the least recently used of all
//! when they hold as many). So whoever holds one token,
//! even a read-only one, can end only its own sessions by logging in again
//! and again, never another token's (unless that one holds as many). Nothing
//! is stored: a restart logs everyone out.
//!
//! Plain state behind one mutex; no clock of its own (`now` comes in).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use base64::Engine;

/// Most sessions held at once; a login past it ends the least recently
/// used session of the token with the most sessions.
pub(crate) const MAX_SESSIONS: usize = 1024;

/// Most sessions of one token; a login past it ends that token's session
/// used least recently.
pub(crate) const MAX_SESSIONS_PER_TOKEN: usize = 32;

/// A session with no request for this long has ended.
pub(crate) const SESSION_IDLE: Duration = Duration::from_secs(8 * 60 * 60);

/// The session cookie's name for a dashboard served on `port`:
/// `weft_session_PORT`. Browsers keep one set of cookies per host, whatever
/// the port, so two coordinators on one host (7080 and 7081) with one name
/// would log each other out at every login and each receive the other's
/// session id.
pub(crate) fn cookie_name(port: u16) -> String {
    format!("weft_session_{port}")
}

/// Every open session.
#[derive(Debug)]
pub(crate) struct Sessions {
    max: usize,
    per_token: usize,
    idle: Duration,
    open: Mutex<HashMap<String, Session>>,
}

#[derive(Debug)]
struct Session {
    /// The id of that token: whose sessions it counts among.
    token_id: String,
    /// The client token it logged in with, checked again on every use.
    token: String,
    last_used: Instant,
}

impl Sessions {
    /// At most `max` sessions ([`MAX_SESSIONS_PER_TOKEN`] of one token),
    /// each ended after `idle` unused.
    pub(crate) fn new(max: usize, idle: Duration) -> Sessions {
        let max = max.max(1);
        Sessions {
            max,
            per_token: MAX_SESSIONS_PER_TOKEN.min(max),
            idle,
            open: Mutex::new(HashMap::new()),
        }
    }

    /// A new session for `token`, whose id is `token_id`; the session's id
    /// (the cookie's value). `None` when the system has no randomness to
    /// give.
    pub(crate) fn open(&self, token_id: &str, token: &str, now: Instant) -> Option<String> {
        let mut bytes = [0u8; 32];
        getrandom::fill(&mut bytes).ok()?;
        let id = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes);
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        let idle = self.idle;
        open.retain(|_, session| now.saturating_duration_since(session.last_used) < idle);
        // This token's own sessions first: past its cap, its oldest goes.
        while open.values().filter(|s| s.token_id == token_id).count() >= self.per_token {
            if !end_least_recent(&mut open, token_id) {
                break;
            }
        }
        // Then the whole: the token holding the most gives up its least
        // recently used (among equals, the one with the oldest such).
        while open.len() >= self.max {
            let mut held: HashMap<&str, (usize, Instant)> = HashMap::new();
            for session in open.values() {
                let entry = held
                    .entry(session.token_id.as_str())
                    .or_insert((0, session.last_used));
                entry.0 += 1;
                entry.1 = entry.1.min(session.last_used);
            }
            let Some(most) = held
                .into_iter()
                .max_by_key(|(_, (n, oldest))| (*n, std::cmp::Reverse(*oldest)))
                .map(|(id, _)| id.to_owned())
            else {
                break;
            };
            if !end_least_recent(&mut open, &most) {
                break;
            }
        }
        open.insert(
            id.clone(),
            Session {
                token_id: token_id.to_owned(),
                token: token.to_owned(),
                last_used: now,
            },
        );
        Some(id)
    }

    /// The token of session `id` if it is open (and marks it used);
    /// `None` when unknown or idle too long (then it is ended).
    pub(crate) fn token(&self, id: &str, now: Instant) -> Option<String> {
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        let session = open.get_mut(id)?;
        if now.saturating_duration_since(session.last_used) >= self.idle {
            open.remove(id);
            return None;
        }
        session.last_used = now;
        Some(session.token.clone())
    }

    /// Ends session `id` (logout).
    pub(crate) fn close(&self, id: &str) {
        self.open
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(id);
    }

    /// How many are open.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.open.lock().unwrap_or_else(|e| e.into_inner()).len()
    }
}

/// Ends the session of token `token_id` used least recently; false when
/// it has none.
fn end_least_recent(open: &mut HashMap<String, Session>, token_id: &str) -> bool {
    let oldest = open
        .iter()
        .filter(|(_, session)| session.token_id == token_id)
        .min_by_key(|(_, session)| session.last_used)
        .map(|(id, _)| id.clone());
    oldest.is_some_and(|id| open.remove(&id).is_some())
}

/// The value of cookie `name` in a `Cookie` header's value.
pub(crate) fn cookie<'a>(header: &'a str, name: &str) -> Option<&'a str> {
    header.split(';').find_map(|pair| {
        let (key, value) = pair.trim().split_once('=')?;
        (key.trim() == name).then(|| value.trim())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_session_gives_its_token_until_it_idles_out_or_is_closed() {
        let sessions = Sessions::new(4, Duration::from_secs(60));
        let t0 = Instant::now();
        let id = sessions.open("t1", "tok", t0).unwrap();
        assert_eq!(id.len(), 43, "256 bits, base64 without padding");
        assert_eq!(
            sessions.token(&id, t0 + Duration::from_secs(59)).as_deref(),
            Some("tok")
        );
        // Used at 59 s: idle counts from then.
        assert!(sessions.token(&id, t0 + Duration::from_secs(100)).is_some());
        assert!(sessions.token(&id, t0 + Duration::from_secs(200)).is_none());
        let other = sessions.open("t1", "tok", t0).unwrap();
        assert_ne!(other, id);
        sessions.close(&other);
        assert!(sessions.token(&other, t0).is_none());
        assert!(sessions.token("nope", t0).is_none());
    }

    #[test]
    fn past_the_bound_the_least_recently_used_session_ends() {
        let sessions = Sessions::new(2, Duration::from_secs(3600));
        let t0 = Instant::now();
        let a = sessions.open("a", "a", t0).unwrap();
        let b = sessions
            .open("b", "b", t0 + Duration::from_secs(1))
            .unwrap();
        // a is used after b: b is now the least recently used.
        sessions.token(&a, t0 + Duration::from_secs(2));
        let c = sessions
            .open("c", "c", t0 + Duration::from_secs(3))
            .unwrap();
        assert_eq!(sessions.len(), 2);
        assert!(sessions.token(&b, t0 + Duration::from_secs(4)).is_none());
        assert!(sessions.token(&a, t0 + Duration::from_secs(4)).is_some());
        assert!(sessions.token(&c, t0 + Duration::from_secs(4)).is_some());
    }

    #[test]
    fn one_token_cannot_evict_anothers_sessions() {
        let sessions = Sessions::new(MAX_SESSIONS, Duration::from_secs(3600));
        let t0 = Instant::now();
        let alice = sessions.open("alice", "tok-a", t0).unwrap();
        let bob = sessions.open("bob", "tok-b", t0).unwrap();
        let second = |n: usize| t0 + Duration::from_secs(1 + n as u64);
        // Mallory logs in over and over, far past every bound.
        let mallory: Vec<String> = (0..MAX_SESSIONS + 10)
            .map(|n| sessions.open("mallory", "tok-m", second(n)).unwrap())
            .collect();
        let later = second(MAX_SESSIONS + 20);
        assert_eq!(sessions.token(&alice, later).as_deref(), Some("tok-a"));
        assert_eq!(sessions.token(&bob, later).as_deref(), Some("tok-b"));
        assert_eq!(sessions.len(), 2 + MAX_SESSIONS_PER_TOKEN);
        // Mallory's newest sessions are the ones left.
        let (gone, kept) = mallory.split_at(mallory.len() - MAX_SESSIONS_PER_TOKEN);
        assert!(kept.iter().all(|id| sessions.token(id, later).is_some()));
        assert!(gone.iter().all(|id| sessions.token(id, later).is_none()));
    }

    #[test]
    fn past_the_global_bound_the_token_with_the_most_sessions_gives_one_up() {
        let sessions = Sessions::new(4, Duration::from_secs(3600));
        let t0 = Instant::now();
        let a = sessions.open("a", "a", t0).unwrap();
        let b1 = sessions
            .open("b", "b", t0 + Duration::from_secs(1))
            .unwrap();
        let b2 = sessions
            .open("b", "b", t0 + Duration::from_secs(2))
            .unwrap();
        let b3 = sessions
            .open("b", "b", t0 + Duration::from_secs(3))
            .unwrap();
        // a's one session is the least recently used, but b holds three.
        let c = sessions
            .open("c", "c", t0 + Duration::from_secs(4))
            .unwrap();
        let later = t0 + Duration::from_secs(5);
        assert_eq!(sessions.len(), 4);
        assert!(sessions.token(&b1, later).is_none(), "b's oldest went");
        for id in [&a, &b2, &b3, &c] {
            assert!(sessions.token(id, later).is_some());
        }
    }

    #[test]
    fn cookies_are_found_by_name() {
        let name = cookie_name(7080);
        assert_eq!(name, "weft_session_7080");
        assert_eq!(
            cookie("a=1; weft_session_7080=xyz; b=2", &name),
            Some("xyz")
        );
        assert_eq!(cookie("weft_session_7080=", &name), Some(""));
        assert_eq!(
            cookie("weft_session_7081=abc", &name),
            None,
            "another port's"
        );
        assert_eq!(cookie("other=1", &name), None);
        assert_eq!(cookie("garbage", &name), None);
    }
}
