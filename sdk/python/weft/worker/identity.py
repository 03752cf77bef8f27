"""A joined worker's identity: its private key, its certificate (issued by
``NodeService.Join``), the cluster CA and ``node.conf``, kept in a state
dir; the key and certificate requests it makes; when it renews.

The state dir has ``weft-node``'s layout (``--state-dir``), so either kind
of worker reads the other's: the dir is 0700, every file 0600 and written
atomically (a temp file, then a rename). A missing dir is made 0700; an
existing one is never changed: it must belong to this user and give group
and others nothing, else saving to it or loading from it is refused.

- ``node.key``: the private key, PKCS#8 PEM (ECDSA P-256); it never leaves
  the machine;
- ``node.pem``: the certificate chain, PEM, the node's certificate first;
- ``ca.pem``: the cluster CA, PEM (the trust anchor for the coordinator);
- ``node.conf``: lines ``node_id=...``, ``name=...``, ``coordinator=...``
  (the address from the join token);
- ``node.join.key``: the key a join asks with, PKCS#8 PEM, while the join is
  under way (saved before it is sent, removed once its answer is saved);
- ``node.join``: what that key was saved for, lines ``token=...`` (the join
  token's id) and ``name=...``; written after the key, removed with it.

A join saves its key as ``node.join.key`` before it asks, and a join done
again with the same token and name asks with the key it finds there (the
coordinator answers the same join again with the same node id for a while,
so an answer lost to a crash does not lock the worker out). A join with
another token or name, or a key without a ``node.join`` naming both, gets a
new key. That key is always a new one, never the key
of an identity (an expired or revoked identity's key may have been
exposed), and an identity in the dir is left as it is until an answer
arrives: a join refused, or never answered, over an identity that only
looked expired (the clock ahead) leaves the worker its identity. The answer
is saved whole: ``node.key.new``, ``node.pem.new`` and ``ca.pem.new``
first, then ``node.conf`` (the commit: the node id it names says which
certificate is the identity's), then the renames, then ``node.join.key``
removed. :func:`load` finishes a save cut short after its ``node.conf``,
and drops the ``.new`` files of one cut short before (the old identity
stays, and the join key with it). As ``weft-node`` does.

A renewal replaces the key and the chain as a pair: ``node.key.new`` and
``node.pem.new`` are written first, then renamed over ``node.key``, then
``node.pem``. :func:`load` completes a renewal a crash cut short: it takes
the newest chain whose key is at hand naming the node of ``node.conf``
(``node.pem.new``, else ``node.pem``; with ``node.key.new``, else
``node.key``), finishes the renames and removes
``.new`` files left over.

Plain code and files: no sockets, no event loop. Joining is ``join.py``'s,
sending the renewal over the session ``session.py``'s.
"""

from __future__ import annotations

import datetime
import os
import re
import stat
import tempfile
from dataclasses import dataclass, replace
from typing import Optional, Tuple

#: ``weft-node``'s default ``--state-dir`` (relative to the working directory).
DEFAULT_STATE_DIR = "weft-node-state"
KEY_FILE = "node.key"
CHAIN_FILE = "node.pem"
CA_FILE = "ca.pem"
CONF_FILE = "node.conf"
#: The key a join under way asks with.
JOIN_KEY_FILE = "node.join.key"
#: What that key was saved for: ``token=`` (the join token's id) and ``name=`` lines.
JOIN_FILE = "node.join"
#: Appended to ``node.key``, ``node.pem`` and ``ca.pem`` for a renewed pair or a join's answer not yet in place.
PENDING_SUFFIX = ".new"

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


def csr_for(key_pem: bytes, name: str) -> bytes:
    """A PKCS#10 request (DER) signed with ``key_pem`` (PEM), as
    :func:`new_key_and_csr` makes one."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.x509.oid import NameOID

    key = serialization.load_pem_private_key(key_pem, password=None)
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.DER)


def _join_record(token_id: str, name: str) -> bytes:
    """What ``node.join`` holds for a join with the token ``token_id`` as ``name``."""
    return f"token={token_id}\nname={name}\n".encode()


def saved_join_key(state_dir: str, token_id: str, name: str) -> Optional[bytes]:
    """The key a join under way with the token ``token_id`` as ``name`` asks
    with (``node.join.key``, saved by :func:`save_join_key`), whether or not
    an identity is there: a join asked again (its answer lost, or refused
    for now) asks with the same key. None: there is none, it was saved for
    another token or name (or ``node.join`` does not say), or it is the
    identity's own key now (a save cut short before it removed the file:
    removed now; the key of an identity is never asked with again). A key
    others may read, or one that does not parse, is a ValueError."""
    from cryptography.hazmat.primitives import serialization

    path = os.path.join(state_dir, JOIN_KEY_FILE)
    key_pem = _read_if_there(path)
    if key_pem is None:
        return None
    check_state_dir(state_dir)
    _check_key_mode(path)
    try:
        serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError):
        raise ValueError(f"{path} is damaged: not a private key; remove it to join with a new one") from None
    if os.path.exists(os.path.join(state_dir, CONF_FILE)):
        in_place = _read_if_there(os.path.join(state_dir, KEY_FILE))
        if in_place is not None and _same_key(in_place, key_pem):
            _remove_join_key(state_dir)
            return None
    if _read_if_there(os.path.join(state_dir, JOIN_FILE)) != _join_record(token_id, name):
        return None
    return key_pem


def save_join_key(state_dir: str, key_pem: bytes, token_id: str, name: str) -> None:
    """Saves the key a join with the token ``token_id`` as ``name`` is about
    to ask with as ``node.join.key``, then what it is for as ``node.join``
    (durably), before the join is sent: see :func:`saved_join_key`. The key
    first: a crash between the two leaves a new key, never sent, under an
    older ``node.join``, never a key that was sent under the new one. An
    identity there is not touched: only the answer replaces it
    (:func:`save`)."""
    _ensure_dir(state_dir)
    _write_atomic(state_dir, JOIN_KEY_FILE, key_pem)
    _write_atomic(state_dir, JOIN_FILE, _join_record(token_id, name))
    _fsync_dir(state_dir)


def _remove_join_key(state_dir: str) -> None:
    """Removes ``node.join.key``, then ``node.join`` (durably), if there."""
    removed = False
    for name in (JOIN_KEY_FILE, JOIN_FILE):
        try:
            os.unlink(os.path.join(state_dir, name))
            removed = True
        except FileNotFoundError:
            pass
    if removed:
        _fsync_dir(state_dir)


def _same_key(a: bytes, b: bytes) -> bool:
    from cryptography.hazmat.primitives import serialization

    spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    try:
        return (serialization.load_pem_private_key(a, password=None).public_key().public_bytes(*spki)
                == serialization.load_pem_private_key(b, password=None).public_key().public_bytes(*spki))
    except (ValueError, TypeError):
        return False


def join_key_and_csr(state_dir: str, token_id: str, name: str) -> Tuple[bytes, bytes]:
    """The key to join with the token ``token_id`` as ``name`` and a request
    signed with it: the one a join with the same token and name that did
    not finish left (:func:`saved_join_key`), else a new one, saved with
    what it is for before it is sent (:func:`save_join_key`)."""
    key_pem = saved_join_key(state_dir, token_id, name)
    if key_pem is None:
        key_pem, csr_der = new_key_and_csr(name)
        save_join_key(state_dir, key_pem, token_id, name)
        return key_pem, csr_der
    return key_pem, csr_for(key_pem, name)


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


def _fsync_dir(directory: str) -> None:
    """Makes renames in ``directory`` durable; a failure only loses
    durability (used where nothing later relies on them being on disk)."""
    try:
        _fsync_dir_or_fail(directory)
    except OSError:
        pass


def _fsync_dir_or_fail(directory: str) -> None:
    """Makes renames in ``directory`` durable, or raises OSError: used where
    a later step relies on them being on disk (a save's ``.new`` files
    before its ``node.conf``, ``node.conf`` before the renames over the old
    identity)."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class StateDirUnusable(PermissionError, ValueError):
    """An existing state dir that may not hold an identity: not a directory,
    or not this user's alone. A PermissionError (an OSError, as a failed
    save is) and a ValueError (as a damaged state dir is): a join or a start
    refuses it for good, a renewal logs it and tries again."""


def dir_problem(state_dir: str) -> Optional[str]:
    """Why the existing dir ``state_dir`` may not hold an identity (it is
    not this user's, or group or others have access to it), with the fix;
    None when it is private."""
    st = os.stat(state_dir)
    owner, mode, user = st.st_uid, stat.S_IMODE(st.st_mode), os.geteuid()
    why = []
    if owner != user:
        why.append(f"it belongs to uid {owner}, not to this user (uid {user})")
    if mode & 0o077:
        why.append("group or others have access to it")
    if not why:
        return None
    other = "choose another state dir (state_dir= / WEFT_NODE_STATE_DIR / --state-dir)"
    fix = (f"chmod 700 {state_dir}, or {other}" if owner == user
           else f"{other}, or give it to this user (chown) and chmod 700 {state_dir}")
    return (f"the state dir {state_dir} (owner uid {owner}, mode {mode:o}) is not private to this node: "
            f"{' and '.join(why)}; {fix} (an existing dir is not changed)")


def check_state_dir(state_dir: str) -> None:
    """:class:`StateDirUnusable`, naming the fix, when ``state_dir`` exists
    and is not a private directory (see :func:`dir_problem`); nothing when
    it is one, or is missing. A join checks this before it spends its token."""
    if not os.path.lexists(state_dir):
        return
    if not os.path.isdir(state_dir):
        raise StateDirUnusable(f"the state dir {state_dir} is not a directory: choose another state dir "
                               "(state_dir= / WEFT_NODE_STATE_DIR / --state-dir)")
    problem = dir_problem(state_dir)
    if problem:
        raise StateDirUnusable(problem)


def _ensure_dir(state_dir: str) -> None:
    """Makes ``state_dir`` 0700 if missing (parents as usual); an existing
    one is left as it is and must be private (:class:`StateDirUnusable`)."""
    os.makedirs(os.path.dirname(os.path.abspath(state_dir)), exist_ok=True)
    try:
        os.mkdir(state_dir, 0o700)
    except FileExistsError:
        check_state_dir(state_dir)
    else:
        os.chmod(state_dir, 0o700)  # ours: whatever the umask took away


def _write_pending(state_dir: str, key_pem: bytes, chain_pem: bytes) -> None:
    """Writes ``node.key.new`` and ``node.pem.new``, each whole, and makes
    their names durable: the first half of :func:`save_renewed`."""
    _write_atomic(state_dir, KEY_FILE + PENDING_SUFFIX, key_pem)
    _write_atomic(state_dir, CHAIN_FILE + PENDING_SUFFIX, chain_pem)
    _fsync_dir_or_fail(state_dir)


def _save_pair(state_dir: str, key_pem: bytes, chain_pem: bytes) -> None:
    _write_pending(state_dir, key_pem, chain_pem)
    for name in (KEY_FILE, CHAIN_FILE):
        os.replace(os.path.join(state_dir, name + PENDING_SUFFIX), os.path.join(state_dir, name))
    _fsync_dir(state_dir)


def save(state_dir: str, identity: Identity) -> None:
    """Writes the whole identity (after a join), crash-safely over one there:
    the key, the chain and the CA as ``.new`` files; ``node.conf``, the
    commit; the renames; then ``node.join.key`` removed. A crash leaves
    either the old identity (and the join key) or the new one, which
    :func:`load` completes. The dir is made 0700 if missing; an existing
    one must be private (:class:`StateDirUnusable`)."""
    _ensure_dir(state_dir)
    _stage(state_dir, identity)
    _write_conf(state_dir, identity)
    for name in (KEY_FILE, CHAIN_FILE, CA_FILE):
        os.replace(os.path.join(state_dir, name + PENDING_SUFFIX), os.path.join(state_dir, name))
    _fsync_dir(state_dir)
    _remove_join_key(state_dir)


def _stage(state_dir: str, identity: Identity) -> None:
    """The first step of :func:`save`: ``ca.pem.new``, ``node.key.new`` and
    ``node.pem.new``, each whole, their names durable."""
    _write_atomic(state_dir, CA_FILE + PENDING_SUFFIX, identity.ca_pem)
    _write_pending(state_dir, identity.key_pem, identity.chain_pem)


def _write_conf(state_dir: str, identity: Identity) -> None:
    """The commit of :func:`save`: ``node.conf``, made durable."""
    conf = f"node_id={identity.node_id}\nname={identity.name}\ncoordinator={identity.coordinator}\n"
    _write_atomic(state_dir, CONF_FILE, conf.encode())
    _fsync_dir_or_fail(state_dir)


def save_renewed(state_dir: str, identity: Identity) -> None:
    """Replaces the key and the chain as a pair: both written as ``.new``
    files, then renamed into place, the key first. A crash at any point
    leaves a pair :func:`load` completes."""
    _ensure_dir(state_dir)
    _save_pair(state_dir, identity.key_pem, identity.chain_pem)


def _check_key_mode(path: str) -> None:
    try:
        key_mode = stat.S_IMODE(os.stat(path).st_mode)
    except FileNotFoundError:
        return
    if key_mode & 0o077:
        raise ValueError(f"{path} may be read by others (mode {key_mode:o}): the node's private key must "
                         f"be private: chmod 600 {path}")


def _read_if_there(path: str) -> Optional[bytes]:
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        return None


def _matches(chain_pem: bytes, key_pem: bytes, node_id: str) -> bool:
    try:
        check_chain(chain_pem, key_pem, node_id)
    except Exception:  # a key or chain that does not load matches nothing
        return False
    return True


def _settle_pair(state_dir: str, node_id: str, key_pem: Optional[bytes],
                 chain_pem: Optional[bytes]) -> Tuple[bytes, bytes]:
    """The key and chain that belong together, left in place as ``node.key``
    and ``node.pem``: the newest chain naming ``node_id`` (``node.pem.new``,
    else ``node.pem``) whose key is there (``node.key.new``, else
    ``node.key``); a renewal or a join's save cut short is finished and
    ``.new`` files left over are removed (those of a join's answer whose
    ``node.conf`` was not written name another node). Without a ``.new``
    file, or when nothing matches: the pair in place, as it is (ValueError
    when one of it is missing)."""
    key_path, chain_path = os.path.join(state_dir, KEY_FILE), os.path.join(state_dir, CHAIN_FILE)
    key_new, chain_new = key_path + PENDING_SUFFIX, chain_path + PENDING_SUFFIX
    new_key, new_chain = _read_if_there(key_new), _read_if_there(chain_new)
    chosen = None
    if new_key is not None or new_chain is not None:
        if new_key is not None:
            _check_key_mode(key_new)
        keys = [(new, k) for new, k in ((True, new_key), (False, key_pem)) if k is not None]
        chains = [(new, c) for new, c in ((True, new_chain), (False, chain_pem)) if c is not None]
        chosen = next(((kn, k, cn, c) for cn, c in chains for kn, k in keys if _matches(c, k, node_id)), None)
    if chosen is None:
        # load names what is wrong with the pair in place
        for name, data in ((KEY_FILE, key_pem), (CHAIN_FILE, chain_pem)):
            if data is None:
                raise ValueError(f"the state dir {state_dir} has node.conf but no {name}: remove it and join "
                                 "again with a new token")
        return key_pem, chain_pem
    key_is_new, key, chain_is_new, chain = chosen
    for new, there, src, dst in ((key_is_new, new_key is not None, key_new, key_path),
                                 (chain_is_new, new_chain is not None, chain_new, chain_path)):
        if new:
            os.replace(src, dst)
        elif there:
            os.unlink(src)
    _fsync_dir(state_dir)
    return key, chain


def _issued_by(chain_pem: bytes, ca_pem: bytes) -> bool:
    """Whether the first certificate of ``chain_pem`` is signed by ``ca_pem``'s."""
    from cryptography import x509

    try:
        leaf = x509.load_pem_x509_certificate(chain_pem)
        leaf.verify_directly_issued_by(x509.load_pem_x509_certificate(ca_pem))
    except Exception:  # does not parse, or not its issuer
        return False
    return True


def _settle_ca(state_dir: str, chain_pem: bytes, ca_pem: Optional[bytes]) -> bytes:
    """The CA that goes with ``chain_pem``, left in place as ``ca.pem``:
    ``ca.pem.new`` when it issued the chain (a join's save cut short after
    its ``node.conf``: renamed into place), else ``ca.pem`` (a ``ca.pem.new``
    left by a save cut short before is removed)."""
    path = os.path.join(state_dir, CA_FILE)
    new = path + PENDING_SUFFIX
    new_ca = _read_if_there(new)
    if new_ca is not None:
        if _issued_by(chain_pem, new_ca):
            os.replace(new, path)
            _fsync_dir(state_dir)
            return new_ca
        os.unlink(new)
        _fsync_dir(state_dir)
    if ca_pem is None:
        raise ValueError(f"the state dir {state_dir} has node.conf but no {CA_FILE}: remove it and join again "
                         "with a new token")
    return ca_pem


def load(state_dir: str) -> Optional[Identity]:
    """The identity kept in ``state_dir``; None when it holds none (no
    ``node.conf``). ValueError, naming the dir, when it is damaged, or
    :class:`StateDirUnusable` (a ValueError) when group or others have
    access to it or another user owns it."""
    conf_path = os.path.join(state_dir, CONF_FILE)
    try:
        with open(conf_path, "r", encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        return None
    problem = dir_problem(state_dir)
    if problem:
        raise StateDirUnusable(problem)
    values = {}
    for line in text.splitlines():
        key, sep, value = line.strip().partition("=")
        if sep:
            values[key.strip()] = value.strip()
    missing = [k for k in ("node_id", "name", "coordinator") if not values.get(k)]
    if missing:
        raise ValueError(f"{conf_path} lacks {', '.join(missing)}: the state dir is damaged; "
                         "remove it and join again with a new token")
    _check_key_mode(os.path.join(state_dir, KEY_FILE))
    # A first join's save cut short after its node.conf has only the .new files.
    files = {name: _read_if_there(os.path.join(state_dir, name)) for name in (KEY_FILE, CHAIN_FILE, CA_FILE)}
    key_pem, chain_pem = _settle_pair(state_dir, values["node_id"], files[KEY_FILE], files[CHAIN_FILE])
    ca_pem = _settle_ca(state_dir, chain_pem, files[CA_FILE])
    join_key = _read_if_there(os.path.join(state_dir, JOIN_KEY_FILE))
    if join_key is not None and _same_key(join_key, key_pem):
        _remove_join_key(state_dir)  # left by a save cut short after its node.conf
    identity = Identity(values["node_id"], values["name"], values["coordinator"], key_pem, chain_pem, ca_pem)
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
