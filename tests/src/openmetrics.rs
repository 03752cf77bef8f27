//! A strict reader of OpenMetrics text, for tests: it refuses what a
//! Prometheus server would (a sample without a `# TYPE`, a bad value, no
//! `# EOF` at the end, histogram buckets that do not add up) and answers
//! the value of a sample by name and labels.
//!
//! The coordinator's own tests include this file too
//! (`coordinator/tests/metrics.rs`). Also a minimal HTTP/1.1 GET, for the
//! plaintext listeners.

use std::collections::HashMap;

/// One sample line.
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    /// The sample's name (with `_total`, `_bucket`... as written).
    pub name: String,
    /// Its labels, in order.
    pub labels: Vec<(String, String)>,
    /// Its value.
    pub value: f64,
}

/// A parsed exposition.
#[derive(Debug)]
pub struct Scrape {
    /// Metric family name -> type.
    pub types: HashMap<String, String>,
    /// Every sample, in order.
    pub samples: Vec<Sample>,
}

const SUFFIXES: [&str; 6] = ["_total", "_bucket", "_count", "_sum", "_info", "_created"];

impl Scrape {
    /// Parses `text`, panicking with the offending line on anything a
    /// scraper would refuse.
    pub fn parse(text: &str) -> Scrape {
        assert!(text.ends_with("# EOF\n"), "no `# EOF` at the end:\n{text}");
        let mut types = HashMap::new();
        let mut samples = Vec::new();
        let body = &text[..text.len() - "# EOF\n".len()];
        for line in body.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, kind) = rest.split_once(' ').expect("# TYPE name type");
                let known = [
                    "counter",
                    "gauge",
                    "histogram",
                    "info",
                    "summary",
                    "stateset",
                    "unknown",
                ];
                assert!(known.contains(&kind), "unknown type in {line:?}");
                assert!(
                    types.insert(name.to_owned(), kind.to_owned()).is_none(),
                    "a second # TYPE for {name}"
                );
                continue;
            }
            if line.starts_with("# HELP ") || line.starts_with("# UNIT ") {
                continue;
            }
            assert!(!line.starts_with('#'), "stray comment {line:?}");
            let sample = parse_sample(line);
            let family = family_of(&sample.name, &types)
                .unwrap_or_else(|| panic!("sample without a # TYPE: {line:?}"));
            assert!(family.starts_with("weft_"), "not weft_-prefixed: {line:?}");
            samples.push(sample);
        }
        let scrape = Scrape { types, samples };
        scrape.check_histograms();
        scrape
    }

    /// The value of `name` with exactly `labels`.
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        self.samples
            .iter()
            .find(|s| {
                s.name == name
                    && s.labels.len() == labels.len()
                    && labels
                        .iter()
                        .all(|(k, v)| s.labels.iter().any(|(a, b)| a == k && b == v))
            })
            .map(|s| s.value)
    }

    /// The same, which must be there.
    pub fn get(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.value(name, labels)
            .unwrap_or_else(|| panic!("no sample {name}{labels:?}"))
    }

    /// Every histogram's buckets rise and end in `+Inf` == `_count`.
    fn check_histograms(&self) {
        for (name, kind) in &self.types {
            if kind != "histogram" {
                continue;
            }
            let bucket = format!("{name}_bucket");
            let counts: Vec<(String, f64)> = self
                .samples
                .iter()
                .filter(|s| s.name == bucket)
                .map(|s| {
                    let le = s.labels.iter().find(|(k, _)| k == "le").expect("le label");
                    (le.1.clone(), s.value)
                })
                .collect();
            assert!(!counts.is_empty(), "{name}: no buckets");
            assert!(
                counts.windows(2).all(|w| w[0].1 <= w[1].1),
                "{name}: buckets fall"
            );
            let last = counts.last().expect("a bucket");
            assert_eq!(last.0, "+Inf", "{name}: the last bucket is not +Inf");
            assert_eq!(
                last.1,
                self.get(&format!("{name}_count"), &[]),
                "{name}: +Inf != _count"
            );
        }
    }
}

fn family_of<'a>(sample: &str, types: &'a HashMap<String, String>) -> Option<&'a str> {
    if let Some((name, _)) = types.get_key_value(sample) {
        return Some(name);
    }
    SUFFIXES.iter().find_map(|suffix| {
        let base = sample.strip_suffix(suffix)?;
        types.get_key_value(base).map(|(name, _)| name.as_str())
    })
}

fn parse_sample(line: &str) -> Sample {
    let (name_labels, value) = line
        .rsplit_once(' ')
        .unwrap_or_else(|| panic!("no value: {line:?}"));
    let value = match value {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        v => v
            .parse()
            .unwrap_or_else(|_| panic!("bad value in {line:?}")),
    };
    let (name, labels) = match name_labels.split_once('{') {
        None => (name_labels, Vec::new()),
        Some((name, rest)) => {
            let inner = rest
                .strip_suffix('}')
                .unwrap_or_else(|| panic!("unclosed labels: {line:?}"));
            let labels = inner
                .split(',')
                .filter(|pair| !pair.is_empty())
                .map(|pair| {
                    let (k, v) = pair
                        .split_once('=')
                        .unwrap_or_else(|| panic!("bad label: {line:?}"));
                    let v = v
                        .strip_prefix('"')
                        .and_then(|v| v.strip_suffix('"'))
                        .unwrap_or_else(|| panic!("unquoted label value: {line:?}"));
                    (k.to_owned(), v.to_owned())
                })
                .collect();
            (name, labels)
        }
    };
    assert!(
        !name.is_empty()
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':'),
        "bad metric name in {line:?}"
    );
    Sample {
        name: name.to_owned(),
        labels,
        value,
    }
}

/// An HTTP response, as [`get`] reads it.
#[derive(Debug)]
pub struct Response {
    /// The status code.
    pub status: u16,
    /// Header lines, names lower-cased.
    pub headers: Vec<(String, String)>,
    /// The body.
    pub body: String,
}

impl Response {
    /// The value of header `name` (lower case).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// `GET path` on a plaintext HTTP/1.1 listener at `addr`, one request per
/// connection (`Connection: close`), the body read to the end.
pub async fn get(addr: std::net::SocketAddr, path: &str) -> std::io::Result<Response> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).await?;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| std::io::Error::other(format!("no end of headers in {text:?}")))?;
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|line| line.split(' ').nth(1))
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("no status line in {head:?}")))?;
    let headers = lines
        .filter_map(|line| line.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    Ok(Response {
        status,
        headers,
        body: body.to_owned(),
    })
}
