//! Connecting a [`Client`]: parsing the address, TLS trust, the plaintext
//! probe (so a plaintext client meeting a TLS coordinator is told so at
//! once, without its token), and wrapping a channel with the token. The
//! rpcs themselves are in the crate root.

use std::time::Duration;

use tonic::transport::{Channel, Endpoint};

use weft_proto::pb::admin_service_client::AdminServiceClient;
use weft_proto::pb::task_service_client::TaskServiceClient;
use weft_proto::{CoordinatorAddr, address, pb};

use crate::error::Error;
use crate::token::BearerToken;
use crate::{CONNECT_TIMEOUT, Client, MAX_MESSAGE_BYTES, Trust};

impl Client {
    /// Connects to the coordinator at `url`: `http://HOST:PORT`,
    /// `https://HOST:PORT`, or `HOST:PORT` (the scheme is then
    /// [`weft_proto::address::DEFAULT_SCHEME`]); anything else is an
    /// [`Error::InvalidAddress`]. An unreachable coordinator is an
    /// [`Error::Unavailable`] within about [`CONNECT_TIMEOUT`].
    ///
    /// An `https://` address (or one without a scheme) needs a [`Trust`]:
    /// use [`Client::connect_with`].
    pub async fn connect(url: &str) -> Result<Client, Error> {
        Client::connect_secure(url, None, None).await
    }

    /// Like [`connect`](Self::connect), sending `token` as
    /// `authorization: Bearer <token>` on every call (the coordinator
    /// refuses TaskService and AdminService calls without one).
    pub async fn connect_with_token(url: &str, token: Option<&str>) -> Result<Client, Error> {
        Client::connect_secure(url, None, token).await
    }

    /// Like [`Client::connect`], trusting the coordinator's certificate by
    /// `trust` (the cluster's `ca.pem`, or its pin; see
    /// [`weft_proto::tls`] for what is checked).
    pub async fn connect_with(url: &str, trust: Option<&Trust>) -> Result<Client, Error> {
        Client::connect_secure(url, trust, None).await
    }

    /// Connects trusting the coordinator's certificate by `trust` and
    /// sending `token` on every call. `http://` addresses dial plainly: with
    /// a `trust` they are refused ([`Error::Tls`]), and a token sent over
    /// one is warned about (tracing); the first call that checks the
    /// address speaks plaintext is sent without the token. A certificate that does not match is an
    /// [`Error::Unavailable`] whose message says what to pass instead; an
    /// `https://` address without a trust, or an unreadable CA file, is
    /// [`Error::Tls`].
    pub async fn connect_secure(
        url: &str,
        trust: Option<&Trust>,
        token: Option<&str>,
    ) -> Result<Client, Error> {
        let bearer = BearerToken::new(token)?;
        let address = CoordinatorAddr::parse(url)?;
        let url = address.url();
        let (dial_url, connector) = weft_proto::tls::dial_plan(&address, trust)
            .map_err(|err| Error::Tls(err.to_string()))?;
        let endpoint = Endpoint::from_shared(dial_url)
            .map_err(|err| Error::InvalidUrl {
                url: url.clone(),
                reason: err.to_string(),
            })?
            .connect_timeout(CONNECT_TIMEOUT)
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(10))
            .keep_alive_timeout(Duration::from_secs(20))
            .keep_alive_while_idle(true);
        // The endpoint's own connect timeout covers the TCP handshake; this
        // one also bounds the HTTP/2 handshake with a peer that accepts but
        // never answers.
        let connect = async {
            match connector {
                Some(connector) => endpoint.connect_with_connector(connector).await,
                None => endpoint.connect().await,
            }
        };
        let channel =
            match tokio::time::timeout(CONNECT_TIMEOUT + Duration::from_secs(1), connect).await {
                Err(_) => {
                    return Err(Error::Unavailable(format!(
                        "cannot reach coordinator at {url}: timed out"
                    )));
                }
                Ok(Err(err)) => {
                    let mut error = Error::unreachable(&url, &err);
                    if let (Error::Unavailable(message), address::Scheme::Http) =
                        (&mut error, address.scheme())
                        && !message.contains("refused")
                    {
                        message.push_str("; ");
                        message.push_str(&weft_proto::tls::plaintext_hint(&address));
                    }
                    return Err(error);
                }
                Ok(Ok(channel)) => channel,
            };
        if address.scheme() == address::Scheme::Http {
            // The probe carries no token: a plaintext peer may not be the
            // coordinator at all.
            probe_plaintext(&url, channel.clone(), &address).await?;
            if bearer.0.is_some() {
                tracing::warn!(
                    coordinator = %url,
                    "sending the client token over plaintext http://: anyone on the path can read it; dial https:// with the cluster CA"
                );
            }
        }
        Ok(Client::from_channel_with(url, channel, bearer))
    }

    /// Wraps an already made channel (custom TLS, interceptors, tests).
    pub fn from_channel(url: impl Into<String>, channel: Channel) -> Client {
        Self::from_channel_with(url, channel, BearerToken(None))
    }

    /// Wraps a channel, adding `token` to every call.
    pub fn from_channel_with(
        url: impl Into<String>,
        channel: Channel,
        token: BearerToken,
    ) -> Client {
        Client {
            url: url.into(),
            tasks: TaskServiceClient::with_interceptor(channel.clone(), token.clone())
                .max_decoding_message_size(MAX_MESSAGE_BYTES),
            schedules:
                weft_proto::pb::schedule_service_client::ScheduleServiceClient::with_interceptor(
                    channel.clone(),
                    token.clone(),
                )
                .max_decoding_message_size(MAX_MESSAGE_BYTES),
            admin: AdminServiceClient::with_interceptor(channel, token)
                .max_decoding_message_size(MAX_MESSAGE_BYTES),
        }
    }
}

/// A plaintext channel "connects" to a TLS coordinator too (HTTP/2
/// does not wait for the server's answer): one small call finds out,
/// so the error says to dial https rather than "h2 protocol error" at
/// the first real call. Only a broken connection counts; any answer
/// (even a refusal) means plaintext works. The probe is sent without the
/// client token.
async fn probe_plaintext(
    url: &str,
    channel: Channel,
    address: &CoordinatorAddr,
) -> Result<(), Error> {
    let mut admin = AdminServiceClient::new(channel);
    let mut probe = tonic::Request::new(pb::ClusterInfoRequest {});
    probe.set_timeout(CONNECT_TIMEOUT);
    match tokio::time::timeout(CONNECT_TIMEOUT, admin.cluster_info(probe)).await {
        // A broken HTTP/2 connection shows as one of these; a real
        // answer (even a refusal) as any other code.
        Ok(Err(status))
            if matches!(
                status.code(),
                tonic::Code::Unavailable
                    | tonic::Code::Cancelled
                    | tonic::Code::Unknown
                    | tonic::Code::Internal
            ) =>
        {
            Err(Error::Unavailable(format!(
                "cannot reach coordinator at {}: {}; {}",
                url,
                status.message(),
                weft_proto::tls::plaintext_hint(address)
            )))
        }
        _ => Ok(()),
    }
}
