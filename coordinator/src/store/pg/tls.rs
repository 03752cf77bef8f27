//! TLS to the database. The URL says it as libpq does:
//! `sslmode=verify-full` with `sslrootcert=CA_FILE` (the CA that signed the
//! database server's certificate) encrypts every connection and checks the
//! server's certificate chain and its name, with the workspace's rustls.
//! The modes that would encrypt without checking who answers
//! (`require`, `verify-ca` without the name) are refused at start, saying
//! what to write instead; `disable`, `allow` and `prefer` (libpq's
//! default) connect in plaintext, as without TLS support.
//!
//! The driver does not know `verify-full` or `sslrootcert`: both are taken
//! out of the URL here, and the driver is asked to require TLS.

use std::path::PathBuf;

use rustls::RootCertStore;
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use tokio_postgres::Config;
use tokio_postgres::config::SslMode;
use tokio_postgres_rustls::MakeRustlsConnect;

use crate::store::StoreError;

/// What the URL asks for, once the driver's part is parsed.
pub(super) struct Parsed {
    /// The driver's configuration (the TLS mode set to match).
    pub(super) config: Config,
    /// The connector for `sslmode=verify-full`; `None`: plaintext.
    pub(super) tls: Option<MakeRustlsConnect>,
}

/// The TLS options taken out of a URL.
#[derive(Debug, Default, PartialEq, Eq)]
struct Options {
    sslmode: Option<String>,
    sslrootcert: Option<String>,
}

/// Parses `url` (a `postgresql://` URL or libpq's `key=value` pairs) with
/// its TLS options. The errors never repeat the URL, which may hold a
/// password.
pub(super) fn parse(url: &str) -> Result<Parsed, StoreError> {
    let (rest, options) = take_options(url);
    let mut config: Config = rest
        .parse()
        .map_err(|err| refused(format!("it cannot be read as a PostgreSQL URL: {err}")))?;
    let fix = "use sslmode=verify-full&sslrootcert=CA_FILE (the CA that signed the \
               database server's certificate), or sslmode=disable on a trusted network";
    match options.sslmode.as_deref() {
        Some("verify-full") => {}
        Some(mode @ ("require" | "verify-ca")) => {
            return Err(refused(format!(
                "sslmode={mode} would not check the database server's name: {fix}"
            )));
        }
        Some("disable" | "allow" | "prefer") | None => {
            if options.sslrootcert.is_some() {
                return Err(refused(format!(
                    "sslrootcert is used with sslmode=verify-full only: {fix}"
                )));
            }
            config.ssl_mode(SslMode::Disable);
            return Ok(Parsed { config, tls: None });
        }
        Some(other) => {
            return Err(refused(format!(
                "sslmode={other} is not a mode this coordinator knows: {fix}"
            )));
        }
    }
    let Some(file) = options.sslrootcert else {
        return Err(refused(format!(
            "sslmode=verify-full needs sslrootcert: {fix}"
        )));
    };
    let roots = roots(&PathBuf::from(file))?;
    let tls = rustls::ClientConfig::builder_with_provider(weft_proto::tls::provider())
        .with_safe_default_protocol_versions()
        .map_err(|err| refused(format!("TLS: {err}")))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.ssl_mode(SslMode::Require);
    Ok(Parsed {
        config,
        tls: Some(MakeRustlsConnect::new(tls)),
    })
}

/// The certificates in the PEM file at `path`, as the only trusted roots.
fn roots(path: &std::path::Path) -> Result<RootCertStore, StoreError> {
    let shown = path.display();
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
        .map_err(|err| refused(format!("sslrootcert {shown}: {err}")))?
        .collect::<Result<_, _>>()
        .map_err(|err| refused(format!("sslrootcert {shown}: {err}")))?;
    let mut roots = RootCertStore::empty();
    let (added, _) = roots.add_parsable_certificates(certs);
    if added == 0 {
        return Err(refused(format!(
            "sslrootcert {shown} holds no certificate (a PEM file of the CA that signed the \
             database server's certificate)"
        )));
    }
    Ok(roots)
}

/// A start refused for what the URL says.
fn refused(message: String) -> StoreError {
    StoreError::Database {
        target: "(the database URL)".into(),
        message,
    }
}

/// Takes `sslmode` and `sslrootcert` out of `url`: from the query of a
/// `postgresql://` / `postgres://` URL (percent-decoded), or from libpq's
/// `key=value` pairs. Answers the rest and the options.
fn take_options(url: &str) -> (String, Options) {
    let mut options = Options::default();
    let mut keep = |key: &str, value: String| match key {
        "sslmode" => {
            options.sslmode = Some(value);
            false
        }
        "sslrootcert" => {
            options.sslrootcert = Some(value);
            false
        }
        _ => true,
    };
    let is_url = url.starts_with("postgresql://") || url.starts_with("postgres://");
    let rest = if is_url {
        match url.split_once('?') {
            Some((base, query)) => {
                let kept: Vec<&str> = query
                    .split('&')
                    .filter(|pair| {
                        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
                        keep(key, percent_decode(value))
                    })
                    .collect();
                match kept.is_empty() {
                    true => base.to_owned(),
                    false => format!("{base}?{}", kept.join("&")),
                }
            }
            None => url.to_owned(),
        }
    } else {
        url.split_whitespace()
            .filter(|pair| {
                let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
                keep(key.trim(), value.trim().to_owned())
            })
            .collect::<Vec<_>>()
            .join(" ")
    };
    (rest, options)
}

/// `%XX` escapes decoded (a malformed one is kept as it is).
fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        match (
            bytes[i],
            bytes.get(i + 1).copied(),
            bytes.get(i + 2).copied(),
        ) {
            (b'%', Some(h), Some(l)) if hex(h).is_some() && hex(l).is_some() => {
                let (h, l) = (hex(h).unwrap_or(0), hex(l).unwrap_or(0));
                out.push((h * 16 + l) as u8);
                i += 3;
            }
            (b, _, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tls_options_come_out_of_both_url_forms_and_the_rest_stays() {
        let (rest, options) = take_options(
            "postgresql://weft:pw@db:5432/weft?sslmode=verify-full&sslrootcert=%2Fetc%2Fdb%20ca.pem&application_name=x",
        );
        assert_eq!(rest, "postgresql://weft:pw@db:5432/weft?application_name=x");
        assert_eq!(options.sslmode.as_deref(), Some("verify-full"));
        assert_eq!(options.sslrootcert.as_deref(), Some("/etc/db ca.pem"));
        let (rest, options) =
            take_options("host=db user=weft sslmode=verify-full sslrootcert=/etc/ca.pem");
        assert_eq!(rest, "host=db user=weft");
        assert_eq!(options.sslrootcert.as_deref(), Some("/etc/ca.pem"));
        let (rest, options) = take_options("postgresql://db/weft?sslrootcert=a");
        assert_eq!(rest, "postgresql://db/weft");
        assert_eq!(options.sslmode, None);
        assert_eq!(
            take_options("postgresql://db/weft").0,
            "postgresql://db/weft"
        );
    }

    #[test]
    fn modes_that_would_not_check_the_server_are_refused_saying_what_to_write() {
        for url in [
            "postgresql://db/weft?sslmode=require",
            "postgresql://db/weft?sslmode=verify-ca&sslrootcert=/x",
            "postgresql://db/weft?sslmode=verify-full",
            "postgresql://db/weft?sslrootcert=/x",
            "postgresql://db/weft?sslmode=bogus",
        ] {
            let Err(err) = parse(url) else {
                panic!("{url} was taken");
            };
            let message = err.to_string();
            assert!(
                message.contains("sslmode=verify-full&sslrootcert=CA_FILE"),
                "{message}"
            );
            assert!(
                !message.contains("postgresql://"),
                "the URL is not repeated: {message}"
            );
        }
        let err = parse("postgresql://db/weft?sslmode=verify-full&sslrootcert=/no/such/ca.pem")
            .err()
            .expect("a missing CA file is refused");
        assert!(err.to_string().contains("/no/such/ca.pem"), "{err}");
        for plain in [
            "postgresql://db/weft",
            "postgresql://db/weft?sslmode=disable",
            "postgresql://db/weft?sslmode=prefer",
        ] {
            let parsed = parse(plain).unwrap_or_else(|e| panic!("{plain}: {e}"));
            assert!(parsed.tls.is_none());
            assert_eq!(parsed.config.get_ssl_mode(), SslMode::Disable);
        }
    }
}
