"""A joined worker's identity: its private key, its certificate (issued by
``NodeService.Join``), the cluster CA and ``node.conf``, kept in a state
dir; the key and certificate requests it makes; when it renews.

The state dir has ``weft-node``'s layout (``--state-dir``), so either kind
of worker reads the other's: the dir is 0700, every file 0600 and written
atomically (a temp file, then a rename):

- ``node.key``: the private key, PKCS#8 PEM (ECDSA P-256); it never leaves
  the machine;
- ``node.pem``: the certificate chain, PEM, the node's certificate first;
- ``ca.pem``: the cluster CA, PEM (the trust anchor for the coordinator);
- ``node.conf``: lines ``node_id=...``, ``name=...``, ``coordinator=...``
  (the address from the join token).

Plain code and files: no sockets, no event loop. Joining is ``join.py``'s,
sending the renewal over the session ``session.py``'s.
"""

from __future__ import annotations

import datetime
import os
import re
import tempfile
from dataclasses import dataclass, replace
from typing import Optional, Tuple

#: ``weft-node``'s default ``--state-dir`` (relative to the working directory).
DEFAULT_STATE_DIR = "weft-node-state"
KEY_FILE = "node.key"
CHAIN_FILE = "node.pem"
CA_FILE = "ca.pem"
CONF_FILE = "node.conf"

#: Node names: 1 to 128 bytes of letters, digits, '.', '-', '_'.
NAME = re.compile(r"[A-Za-z0-9._-]{1,128}\Z")
#: A renewal is asked for at this fraction of the certificate's lifetime.
RENEW_AT = 2 / 3
#: The shortest wait before asking again after a refused renewal.
RETRY_MIN = 1.0


def check_name(name: str) -> str:
    """``name`` if it is a valid node name, else ValueError saying the rule."""
    if not NAME.match(name or ""):
        raise ValueError(f"invalid node name {name!r}: 1 to 128 letters, digits, '.', '-' or '_'")
    return name


def state_dir_of(state_dir: Optional[str]) -> str:
    """``state_dir``, else ``$WEFT_NODE_STATE_DIR``, else :data:`DEFAULT_STATE_DIR`."""
    return state_dir or os.environ.get("WEFT_NODE_STATE_DIR") or DEFAULT_STATE_DIR


@dataclass(frozen=True)
class Identity:
    """Who this worker is to the coordinator. ``repr`` shows no key."""

    node_id: str
    name: str
    coordinator: str
    key_pem: bytes
    chain_pem: bytes
    ca_pem: bytes

    def __repr__(self) -> str:
        return f"Identity(node_id={self.node_id!r}, name={self.name!r}, coordinator={self.coordinator!r})"

    @property
    def leaf(self):
        """The node's certificate (``cryptography.x509.Certificate``)."""
        from cryptography import x509

        return x509.load_pem_x509_certificate(self.chain_pem)

    def validity(self) -> Tuple[float, float]:
        """``(not_before, not_after)`` of the node's certificate, as Unix times."""
        leaf = self.leaf
        return leaf.not_valid_before_utc.timestamp(), leaf.not_valid_after_utc.timestamp()

    def expired(self, now: float) -> bool:
        return now >= self.validity()[1]

    def ca_pin(self) -> str:
        """The pin of the cluster CA this identity trusts (``sha256:HEX``)."""
        from .._channel import _pem_certificates, ca_pin

        ders = _pem_certificates(self.ca_pem)
        return ca_pin(ders[0]) if ders else ""

    def renewed(self, key_pem: bytes, chain_pem: bytes) -> "Identity":
        return replace(self, key_pem=key_pem, chain_pem=chain_pem)

    def credentials(self):
        """gRPC channel credentials: trust the cluster CA, present the node's certificate."""
        import grpc

        return grpc.ssl_channel_credentials(root_certificates=self.ca_pem, private_key=self.key_pem,
                                            certificate_chain=self.chain_pem)


# -- keys and certificate requests --------------------------------------------


def new_key_and_csr(name: str) -> Tuple[bytes, bytes]:
    """A fresh ECDSA P-256 key (PKCS#8 PEM) and a PKCS#10 request (DER)
    signed with it. The subject says the node's name; the coordinator
    ignores it (the certificate names the node id)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return key_pem, csr.public_bytes(serialization.Encoding.DER)


def check_chain(chain_pem: bytes, key_pem: bytes, node_id: Optional[str] = None) -> None:
    """ValueError unless ``chain_pem``'s first certificate is for ``key_pem``
    (and names ``node_id`` as its common name, when given): what the
    coordinator answered must be usable before it replaces anything."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    from cryptography.x509.oid import NameOID

    try:
        leaf = x509.load_pem_x509_certificate(chain_pem)
    except ValueError:
        raise ValueError("the coordinator sent a certificate chain that does not parse") from None
    key = serialization.load_pem_private_key(key_pem, password=None)
    spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    if leaf.public_key().public_bytes(*spki) != key.public_key().public_bytes(*spki):
        raise ValueError("the coordinator sent a certificate for another key")
    if node_id is not None:
        names = [a.value for a in leaf.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
        if names != [node_id]:
            raise ValueError(f"the coordinator sent a certificate for {names}, not node {node_id}")


# -- the state dir ------------------------------------------------------------


def _write_atomic(directory: str, name: str, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=directory)
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, os.path.join(directory, name))
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def _ensure_dir(state_dir: str) -> None:
    os.makedirs(state_dir, mode=0o700, exist_ok=True)
    os.chmod(state_dir, 0o700)


def save(state_dir: str, identity: Identity) -> None:
    """Writes the whole identity; ``node.conf`` last, so a dir with a
    ``node.conf`` always holds a complete identity."""
    _ensure_dir(state_dir)
    _write_atomic(state_dir, KEY_FILE, identity.key_pem)
    _write_atomic(state_dir, CHAIN_FILE, identity.chain_pem)
    _write_atomic(state_dir, CA_FILE, identity.ca_pem)
    conf = f"node_id={identity.node_id}\nname={identity.name}\ncoordinator={identity.coordinator}\n"
    _write_atomic(state_dir, CONF_FILE, conf.encode())


def save_renewed(state_dir: str, identity: Identity) -> None:
    """Writes a renewed key and chain, each atomically. A crash between
    the two leaves a pair that does not match, which the next start
    refuses with a message (join again) rather than presenting it."""
    _ensure_dir(state_dir)
    _write_atomic(state_dir, CHAIN_FILE, identity.chain_pem)
    _write_atomic(state_dir, KEY_FILE, identity.key_pem)


def load(state_dir: str) -> Optional[Identity]:
    """The identity kept in ``state_dir``; None when it holds none (no
    ``node.conf``). ValueError, naming the dir, when it is damaged."""
    conf_path = os.path.join(state_dir, CONF_FILE)
    try:
        with open(conf_path, "r", encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        return None
    values = {}
    for line in text.splitlines():
        key, sep, value = line.strip().partition("=")
        if sep:
            values[key.strip()] = value.strip()
    missing = [k for k in ("node_id", "name", "coordinator") if not values.get(k)]
    if missing:
        raise ValueError(f"{conf_path} lacks {', '.join(missing)}: the state dir is damaged; "
                         "remove it and join again with a new token")
    key_path = os.path.join(state_dir, KEY_FILE)
    try:
        key_mode = os.stat(key_path).st_mode & 0o777
    except FileNotFoundError:
        key_mode = 0
    if key_mode & 0o077:
        raise ValueError(f"{key_path} may be read by others (mode {key_mode:o}): the node's private key must "
                         f"be private: chmod 600 {key_path}")
    files = {}
    for name in (KEY_FILE, CHAIN_FILE, CA_FILE):
        try:
            with open(os.path.join(state_dir, name), "rb") as f:
                files[name] = f.read()
        except FileNotFoundError:
            raise ValueError(f"the state dir {state_dir} has node.conf but no {name}: remove it and join "
                             "again with a new token") from None
    identity = Identity(values["node_id"], values["name"], values["coordinator"], files[KEY_FILE],
                        files[CHAIN_FILE], files[CA_FILE])
    try:
        check_chain(identity.chain_pem, identity.key_pem, identity.node_id)
    except ValueError as e:
        raise ValueError(f"the state dir {state_dir} holds an unusable identity ({e}): remove it and join "
                         "again with a new token") from None
    return identity


# -- renewal ------------------------------------------------------------------


def renew_delay(not_before: float, not_after: float, now: float) -> float:
    """Seconds from ``now`` until 2/3 of the certificate's lifetime (0 when past)."""
    return max(0.0, not_before + (not_after - not_before) * RENEW_AT - now)


def retry_delay(not_after: float, now: float) -> float:
    """After a refused (or unanswered) renewal: a tenth of the time the
    certificate has left, at least :data:`RETRY_MIN`."""
    return max(RETRY_MIN, (not_after - now) / 10)


def utc(ts: float) -> str:
    return datetime.datetime.fromtimestamp(ts, datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%SZ")
