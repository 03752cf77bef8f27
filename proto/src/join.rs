//! Join tokens: what `weft token create --role node` prints and
//! `weft-node --join` (or the Python worker) takes. One string carries all
//! a new node needs:
//!
//! ```text
//! weftjoin_<base64url, no padding, of "1\n<address>\n<ca pin>\n<credential>">
//! ```
//!
//! - `address`: where the coordinator listens (`HOST:PORT` or a URL);
//! - `ca pin`: `sha256:HEX` of the cluster CA certificate (see
//!   [`crate::tls::ca_pin`]): the node trusts the coordinator only if its
//!   chain holds that CA;
//! - `credential`: `<id>_<secret>` (16 hex digits, then the secret), what
//!   `JoinRequest.token` carries. The coordinator keeps only the secret's
//!   SHA-256.
//!
//! Plain code: no I/O.

use base64::Engine;

use crate::tls::{TlsError, Trust};

/// The prefix of every join token.
pub const JOIN_PREFIX: &str = "weftjoin_";

/// The format version inside the token.
const VERSION: &str = "1";

/// A parsed join token.
#[derive(Clone, PartialEq, Eq)]
pub struct JoinToken {
    /// The coordinator's address (`HOST:PORT` or a URL).
    pub address: String,
    /// The CA pin, `sha256:HEX`.
    pub ca_pin: String,
    /// `<id>_<secret>`, sent in `JoinRequest.token`.
    pub credential: String,
}

impl std::fmt::Debug for JoinToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JoinToken")
            .field("address", &self.address)
            .field("ca_pin", &self.ca_pin)
            .field("id", &self.id())
            .finish_non_exhaustive()
    }
}

/// Why a join token could not be read. The message says what to do.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JoinTokenError {
    /// Not `weftjoin_...` (perhaps a client token).
    #[error(
        "not a join token (it must start with '{JOIN_PREFIX}'); an admin makes one with `weft token create --role node`"
    )]
    NotAJoinToken,
    /// Damaged: bad base64, missing lines, an unknown version.
    #[error(
        "the join token is damaged ({0}); copy it again whole, or make a new one with `weft token create --role node`"
    )]
    Damaged(String),
}

impl JoinToken {
    /// The token's public id (the part before the first `_` of the
    /// credential).
    pub fn id(&self) -> &str {
        self.credential.split_once('_').map_or("", |(id, _)| id)
    }

    /// The trust this token gives: the CA pin.
    pub fn trust(&self) -> Result<Trust, TlsError> {
        Trust::pin(&self.ca_pin)
    }

    /// The token as a string (`weftjoin_...`).
    pub fn encode(&self) -> String {
        let body = format!(
            "{VERSION}\n{}\n{}\n{}",
            self.address, self.ca_pin, self.credential
        );
        format!(
            "{JOIN_PREFIX}{}",
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(body)
        )
    }

    /// Reads a join token (blanks around it trimmed). Checks its shape:
    /// an address, a well-formed pin, and an `<id>_<secret>` credential.
    pub fn parse(text: &str) -> Result<JoinToken, JoinTokenError> {
        let encoded = text
            .trim()
            .strip_prefix(JOIN_PREFIX)
            .ok_or(JoinTokenError::NotAJoinToken)?;
        let damaged = |why: &str| JoinTokenError::Damaged(why.to_owned());
        let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(encoded.trim_end_matches('='))
            .map_err(|_| damaged("not base64url"))?;
        let body = String::from_utf8(bytes).map_err(|_| damaged("not UTF-8"))?;
        let mut lines = body.split('\n');
        let version = lines.next().unwrap_or_default();
        if version != VERSION {
            return Err(JoinTokenError::Damaged(format!(
                "format version '{version}', this build reads version {VERSION}"
            )));
        }
        let (Some(address), Some(ca_pin), Some(credential), None) =
            (lines.next(), lines.next(), lines.next(), lines.next())
        else {
            return Err(damaged("expected an address, a CA pin and a credential"));
        };
        if address.trim().is_empty() {
            return Err(damaged("no address"));
        }
        Trust::pin(ca_pin).map_err(|_| damaged("bad CA pin"))?;
        let well_formed = credential.split_once('_').is_some_and(|(id, secret)| {
            id.len() == 16 && id.bytes().all(|b| b.is_ascii_hexdigit()) && secret.len() >= 32
        });
        if !well_formed {
            return Err(damaged("bad credential"));
        }
        Ok(JoinToken {
            address: address.trim().to_owned(),
            ca_pin: ca_pin.trim().to_owned(),
            credential: credential.to_owned(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> JoinToken {
        JoinToken {
            address: "10.0.0.5:7070".into(),
            ca_pin: format!("sha256:{}", "ab".repeat(32)),
            credential: format!("0123456789abcdef_{}", "s".repeat(43)),
        }
    }

    #[test]
    fn a_token_reads_back_what_was_written() {
        let token = sample();
        let text = token.encode();
        assert!(text.starts_with(JOIN_PREFIX));
        assert!(
            text[JOIN_PREFIX.len()..]
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        );
        assert_eq!(JoinToken::parse(&format!("  {text}\n")).unwrap(), token);
        assert_eq!(token.id(), "0123456789abcdef");
        assert!(token.trust().is_ok());
        // Debug shows no secret.
        assert!(!format!("{token:?}").contains("sss"));
    }

    #[test]
    fn client_tokens_and_damaged_tokens_are_refused_saying_what_to_do() {
        let client = format!("weft_0123456789abcdef_{}", "s".repeat(43));
        let err = JoinToken::parse(&client).unwrap_err();
        assert_eq!(err, JoinTokenError::NotAJoinToken);
        assert!(err.to_string().contains("weft token create --role node"));

        let text = sample().encode();
        let cut = &text[..text.len() - 40];
        assert!(matches!(
            JoinToken::parse(cut),
            Err(JoinTokenError::Damaged(_))
        ));
        assert!(matches!(
            JoinToken::parse("weftjoin_!!!"),
            Err(JoinTokenError::Damaged(_))
        ));
        let mut bad_pin = sample();
        bad_pin.ca_pin = "sha256:xyz".into();
        assert!(JoinToken::parse(&bad_pin.encode()).is_err());
        let mut bad_credential = sample();
        bad_credential.credential = "nope".into();
        assert!(JoinToken::parse(&bad_credential.encode()).is_err());
        let v2 = format!(
            "{JOIN_PREFIX}{}",
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode("2\na\nb\nc")
        );
        let err = JoinToken::parse(&v2).unwrap_err().to_string();
        assert!(err.contains("version '2'"), "{err}");
    }
}
