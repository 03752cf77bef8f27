//! A small HTTP/1.1 client for the coordinator's HTTP listener (the
//! dashboard's API, `/healthz`, `/metrics`): one connection per request,
//! TLS with the cluster's CA for `https://` (nothing else trusted), hyper
//! underneath. Event streams are read as they come ([`EventStream`]).
//! Test-only: failures panic saying what failed.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper_util::rt::TokioIo;
use serde_json::Value;
use tokio::net::TcpStream;

use weft_proto::tls::Trust;

/// How long one request may take (an event stream: until its headers).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// Talks to one base URL (`https://127.0.0.1:PORT`).
#[derive(Clone)]
pub struct HttpClient {
    /// `host:port`.
    authority: String,
    /// TLS trusting exactly the cluster CA; `None`: plaintext.
    tls: Option<Arc<rustls::ClientConfig>>,
}

/// A whole answer.
#[derive(Debug)]
pub struct HttpResponse {
    /// The status code.
    pub status: u16,
    /// The headers.
    pub headers: hyper::HeaderMap,
    /// The body.
    pub body: Vec<u8>,
}

impl HttpResponse {
    /// The body as JSON (panics saying what came when it is not).
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "not JSON ({e}), status {}: {}",
                self.status,
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    /// A header's value as text ("" when absent).
    pub fn header(&self, name: &str) -> String {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned()
    }
}

/// One Server-Sent Event.
#[derive(Debug, Clone, PartialEq)]
pub struct SseEvent {
    /// `id:` (the task event's seq).
    pub id: Option<u64>,
    /// `event:`.
    pub event: String,
    /// `data:`, as JSON.
    pub data: Value,
}

/// An open `text/event-stream` answer, read event by event.
pub struct EventStream {
    body: Incoming,
    buf: String,
}

impl EventStream {
    /// The next event; `None` when the stream ended. Comments
    /// (keep-alives) are skipped.
    pub async fn next(&mut self) -> Option<SseEvent> {
        loop {
            if let Some(end) = self.buf.find("\n\n") {
                let block: String = self.buf.drain(..end + 2).collect();
                if let Some(event) = parse_event(&block) {
                    return Some(event);
                }
                continue;
            }
            let frame = self.body.frame().await?.ok()?;
            if let Ok(data) = frame.into_data() {
                self.buf.push_str(&String::from_utf8_lossy(&data));
            }
        }
    }
}

fn parse_event(block: &str) -> Option<SseEvent> {
    let mut id = None;
    let mut event = String::from("message");
    let mut data = String::new();
    let mut any = false;
    for line in block.lines() {
        if let Some(rest) = line.strip_prefix("id:") {
            id = rest.trim().parse().ok();
            any = true;
        } else if let Some(rest) = line.strip_prefix("event:") {
            event = rest.trim().to_owned();
            any = true;
        } else if let Some(rest) = line.strip_prefix("data:") {
            if !data.is_empty() {
                data.push('\n');
            }
            data.push_str(rest.strip_prefix(' ').unwrap_or(rest));
            any = true;
        }
    }
    if !any {
        return None;
    }
    let data = serde_json::from_str(&data).unwrap_or(Value::String(data));
    Some(SseEvent { id, event, data })
}

impl HttpClient {
    /// The port it talks to.
    pub fn port(&self) -> u16 {
        self.authority
            .rsplit_once(':')
            .and_then(|(_, port)| port.parse().ok())
            .unwrap_or_else(|| panic!("no port in {}", self.authority))
    }

    /// A client of `url` (`http://` or `https://HOST:PORT`), trusting
    /// `ca_file` for `https://`.
    pub fn new(url: &str, ca_file: Option<&Path>) -> HttpClient {
        let (tls, authority) = match url.split_once("://") {
            Some(("https", rest)) => (true, rest),
            Some(("http", rest)) => (false, rest),
            _ => panic!("not an http(s) URL: {url}"),
        };
        let authority = authority.trim_end_matches('/').to_owned();
        let tls = tls.then(|| {
            let ca_file = ca_file.unwrap_or_else(|| panic!("{url}: https needs the CA file"));
            let config = Trust::CaFile(ca_file.to_owned())
                .client_config()
                .unwrap_or_else(|e| panic!("a TLS config trusting {}: {e}", ca_file.display()));
            let mut config = (*config).clone();
            config.alpn_protocols = vec![b"http/1.1".to_vec()];
            Arc::new(config)
        });
        HttpClient { authority, tls }
    }

    /// Sends one request; answers the status, headers and the response's
    /// body stream.
    async fn send(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<Vec<u8>>,
    ) -> Result<hyper::Response<Incoming>, String> {
        let tcp = TcpStream::connect(&self.authority)
            .await
            .map_err(|e| format!("connecting to {}: {e}", self.authority))?;
        let mut request = hyper::Request::builder()
            .method(method)
            .uri(path)
            .header("host", &self.authority);
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let request = request
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .map_err(|e| e.to_string())?;
        match &self.tls {
            Some(config) => {
                let tls = self.tls_handshake(config, tcp).await?;
                exchange(TokioIo::new(tls), request).await
            }
            None => exchange(TokioIo::new(tcp), request).await,
        }
    }

    /// Sends a request and reads the whole answer.
    pub async fn try_request(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<Vec<u8>>,
    ) -> Result<HttpResponse, String> {
        tokio::time::timeout(REQUEST_TIMEOUT, async {
            let response = self.send(method, path, headers, body).await?;
            let (parts, body) = response.into_parts();
            let body = body.collect().await.map_err(|e| e.to_string())?;
            Ok(HttpResponse {
                status: parts.status.as_u16(),
                headers: parts.headers,
                body: body.to_bytes().to_vec(),
            })
        })
        .await
        .map_err(|_| format!("{method} {path}: no answer within {REQUEST_TIMEOUT:?}"))?
    }

    /// Sends a request and reads the whole answer (panics on a transport
    /// failure).
    pub async fn request(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<Vec<u8>>,
    ) -> HttpResponse {
        self.try_request(method, path, headers, body)
            .await
            .unwrap_or_else(|e| panic!("{method} {path}: {e}"))
    }

    /// `GET path` with `Authorization: Bearer token`.
    pub async fn get(&self, path: &str, token: &str) -> HttpResponse {
        let auth = format!("Bearer {token}");
        self.request("GET", path, &[("authorization", &auth)], None)
            .await
    }

    /// `POST path` with `Authorization: Bearer token` and the CSRF header.
    pub async fn post(&self, path: &str, token: &str) -> HttpResponse {
        let auth = format!("Bearer {token}");
        self.request(
            "POST",
            path,
            &[("authorization", &auth), ("x-weft-csrf", "1")],
            None,
        )
        .await
    }

    /// Opens an event stream (`GET path` with `headers`); panics unless
    /// it answers 200.
    pub async fn events(&self, path: &str, headers: &[(&str, &str)]) -> EventStream {
        let response = tokio::time::timeout(REQUEST_TIMEOUT, self.send("GET", path, headers, None))
            .await
            .unwrap_or_else(|_| panic!("GET {path}: no answer within {REQUEST_TIMEOUT:?}"))
            .unwrap_or_else(|e| panic!("GET {path}: {e}"));
        let status = response.status().as_u16();
        let kind = response
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        assert_eq!(status, 200, "GET {path}");
        assert!(kind.starts_with("text/event-stream"), "{kind}");
        EventStream {
            body: response.into_body(),
            buf: String::new(),
        }
    }
}

/// One kept-alive HTTP/1.1 connection (as a browser keeps one): requests
/// one after the other, no new handshake each.
pub struct Connection {
    authority: String,
    sender: hyper::client::conn::http1::SendRequest<Full<Bytes>>,
}

impl Connection {
    /// Sends a request and reads the whole answer.
    pub async fn request(
        &mut self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
    ) -> Result<HttpResponse, String> {
        let mut request = hyper::Request::builder()
            .method(method)
            .uri(path)
            .header("host", &self.authority);
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let request = request
            .body(Full::new(Bytes::new()))
            .map_err(|e| e.to_string())?;
        self.sender.ready().await.map_err(|e| e.to_string())?;
        let response = self
            .sender
            .send_request(request)
            .await
            .map_err(|e| e.to_string())?;
        let (parts, body) = response.into_parts();
        let body = body.collect().await.map_err(|e| e.to_string())?;
        Ok(HttpResponse {
            status: parts.status.as_u16(),
            headers: parts.headers,
            body: body.to_bytes().to_vec(),
        })
    }
}

impl HttpClient {
    /// Opens one connection to send many requests on.
    pub async fn connect(&self) -> Result<Connection, String> {
        let tcp = TcpStream::connect(&self.authority)
            .await
            .map_err(|e| format!("connecting to {}: {e}", self.authority))?;
        let sender = match &self.tls {
            Some(config) => {
                let tls = self.tls_handshake(config, tcp).await?;
                handshake(TokioIo::new(tls)).await?
            }
            None => handshake(TokioIo::new(tcp)).await?,
        };
        Ok(Connection {
            authority: self.authority.clone(),
            sender,
        })
    }

    async fn tls_handshake(
        &self,
        config: &Arc<rustls::ClientConfig>,
        tcp: TcpStream,
    ) -> Result<tokio_rustls::client::TlsStream<TcpStream>, String> {
        let host = self
            .authority
            .rsplit_once(':')
            .map(|(h, _)| h.trim_matches(['[', ']']))
            .unwrap_or(&self.authority);
        let name =
            rustls_pki_types::ServerName::try_from(host.to_owned()).map_err(|e| e.to_string())?;
        tokio_rustls::TlsConnector::from(Arc::clone(config))
            .connect(name, tcp)
            .await
            .map_err(|e| format!("TLS handshake with {}: {e}", self.authority))
    }
}

/// The HTTP/1.1 handshake on `io`; the connection is driven by a task of
/// its own.
async fn handshake<IO>(
    io: IO,
) -> Result<hyper::client::conn::http1::SendRequest<Full<Bytes>>, String>
where
    IO: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (sender, connection) = hyper::client::conn::http1::handshake(io)
        .await
        .map_err(|e| format!("HTTP handshake: {e}"))?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(sender)
}

/// One HTTP/1.1 exchange on `io`.
async fn exchange<IO>(
    io: IO,
    request: hyper::Request<Full<Bytes>>,
) -> Result<hyper::Response<Incoming>, String>
where
    IO: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let mut sender = handshake(io).await?;
    sender
        .send_request(request)
        .await
        .map_err(|e| format!("sending the request: {e}"))
}
