//! Dashboard sessions: what the `weft_session` cookie stands for.
//!
//! Logging in trades a client token for a session id (256 random bits,
//! URL-safe base64); the session keeps the token in memory only and every
//! request through it checks the token again (`TokenIndex::authenticate`),
//! so a revoked or expired token stops working at once, cookie or not.
//! Sessions are bounded: at most [`MAX_SESSIONS`] (logging in past it ends
//! the one used least recently), each ended after [`SESSION_IDLE`] without
//! a request. Nothing is stored: a restart logs everyone out.
//!
//! Plain state behind one mutex; no clock of its own (`now` comes in).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use base64::Engine;

/// Most sessions held at once; a login past it ends the session used
/// least recently.
pub(crate) const MAX_SESSIONS: usize = 1024;

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
    idle: Duration,
    open: Mutex<HashMap<String, Session>>,
}

#[derive(Debug)]
struct Session {
    /// The client token it logged in with, checked again on every use.
    token: String,
    last_used: Instant,
}

impl Sessions {
    /// At most `max` sessions, each ended after `idle` unused.
    pub(crate) fn new(max: usize, idle: Duration) -> Sessions {
        Sessions {
            max: max.max(1),
            idle,
            open: Mutex::new(HashMap::new()),
        }
    }

    /// A new session for `token`; its id (the cookie's value). `None`
    /// when the system has no randomness to give.
    pub(crate) fn open(&self, token: &str, now: Instant) -> Option<String> {
        let mut bytes = [0u8; 32];
        getrandom::fill(&mut bytes).ok()?;
        let id = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes);
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        let idle = self.idle;
        open.retain(|_, session| now.saturating_duration_since(session.last_used) < idle);
        while open.len() >= self.max {
            let Some(oldest) = open
                .iter()
                .min_by_key(|(_, session)| session.last_used)
                .map(|(id, _)| id.clone())
            else {
                break;
            };
            open.remove(&oldest);
        }
        open.insert(
            id.clone(),
            Session {
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
        let id = sessions.open("tok", t0).unwrap();
        assert_eq!(id.len(), 43, "256 bits, base64 without padding");
        assert_eq!(
            sessions.token(&id, t0 + Duration::from_secs(59)).as_deref(),
            Some("tok")
        );
        // Used at 59 s: idle counts from then.
        assert!(sessions.token(&id, t0 + Duration::from_secs(100)).is_some());
        assert!(sessions.token(&id, t0 + Duration::from_secs(200)).is_none());
        let other = sessions.open("tok", t0).unwrap();
        assert_ne!(other, id);
        sessions.close(&other);
        assert!(sessions.token(&other, t0).is_none());
        assert!(sessions.token("nope", t0).is_none());
    }

    #[test]
    fn past_the_bound_the_least_recently_used_session_ends() {
        let sessions = Sessions::new(2, Duration::from_secs(3600));
        let t0 = Instant::now();
        let a = sessions.open("a", t0).unwrap();
        let b = sessions.open("b", t0 + Duration::from_secs(1)).unwrap();
        // a is used after b: b is now the least recently used.
        sessions.token(&a, t0 + Duration::from_secs(2));
        let c = sessions.open("c", t0 + Duration::from_secs(3)).unwrap();
        assert_eq!(sessions.len(), 2);
        assert!(sessions.token(&b, t0 + Duration::from_secs(4)).is_none());
        assert!(sessions.token(&a, t0 + Duration::from_secs(4)).is_some());
        assert!(sessions.token(&c, t0 + Duration::from_secs(4)).is_some());
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
