//! Messages encoded before they reach gRPC: [`EncodedCodec`] sends bytes
//! already encoded as they are and decodes answers with prost. The calls
//! whose messages are written straight from borrowed domain values (a
//! client's `Submit`, the coordinator's `Assign`s; see `spec_wire`) go
//! through it, so no generated message is built only to be encoded and
//! dropped. The bytes on the wire are the generated encoder's.

use std::marker::PhantomData;

use bytes::{BufMut, Bytes};
use prost::encoding::{WireType, encode_key, encode_varint, encoded_len_varint, key_len};
use tonic::Status;
use tonic::codec::{Codec, EncodeBuf, Encoder};
use tonic_prost::ProstDecoder;

use crate::pb;

/// A codec whose outgoing messages are their wire bytes, and whose
/// incoming ones are the prost message `D`.
#[derive(Debug)]
pub struct EncodedCodec<D>(PhantomData<D>);

impl<D> Default for EncodedCodec<D> {
    fn default() -> Self {
        EncodedCodec(PhantomData)
    }
}

impl<D: prost::Message + Default + Send + 'static> Codec for EncodedCodec<D> {
    type Encode = Bytes;
    type Decode = D;
    type Encoder = Verbatim;
    type Decoder = ProstDecoder<D>;

    fn encoder(&mut self) -> Verbatim {
        Verbatim
    }

    fn decoder(&mut self) -> ProstDecoder<D> {
        ProstDecoder::default()
    }
}

/// `NodeService.Connect`'s codec on the coordinator: it sends each
/// `CoordinatorMessage` as its wire bytes and reads `NodeMessage`s.
pub type ConnectCodec = EncodedCodec<pb::NodeMessage>;

/// `weft.v1.NodeService` with [`ConnectCodec`] for `Connect`: what the
/// coordinator serves (the routes, messages and bytes of the generated
/// `pb::node_service_server`, whose `Connect` stream yields
/// `pb::CoordinatorMessage`s to encode instead).
#[allow(missing_docs, clippy::all, clippy::pedantic)]
pub mod node_service {
    include!(concat!(env!("OUT_DIR"), "/weft.v1.NodeService.rs"));
}

/// Writes a message's bytes as they are.
#[derive(Debug, Default)]
pub struct Verbatim;

impl Encoder for Verbatim {
    type Item = Bytes;
    type Error = Status;

    fn encode(&mut self, item: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put_slice(&item);
        Ok(())
    }
}

/// Appends a message field: `tag`, the length of `body`, then `body`
/// (a message's bytes without their own length).
pub fn put_message(tag: u32, body: &[u8], buf: &mut Vec<u8>) {
    encode_key(tag, WireType::LengthDelimited, buf);
    encode_varint(body.len() as u64, buf);
    buf.extend_from_slice(body);
}

/// How many bytes [`put_message`] writes for a body `len` bytes long.
pub fn message_len(tag: u32, len: usize) -> usize {
    key_len(tag) + encoded_len_varint(len as u64) + len
}

/// A proto3 string or bytes field's length, `value` its bytes:
/// nothing when empty, as the generated encoder skips it.
pub fn str_field_len(tag: u32, value: &[u8]) -> usize {
    match value.is_empty() {
        true => 0,
        false => message_len(tag, value.len()),
    }
}

#[cfg(test)]
mod tests {
    use prost::Message;

    use super::*;

    #[test]
    fn a_message_field_is_written_as_the_generated_encoder_writes_it() {
        for input in [0, 1, 100, 200, 20_000] {
            let spec = pb::TaskSpec {
                name: "x".repeat(input),
                ..pb::TaskSpec::default()
            };
            let request = pb::SubmitRequest {
                tasks: vec![spec.clone(), spec.clone()],
            };
            let mut ours = Vec::new();
            put_message(1, &spec.encode_to_vec(), &mut ours);
            assert_eq!(ours.len(), message_len(1, spec.encoded_len()));
            put_message(1, &spec.encode_to_vec(), &mut ours);
            assert_eq!(ours, request.encode_to_vec(), "a name of {input} bytes");
        }
    }
}
