//! The client token on the wire: `authorization: Bearer <token>` added to
//! every call by an interceptor. It never appears in `Debug` output. No
//! connecting or rpcs here.

use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

use crate::error::Error;

/// The channel with the client token added to every call.
pub(crate) type AuthChannel = InterceptedService<Channel, BearerToken>;

/// Adds `authorization: Bearer <token>` to every request (nothing when no
/// token was given).
#[derive(Clone)]
pub struct BearerToken(pub(crate) Option<MetadataValue<Ascii>>);

impl std::fmt::Debug for BearerToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the token itself.
        f.write_str(if self.0.is_some() {
            "BearerToken(set)"
        } else {
            "BearerToken(none)"
        })
    }
}

impl BearerToken {
    /// From a token string (`weft_<id>_<secret>`); surrounding whitespace
    /// (a file's newline) is dropped.
    pub fn new(token: Option<&str>) -> Result<BearerToken, Error> {
        match token.map(str::trim).filter(|t| !t.is_empty()) {
            None => Ok(BearerToken(None)),
            Some(token) => MetadataValue::try_from(format!("Bearer {token}"))
                .map(|mut value| {
                    value.set_sensitive(true);
                    BearerToken(Some(value))
                })
                .map_err(|_| Error::InvalidArgument("token: not printable ASCII".into())),
        }
    }
}

impl Interceptor for BearerToken {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(value) = &self.0 {
            request
                .metadata_mut()
                .insert("authorization", value.clone());
        }
        Ok(request)
    }
}
