//! Connecting a [`Client`]: parsing the address, TLS trust, the plaintext
//! probe (so a plaintext client meeting a TLS coordinator is told so at
//! once, without its token), and wrapping a channel with the token. With
//! several addresses (coordinators that take over from each other) the
//! first that answers is used, and the client remembers them all so that
//! [`Client::follow`] can dial through them again ([`Client::redial`]).
//! The rpcs themselves are in the crate root.

use std::sync::Arc;
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
    /// [`Error::Unavailable`] within about [`CONNECT_TIMEOUT`]. Several
    /// addresses separated by commas (`https://a:7070,https://b:7070`)
    /// are tried in order, as [`Client::connect_any`] does.
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
    ///
    /// `url` may name several coordinators, comma-separated: see
    /// [`Client::connect_any`].
    pub async fn connect_secure(
        url: &str,
        trust: Option<&Trust>,
        token: Option<&str>,
    ) -> Result<Client, Error> {
        let addresses = CoordinatorAddr::parse_list(url)?;
        Client::connect_addresses(addresses, trust, token).await
    }

    /// Connects to the first of `addresses` that answers, trying them in
    /// order (each as [`Client::connect_secure`] would: a refused
    /// connection moves on at once, an unreachable host after about
    /// [`CONNECT_TIMEOUT`]), with one `trust` and `token` for all. Meant
    /// for coordinators that take over from each other (one serving, the
    /// others standing by): every address is checked first (a bad one is
    /// [`Error::InvalidAddress`]); an error that another address cannot
    /// fix (a TLS setup error, a bad token) is answered at once; when none
    /// answers, [`Error::Unavailable`] says why for each.
    ///
    /// Unary calls stay on the coordinator connected to (a `Submit` that
    /// failed may have been recorded, so it is never sent to another);
    /// [`Client::follow`] (and so [`Client::wait`]) dials through the list
    /// again when its stream breaks, and resumes where it stopped.
    pub async fn connect_any(
        addresses: &[impl AsRef<str>],
        trust: Option<&Trust>,
        token: Option<&str>,
    ) -> Result<Client, Error> {
        let addresses = addresses
            .iter()
            .map(|address| CoordinatorAddr::parse(address.as_ref()))
            .collect::<Result<Vec<_>, _>>()?;
        if addresses.is_empty() {
            return Err(Error::InvalidAddress(weft_proto::AddressError(
                String::new(),
            )));
        }
        Client::connect_addresses(addresses, trust, token).await
    }

    /// Dials the coordinators again with the trust and token this client
    /// was connected with, starting with the one after the coordinator it
    /// is on (which may answer but no longer serve) and ending with that
    /// one; answers a new client on the first that answers. A client
    /// connected to one address answers itself (its channel dials again
    /// by itself).
    pub async fn redial(&self) -> Result<Client, Error> {
        let Some(redial) = &self.redial else {
            return Ok(self.clone());
        };
        let mut order = redial.addresses.clone();
        if let Some(current) = order.iter().position(|a| a.url() == self.url) {
            order.rotate_left(current + 1);
        }
        let mut client =
            Client::connect_addresses(order, redial.trust.as_ref(), redial.token.as_deref())
                .await?;
        // The list keeps the order it was given in.
        client.redial = Some(Arc::clone(redial));
        Ok(client)
    }

    /// Whether this client knows more than one coordinator address.
    pub(crate) fn has_standbys(&self) -> bool {
        self.redial
            .as_ref()
            .is_some_and(|redial| redial.addresses.len() > 1)
    }

    async fn connect_addresses(
        addresses: Vec<CoordinatorAddr>,
        trust: Option<&Trust>,
        token: Option<&str>,
    ) -> Result<Client, Error> {
        let mut failures = Vec::new();
        for address in &addresses {
            match Client::connect_one(address, trust, token).await {
                Ok(mut client) => {
                    if addresses.len() > 1 {
                        client.redial = Some(Arc::new(Redial {
                            addresses: addresses.clone(),
                            trust: trust.cloned(),
                            token: token.map(str::to_owned),
                        }));
                    }
                    return Ok(client);
                }
                Err(Error::Unavailable(why)) => {
                    tracing::debug!(coordinator = %address, error = %why, "trying the next coordinator");
                    failures.push(why);
                }
                Err(other) => return Err(other),
            }
        }
        Err(match <[String; 1]>::try_from(failures) {
            Ok([one]) => Error::Unavailable(one),
            Err(all) => Error::Unavailable(format!("no coordinator answered: {}", all.join("; "))),
        })
    }

    /// Connects to the one coordinator at `address`.
    async fn connect_one(
        address: &CoordinatorAddr,
        trust: Option<&Trust>,
        token: Option<&str>,
    ) -> Result<Client, Error> {
        let bearer = BearerToken::new(token)?;
        let url = address.url();
        let (dial_url, connector) = weft_proto::tls::dial_plan(address, trust)
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
                        message.push_str(&weft_proto::tls::plaintext_hint(address));
                    }
                    return Err(error);
                }
                Ok(Ok(channel)) => channel,
            };
        if address.scheme() == address::Scheme::Http {
            // The probe carries no token: a plaintext peer may not be the
            // coordinator at all.
            probe_plaintext(&url, channel.clone(), address).await?;
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
            redial: None,
            tasks: TaskServiceClient::with_interceptor(channel.clone(), token.clone())
                .max_decoding_message_size(MAX_MESSAGE_BYTES),
            encoded: tonic::client::Grpc::new(
                tonic::service::interceptor::InterceptedService::new(
                    channel.clone(),
                    token.clone(),
                ),
            )
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

/// What a client connected to several coordinators needs to dial them
/// again. Its `Debug` hides the token.
pub(crate) struct Redial {
    addresses: Vec<CoordinatorAddr>,
    trust: Option<Trust>,
    token: Option<String>,
}

impl std::fmt::Debug for Redial {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Redial")
            .field("addresses", &self.addresses)
            .field("trust", &self.trust)
            .field("token", &self.token.as_ref().map(|_| "(set)"))
            .finish()
    }
}

/// A plaintext channel "connects" to a TLS coordinator too (HTTP/2
/// does not wait for the server's answer): one small call finds out,
/// so the error says to dial https rather than "h2 protocol error" at
/// the first real call. A broken connection, or no answer within the
/// connect timeout, fails the connect; any answer (even a refusal) means
/// plaintext works. The probe is sent without the client token.
async fn probe_plaintext(
    url: &str,
    channel: Channel,
    address: &CoordinatorAddr,
) -> Result<(), Error> {
    let mut admin = AdminServiceClient::new(channel);
    // One deadline, ours: a grpc-timeout of the same length would race it
    // and end the call as CANCELLED instead.
    let probe = tonic::Request::new(pb::ClusterInfoRequest {});
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
        // No answer at all within the connect timeout: as unusable as a
        // connection that never opened (and a TLS listener is the likely
        // reason), so the caller hears it now, not at its first call.
        Err(_) => Err(Error::Unavailable(format!(
            "cannot reach coordinator at {url}: no answer within {}s; {}",
            CONNECT_TIMEOUT.as_secs(),
            weft_proto::tls::plaintext_hint(address)
        ))),
        Ok(_) => Ok(()),
    }
}
