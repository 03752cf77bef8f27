"""Join tokens and joining: how a worker trades a token an admin made
(``weft token create --role node``) for its identity.

A join token is ``weftjoin_`` + base64url (no padding) of
``"1\\n<address>\\n<ca pin>\\n<id>_<secret>"`` (``weft_proto::join`` in
Rust). Joining (``proto/README.md``, "Joining"): read the coordinator's
certificate chain without trusting it, keep the certificate whose SHA-256
is the pin, dial again trusting only that one (so the name, dates and
signature are checked as usual), make a key and a certificate request,
call ``NodeService.Join``, and keep what it answers in the state dir.

Blocking code (a socket, a unary call): the worker runs it on a thread.
The state dir is ``identity.py``'s.
"""

from __future__ import annotations

import base64
import binascii
import re
import secrets
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import grpc

from .. import errors
from .._channel import _OPTIONS, _pem_certificates, _pin_digest, ca_pin, fetch_pinned_ca, parse_address
from .._proto import node_pb2, node_pb2_grpc
from .identity import Identity, check_chain, check_name, check_state_dir, join_key_and_csr, save

#: The prefix of every join token.
JOIN_PREFIX = "weftjoin_"
_VERSION = "1"
_CREDENTIAL = re.compile(r"[0-9A-Fa-f]{16}_")
#: How long the Join call may take.
JOIN_TIMEOUT = 30.0


class JoinTokenError(ValueError):
    """The text is not a usable join token; the message says what to do."""


@dataclass(frozen=True)
class JoinToken:
    """A parsed join token. ``repr`` shows no secret."""

    address: str
    ca_pin: str
    credential: str

    def __repr__(self) -> str:
        return f"JoinToken(address={self.address!r}, ca_pin={self.ca_pin!r}, id={self.id!r})"

    @property
    def id(self) -> str:
        """The token's public id (before the credential's first ``_``)."""
        return self.credential.partition("_")[0]

    def encode(self) -> str:
        body = f"{_VERSION}\n{self.address}\n{self.ca_pin}\n{self.credential}"
        return JOIN_PREFIX + base64.urlsafe_b64encode(body.encode()).decode().rstrip("=")

    @staticmethod
    def parse(text: str) -> "JoinToken":
        """Reads a join token (blanks around it ignored); JoinTokenError if
        it is not one (a client token, say) or is damaged."""
        text = (text or "").strip()
        if not text.startswith(JOIN_PREFIX):
            raise JoinTokenError(f"not a join token (it must start with '{JOIN_PREFIX}'); an admin makes one "
                                 "with `weft token create --role node`")

        def damaged(why: str) -> JoinTokenError:
            return JoinTokenError(f"the join token is damaged ({why}); copy it again whole, or make a new one "
                                  "with `weft token create --role node`")

        encoded = text[len(JOIN_PREFIX):].rstrip("=")
        if not re.fullmatch(r"[A-Za-z0-9_-]*", encoded):
            raise damaged("not base64url")
        try:
            raw = base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4))
        except (binascii.Error, ValueError):
            raise damaged("not base64url") from None
        try:
            body = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise damaged("not UTF-8") from None
        lines = body.split("\n")
        if lines[0] != _VERSION:
            raise JoinTokenError(f"the join token is damaged (format version '{lines[0][:16]}', this worker reads "
                                 f"version {_VERSION}); copy it again whole, or make a new one with "
                                 "`weft token create --role node`")
        if len(lines) != 4:
            raise damaged("expected an address, a CA pin and a credential")
        _, address, pin, credential = lines
        if not address.strip():
            raise damaged("no address")
        try:
            _pin_digest(pin)
        except ValueError:
            raise damaged("bad CA pin") from None
        if not _CREDENTIAL.match(credential) or len(credential) < 17 + 32:
            raise damaged("bad credential")
        return JoinToken(address.strip(), pin.strip(), credential)


def new_credential() -> str:
    """A fresh ``<id>_<secret>`` in the coordinator's shape (for tests and fakes)."""
    return secrets.token_hex(8) + "_" + secrets.token_urlsafe(32)


def join(token: JoinToken, name: str, state_dir: str, addresses: Optional[Sequence[str]] = None) -> Identity:
    """Joins the cluster the token names as ``name`` and saves the identity
    in ``state_dir``.

    ``addresses`` are the coordinators to join at, tried in order until one
    answers (the worker's own list, as ``weft-node --coordinator`` gives:
    after a failover the token's address may be a standby that does not
    listen); default: the token's address. The identity keeps them all.

    Raises :class:`weft._channel.PinMismatch` when the coordinator is not
    the one the pin names (nothing is sent to it), ValueError for a token
    or address that is plaintext, ``identity.StateDirUnusable`` (a
    ValueError) when ``state_dir`` exists and is not this user's alone
    (before anything is sent), OSError when none can be reached, and
    the coordinator's refusal as a typed :class:`weft.WeftError`
    (``Unauthenticated``: the token is unknown, expired, used up or
    revoked; ``AlreadyExists``: another node holds the name;
    ``FailedPrecondition``: the coordinator does not authenticate nodes).
    """
    check_name(name)
    check_state_dir(state_dir)  # a dir that cannot hold the identity fails before the token is spent
    candidates = list(addresses) if addresses else [token.address]
    targets = []
    for address in candidates:
        scheme, host, port = parse_address(address)
        if scheme != "https":
            raise ValueError(f"{address} is a plaintext address: joining needs TLS")
        targets.append(f"{host}:{port}")
    unreachable: Optional[OSError] = None
    for target in targets:
        try:
            ca_pem = fetch_pinned_ca(target, token.ca_pin)
        except OSError as e:  # refused (a standby), down: the next one
            unreachable = e
            continue
        # The key is saved as node.join.key before it is sent (once the
        # pin matched), node.join saying for which token and name: a join
        # asked again with them (an answer lost to a timeout or a crash)
        # asks with the same key and gets its node id back
        # (``identity.saved_join_key``). An identity in the state dir is
        # replaced only by the answer: a refused join leaves it as it was.
        key = join_key_and_csr(state_dir, token.id, name)
        return _join_at(target, ca_pem, token, name, state_dir, ",".join(candidates), key)
    assert unreachable is not None
    raise unreachable


def _join_at(target: str, ca_pem: bytes, token: JoinToken, name: str, state_dir: str, keep: str,
             key: Tuple[bytes, bytes]) -> Identity:
    """Sends ``Join`` to the coordinator at ``target``, whose CA
    ``ca_pem`` matched the token's pin, asking with ``key`` (the key's PEM
    and a request signed with it), and saves the identity with the
    addresses ``keep``."""
    key_pem, csr_der = key
    channel = grpc.secure_channel(target, grpc.ssl_channel_credentials(root_certificates=ca_pem), options=_OPTIONS)
    try:
        stub = node_pb2_grpc.NodeServiceStub(channel)
        try:
            answer = stub.Join(node_pb2.JoinRequest(token=token.credential, name=name, csr_der=csr_der),
                               timeout=JOIN_TIMEOUT)
        except grpc.RpcError as e:
            raise errors.from_rpc_error(e) from None
    finally:
        channel.close()
    chain_pem = answer.certificate_chain_pem.encode()
    answered_ca = answer.ca_pem.encode()
    check_chain(chain_pem, key_pem, answer.node_id)
    ders = _pem_certificates(answered_ca)
    if not ders or ca_pin(ders[0]) != "sha256:" + _pin_digest(token.ca_pin):
        raise ValueError("the coordinator answered Join with a CA that is not the one the token's pin names")
    identity = Identity(answer.node_id, name, keep, key_pem, chain_pem, answered_ca)
    save(state_dir, identity)
    return identity
