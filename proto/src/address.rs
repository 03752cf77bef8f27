//! Coordinator addresses as people write them: `http://HOST:PORT`,
//! `https://HOST:PORT`, or `HOST:PORT` with no scheme (`127.0.0.1:7070`,
//! `[::1]:7070`, `localhost:7070`). The one parser every binary and the
//! Rust client use, so `weft-node --coordinator 127.0.0.1:7070` means what
//! `weft --coordinator 127.0.0.1:7070` means; the Python SDK
//! (`sdk/python/weft/_channel.py`) applies the same rules.
//!
//! Pure text: nothing is resolved or dialed here.

use std::fmt;
use std::net::Ipv6Addr;
use std::str::FromStr;

/// The scheme of an address written without one.
///
/// `https`: the coordinator serves TLS by default, and reaching an
/// `--insecure` coordinator takes an explicit `http://`. Change it here
/// only: the Python SDK's `DEFAULT_SCHEME` must follow.
pub const DEFAULT_SCHEME: Scheme = Scheme::Https;

/// How the coordinator is reached.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Scheme {
    /// Plaintext gRPC.
    Http,
    /// gRPC over TLS.
    Https,
}

impl Scheme {
    /// `http` or `https`.
    pub fn as_str(self) -> &'static str {
        match self {
            Scheme::Http => "http",
            Scheme::Https => "https",
        }
    }
}

/// A coordinator address, checked: a scheme, a host (a name, an IPv4
/// address or a bracketed IPv6 address) and a port.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct CoordinatorAddr {
    scheme: Scheme,
    /// As written; an IPv6 address keeps its brackets.
    host: String,
    port: u16,
}

/// An address that is none of the accepted forms. Its text is the whole
/// message a user sees.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("invalid coordinator address '{0}': expected HOST:PORT or http(s)://HOST:PORT")]
pub struct AddressError(pub String);

impl CoordinatorAddr {
    /// Parses `http://HOST:PORT`, `https://HOST:PORT` or `HOST:PORT` (then
    /// the scheme is [`DEFAULT_SCHEME`]). Surrounding blanks and one
    /// trailing `/` are ignored; a path, a user, a missing or zero port,
    /// an unbracketed IPv6 address or another scheme is an error.
    pub fn parse(text: &str) -> Result<CoordinatorAddr, AddressError> {
        let invalid = || AddressError(text.to_owned());
        let trimmed = text.trim();
        let (scheme, rest) = match trimmed.split_once("://") {
            Some((scheme, rest)) => {
                let scheme = match scheme.to_ascii_lowercase().as_str() {
                    "http" => Scheme::Http,
                    "https" => Scheme::Https,
                    _ => return Err(invalid()),
                };
                (scheme, rest)
            }
            None => (DEFAULT_SCHEME, trimmed),
        };
        let authority = rest.strip_suffix('/').unwrap_or(rest);
        let (host, port) = if let Some(bracketed) = authority.strip_prefix('[') {
            let (ip, port) = bracketed.split_once("]:").ok_or_else(invalid)?;
            ip.parse::<Ipv6Addr>().map_err(|_| invalid())?;
            (format!("[{ip}]"), port)
        } else {
            let (host, port) = authority.rsplit_once(':').ok_or_else(invalid)?;
            if !is_host_name(host) {
                return Err(invalid());
            }
            (host.to_owned(), port)
        };
        if port.is_empty() || !port.bytes().all(|b| b.is_ascii_digit()) {
            return Err(invalid());
        }
        let port = port
            .parse::<u16>()
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(invalid)?;
        Ok(CoordinatorAddr { scheme, host, port })
    }

    /// Parses one address or several separated by commas
    /// (`https://a:7070,https://b:7070`), each as [`parse`](Self::parse)
    /// does, keeping their order (the order they are tried in). Blanks
    /// around each are ignored; an empty list or an empty entry (`a:1,,b:2`)
    /// is an error naming the whole text.
    pub fn parse_list(text: &str) -> Result<Vec<CoordinatorAddr>, AddressError> {
        text.split(',')
            .map(|one| match one.trim() {
                "" => Err(AddressError(text.to_owned())),
                one => CoordinatorAddr::parse(one),
            })
            .collect()
    }

    /// How it is reached.
    pub fn scheme(&self) -> Scheme {
        self.scheme
    }

    /// The host as written (an IPv6 address in brackets).
    pub fn host(&self) -> &str {
        &self.host
    }

    /// The port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `HOST:PORT`, the gRPC target without a scheme.
    pub fn authority(&self) -> String {
        format!("{}:{}", self.host, self.port)
    }

    /// `scheme://HOST:PORT`, what a tonic `Endpoint` takes.
    pub fn url(&self) -> String {
        self.to_string()
    }
}

/// A host name or IPv4 address: letters, digits, `-`, `_` and `.`, not
/// empty. (Anything with a `:` would be an IPv6 address without brackets.)
fn is_host_name(host: &str) -> bool {
    !host.is_empty()
        && host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

impl fmt::Display for CoordinatorAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}://{}:{}", self.scheme.as_str(), self.host, self.port)
    }
}

impl FromStr for CoordinatorAddr {
    type Err = AddressError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        CoordinatorAddr::parse(text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn url(text: &str) -> String {
        CoordinatorAddr::parse(text)
            .unwrap_or_else(|e| panic!("{text:?}: {e}"))
            .url()
    }

    #[test]
    fn every_accepted_form_gives_a_url_with_a_scheme() {
        assert_eq!(url("http://10.0.0.5:7070"), "http://10.0.0.5:7070");
        assert_eq!(
            url("https://weft.example.com:443"),
            "https://weft.example.com:443"
        );
        assert_eq!(url("127.0.0.1:7070"), "https://127.0.0.1:7070");
        assert_eq!(url("localhost:7070"), "https://localhost:7070");
        assert_eq!(url("[::1]:7070"), "https://[::1]:7070");
        assert_eq!(url("https://[fe80::1]:9"), "https://[fe80::1]:9");
        assert_eq!(url("HTTP://node-1.lan:7070/"), "http://node-1.lan:7070");
        assert_eq!(url("  my_host:1 "), "https://my_host:1");
    }

    #[test]
    fn a_missing_scheme_means_the_default_one() {
        let addr = CoordinatorAddr::parse("[::1]:7070").unwrap();
        assert_eq!(addr.scheme(), DEFAULT_SCHEME);
        assert_eq!(DEFAULT_SCHEME, Scheme::Https);
        let plain = CoordinatorAddr::parse("http://c:1").unwrap();
        assert_eq!(plain.scheme(), Scheme::Http);
        assert_eq!(
            (addr.host(), addr.port(), addr.authority().as_str()),
            ("[::1]", 7070, "[::1]:7070")
        );
        let tls = CoordinatorAddr::parse("https://c:1").unwrap();
        assert_eq!(tls.scheme(), Scheme::Https);
    }

    #[test]
    fn a_list_keeps_its_order_and_refuses_an_empty_or_bad_entry() {
        let list = CoordinatorAddr::parse_list(" https://a:1, b:2 ,http://[::1]:3").unwrap();
        let urls: Vec<String> = list.iter().map(CoordinatorAddr::url).collect();
        assert_eq!(urls, ["https://a:1", "https://b:2", "http://[::1]:3"]);
        assert_eq!(CoordinatorAddr::parse_list("a:1").unwrap().len(), 1);
        for bad in ["", ",", "a:1,", "a:1,,b:2", "a:1,b"] {
            let err = CoordinatorAddr::parse_list(bad).unwrap_err();
            assert!(
                err.to_string().contains("expected HOST:PORT"),
                "{bad:?}: {err}"
            );
        }
    }

    #[test]
    fn garbage_is_refused_with_the_forms_that_work() {
        for bad in [
            "",
            "x",
            "localhost",
            "http://localhost",
            "127.0.0.1:",
            ":7070",
            "127.0.0.1:0",
            "127.0.0.1:65536",
            "127.0.0.1:70x",
            "127.0.0.1:+70",
            "::1:7070",
            "[::1]",
            "[::1]7070",
            "[nope]:7070",
            "grpc://c:7070",
            "ftp://c:7070",
            "http://c:7070/api",
            "http://user@c:7070",
            "http:/c:7070",
            "c :7070",
        ] {
            let err = CoordinatorAddr::parse(bad).expect_err(bad);
            assert_eq!(
                err.to_string(),
                format!(
                    "invalid coordinator address '{bad}': expected HOST:PORT or http(s)://HOST:PORT"
                )
            );
        }
    }
}
