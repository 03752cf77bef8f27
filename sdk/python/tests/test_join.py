"""A worker's join and identity without a worker running: join tokens, the
state dir (weft-node's layout and permissions), the CA pin check, the key
and certificate request, renewal timing, and how a Worker picks its
identity. The joins themselves run against the fake coordinator."""

from __future__ import annotations

import base64
import os
import socket
import stat

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

import weft
from weft._channel import PinMismatch, fetch_pinned_ca, root_certificates
from weft.testing import FakeCoordinator, new_ulid
from weft.worker import identity as ident
from weft.worker.join import JOIN_PREFIX, JoinToken, JoinTokenError, join, new_credential

PIN = "sha256:" + "ab" * 32
CREDENTIAL = "0123456789abcdef_" + "s" * 43
TOKEN_ID = "0123456789abcdef"


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture
def fake():
    coordinator = FakeCoordinator()
    yield coordinator
    coordinator.stop()


# -- tokens --------------------------------------------------------------------


def test_a_join_token_reads_back_what_was_written_and_its_repr_hides_the_secret():
    token = JoinToken("10.0.0.5:7070", PIN, CREDENTIAL)
    text = token.encode()
    assert text.startswith(JOIN_PREFIX) and "=" not in text
    # The format of weft_proto::join: base64url without padding of four lines.
    encoded = text[len(JOIN_PREFIX):]
    body = base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4))
    assert body == f"1\n10.0.0.5:7070\n{PIN}\n{CREDENTIAL}".encode()
    assert JoinToken.parse(f"  {text}\n") == token
    assert token.id == "0123456789abcdef"
    assert "sss" not in repr(token)


def test_a_client_token_is_refused_saying_how_to_get_a_join_token():
    with pytest.raises(JoinTokenError, match=r"not a join token.*weft token create --role node"):
        JoinToken.parse(CREDENTIAL.join(["weft_", ""]))


@pytest.mark.parametrize("text, why", [
    (JoinToken("10.0.0.5:7070", PIN, CREDENTIAL).encode()[:-40], "expected an address|bad credential|not UTF-8"),
    (JOIN_PREFIX + "!!!", "not base64url"),
    (JoinToken("10.0.0.5:7070", "sha256:xyz", CREDENTIAL).encode(), "bad CA pin"),
    (JoinToken("10.0.0.5:7070", PIN, "nope").encode(), "bad credential"),
    (JoinToken(" ", PIN, CREDENTIAL).encode(), "no address"),
    (JOIN_PREFIX + base64.urlsafe_b64encode(b"2\na\nb\nc").decode().rstrip("="), "format version '2'"),
])
def test_a_damaged_join_token_is_refused_saying_what_is_wrong(text, why):
    with pytest.raises(JoinTokenError, match=why) as err:
        JoinToken.parse(text)
    assert "damaged" in str(err.value) and "weft token create --role node" in str(err.value)


def test_a_worker_refuses_a_bad_token_when_built_not_later(tmp_path):
    with pytest.raises(ValueError, match="not a join token"):
        weft.Worker(join_token="weft_" + CREDENTIAL, state_dir=str(tmp_path))
    with pytest.raises(ValueError, match="plaintext"):
        weft.Worker("http://127.0.0.1:1", join_token=JoinToken("127.0.0.1:1", PIN, CREDENTIAL).encode(),
                    state_dir=str(tmp_path))
    with pytest.raises(ValueError, match="invalid node name"):
        weft.Worker(name="no spaces", join_token=JoinToken("127.0.0.1:1", PIN, CREDENTIAL).encode(),
                    state_dir=str(tmp_path))


def test_the_token_and_state_dir_come_from_the_environment(tmp_path, monkeypatch):
    monkeypatch.delenv("WEFT_COORDINATOR", raising=False)
    monkeypatch.setenv("WEFT_JOIN_TOKEN", JoinToken("10.1.2.3:7070", PIN, CREDENTIAL).encode())
    monkeypatch.setenv("WEFT_NODE_STATE_DIR", str(tmp_path / "from-env"))
    worker = weft.Worker(slots=1)
    assert worker.join_token.address == "10.1.2.3:7070"
    assert worker.coordinator == "10.1.2.3:7070", "the token names the coordinator"
    assert worker.state_dir == str(tmp_path / "from-env")
    monkeypatch.delenv("WEFT_NODE_STATE_DIR")
    assert weft.Worker(slots=1).state_dir == "weft-node-state", "weft-node's default"


# -- key and certificate request ----------------------------------------------------


def test_the_key_is_ecdsa_p256_pkcs8_and_the_request_is_signed_with_it():
    key_pem, csr_der = ident.new_key_and_csr("py-1")
    assert key_pem.startswith(b"-----BEGIN PRIVATE KEY-----"), "PKCS#8 PEM, as weft-node keeps it"
    key = serialization.load_pem_private_key(key_pem, password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey) and isinstance(key.curve, ec.SECP256R1)
    csr = x509.load_der_x509_csr(csr_der)
    assert csr.is_signature_valid
    spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    assert csr.public_key().public_bytes(*spki) == key.public_key().public_bytes(*spki)
    assert csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "py-1"
    # A new key every time (renewal sends a request signed with a new key).
    assert ident.new_key_and_csr("py-1")[0] != key_pem


# -- the pin check -------------------------------------------------------------------


def test_the_right_pin_yields_the_ca_from_the_chain_the_coordinator_sends(fake):
    target = f"127.0.0.1:{fake.port}"
    assert fetch_pinned_ca(target, fake.ca.pin).strip() == fake.ca.pem.strip()
    assert fetch_pinned_ca(target, fake.ca.pin.upper().replace("SHA256", "sha256")).strip() == fake.ca.pem.strip()
    # A client with the pin alone (any Python from 3.10) trusts that CA.
    assert root_certificates(target, None, fake.ca.pin).strip() == fake.ca.pem.strip()


def test_a_wrong_pin_is_refused_with_a_clear_message_and_nothing_is_sent(fake, tmp_path):
    target = f"127.0.0.1:{fake.port}"
    with pytest.raises(PinMismatch, match=r"is not the one the CA pin sha256:(ab){32} names"):
        fetch_pinned_ca(target, PIN)
    with pytest.raises(PinMismatch):
        join(JoinToken(target, PIN, new_credential()), "py-1", str(tmp_path / "state"))
    assert fake.join_requests == []
    assert not (tmp_path / "state").exists()


# -- joining and the state dir ---------------------------------------------------------


def test_join_keeps_key_chain_ca_and_node_conf_with_weft_nodes_layout_and_permissions(fake, tmp_path):
    state = tmp_path / "state"
    token = JoinToken.parse(fake.join_token())
    joined = join(token, "py-1", str(state))
    assert fake.joins[0].name == "py-1" and joined.node_id == fake.joins[0].node_id
    assert mode(state) == 0o700
    assert sorted(os.listdir(state)) == ["ca.pem", "node.conf", "node.key", "node.pem"], "no temp files left"
    for name in os.listdir(state):
        assert mode(state / name) == 0o600, name
    assert (state / "node.conf").read_text() == (
        f"node_id={joined.node_id}\nname=py-1\ncoordinator={token.address}\n")
    assert (state / "ca.pem").read_bytes() == fake.ca.pem
    leaf = x509.load_pem_x509_certificate((state / "node.pem").read_bytes())
    assert leaf.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == joined.node_id
    assert (state / "node.key").read_bytes() == joined.key_pem
    # It reads back whole.
    assert ident.load(str(state)) == joined


def test_join_tries_the_workers_coordinators_in_order_and_keeps_them_all(fake, tmp_path):
    # The first refuses connections, as a standby does; the second is the
    # coordinator the token was made on.
    with socket.socket() as gone:
        gone.bind(("127.0.0.1", 0))
        refused = f"https://127.0.0.1:{gone.getsockname()[1]}"
    token = JoinToken.parse(fake.join_token())
    state = tmp_path / "state"
    joined = join(token, "py-1", str(state), [refused, token.address])
    assert fake.joins[0].name == "py-1" and joined.node_id == fake.joins[0].node_id
    assert (state / "node.conf").read_text() == (
        f"node_id={joined.node_id}\nname=py-1\ncoordinator={refused},{token.address}\n")
    # None answering: the last connection error, and the token unspent.
    with pytest.raises(OSError):
        join(JoinToken.parse(fake.join_token()), "py-2", str(tmp_path / "other"), [refused])
    assert len(fake.joins) == 1


def test_an_existing_state_dir_others_may_use_is_left_alone_and_refused_before_the_token_is_spent(fake, tmp_path):
    state = tmp_path / "shared"
    state.mkdir()
    os.chmod(state, 0o755)
    with pytest.raises(ident.StateDirUnusable) as err:
        join(JoinToken.parse(fake.join_token()), "py-1", str(state))
    assert isinstance(err.value, ValueError), "a worker's join treats it as final"
    message = str(err.value)
    for part in (f"the state dir {state}", f"owner uid {os.geteuid()}", "mode 755", "group or others",
                 f"chmod 700 {state}, or choose another state dir"):
        assert part in message
    assert fake.join_requests == [], "the token is not spent"
    assert mode(state) == 0o755 and os.listdir(state) == [], "the dir is not changed"
    with pytest.raises(OSError, match="chmod 700"):  # a renewal logs it and asks again
        ident.save_renewed(str(state), ident.Identity("n", "py-1", "c:1", b"k", b"c", b"ca"))
    assert os.listdir(state) == []
    # Once private, it is used as it is.
    os.chmod(state, 0o700)
    joined = join(JoinToken.parse(fake.join_token()), "py-1", str(state))
    assert mode(state) == 0o700 and ident.load(str(state)) == joined


def test_a_missing_state_dir_is_made_private_with_its_parents(fake, tmp_path):
    state = tmp_path / "a" / "b" / "state"
    join(JoinToken.parse(fake.join_token()), "py-1", str(state))
    assert mode(state) == 0o700
    assert (tmp_path / "a" / "b").is_dir()


def test_an_identity_in_a_dir_others_may_use_or_another_user_owns_is_refused(fake, tmp_path, monkeypatch):
    state = tmp_path / "state"
    join(JoinToken.parse(fake.join_token()), "py-1", str(state))
    os.chmod(state, 0o750)
    with pytest.raises(ValueError, match=rf"state dir {state} \(owner uid \d+, mode 750\).*chmod 700 {state}"):
        ident.load(str(state))
    with pytest.raises(ValueError, match="group or others"):
        weft.Worker(slots=1, state_dir=str(state))
    assert mode(state) == 0o750, "not changed"
    os.chmod(state, 0o700)
    assert ident.load(str(state)) is not None
    monkeypatch.setattr(os, "geteuid", lambda: os.stat(state).st_uid + 1)
    with pytest.raises(ValueError, match=r"belongs to uid \d+, not to this user.*choose another state dir"):
        ident.load(str(state))


def test_an_empty_state_dir_holds_no_identity_and_a_damaged_one_says_what_to_do(fake, tmp_path):
    assert ident.load(str(tmp_path / "none")) is None
    state = tmp_path / "state"
    join(JoinToken.parse(fake.join_token()), "py-1", str(state))
    (state / "node.key").write_bytes(ident.new_key_and_csr("x")[0])  # a key that is not the certificate's
    with pytest.raises(ValueError, match=r"state dir .* unusable identity .*join again"):
        ident.load(str(state))
    os.chmod(state / "node.key", 0o644)
    with pytest.raises(ValueError, match=r"may be read by others \(mode 644\).*chmod 600"):
        ident.load(str(state))
    os.chmod(state / "node.key", 0o600)
    (state / "node.pem").unlink()
    with pytest.raises(ValueError, match="no node.pem"):
        ident.load(str(state))
    (state / "node.conf").write_text("name=x\n")
    with pytest.raises(ValueError, match="lacks node_id, coordinator"):
        ident.load(str(state))


def test_a_worker_with_an_identity_takes_its_name_and_address_and_needs_no_token(fake, tmp_path, monkeypatch):
    monkeypatch.delenv("WEFT_COORDINATOR", raising=False)
    monkeypatch.delenv("WEFT_JOIN_TOKEN", raising=False)
    state = str(tmp_path / "state")
    joined = join(JoinToken.parse(fake.join_token()), "py-1", state)
    worker = weft.Worker(slots=1, state_dir=state)
    assert (worker.name, worker.node_id, worker.coordinator) == ("py-1", joined.node_id, joined.coordinator)
    with pytest.raises(ValueError, match="holds node 'py-1', not 'py-2'"):
        weft.Worker(slots=1, name="py-2", state_dir=state)
    # A plaintext coordinator (--insecure) authenticates no one: the identity is left aside.
    assert weft.Worker("http://127.0.0.1:1", slots=1, state_dir=state).identity is None
    # A token given as well is not needed, and ignored (as by weft-node).
    worker = weft.Worker(slots=1, state_dir=state, join_token=fake.join_token())
    assert worker.identity == joined and worker.coordinator == joined.coordinator


def test_a_renewed_identity_is_saved_in_place(fake, tmp_path):
    state = str(tmp_path / "state")
    joined = join(JoinToken.parse(fake.join_token()), "py-1", state)
    key_pem, _ = ident.new_key_and_csr("py-1")
    key = serialization.load_pem_private_key(key_pem, password=None)
    renewed_cert = fake.ca.node(key.public_key(), joined.node_id, 60)
    chain = renewed_cert.public_bytes(serialization.Encoding.PEM) + fake.ca.pem
    ident.check_chain(chain, key_pem, joined.node_id)
    with pytest.raises(ValueError, match="another key"):
        ident.check_chain(chain, joined.key_pem, joined.node_id)
    with pytest.raises(ValueError, match="not node"):
        ident.check_chain(chain, key_pem, new_ulid())
    ident.save_renewed(state, joined.renewed(key_pem, chain))
    assert ident.load(state) == joined.renewed(key_pem, chain)
    assert sorted(os.listdir(state)) == ["ca.pem", "node.conf", "node.key", "node.pem"]
    assert all(mode(os.path.join(state, n)) == 0o600 for n in os.listdir(state))


def _renewal_cut_short(fake, tmp_path, crash):
    """A joined state dir and a renewed key and chain whose save ``crash``
    cut short: (state dir, the joined identity, the renewed identity)."""
    state = str(tmp_path / "state")
    joined = join(JoinToken.parse(fake.join_token()), "py-1", state)
    key_pem, _ = ident.new_key_and_csr("py-1")
    key = serialization.load_pem_private_key(key_pem, password=None)
    cert = fake.ca.node(key.public_key(), joined.node_id, 7200)
    renewed = joined.renewed(key_pem, cert.public_bytes(serialization.Encoding.PEM) + fake.ca.pem)
    crash(state, renewed)
    return state, joined, renewed


def _in_place(state, name):
    os.replace(os.path.join(state, name + ".new"), os.path.join(state, name))


def _key_and_chain_in(state):
    with open(os.path.join(state, "node.key"), "rb") as k, open(os.path.join(state, "node.pem"), "rb") as c:
        return k.read(), c.read()


@pytest.mark.parametrize("crash", [
    pytest.param(lambda state, new: ident._write_pending(state, new.key_pem, new.chain_pem),
                 id="after-writing-node.key.new-and-node.pem.new"),
    pytest.param(lambda state, new: (ident._write_pending(state, new.key_pem, new.chain_pem),
                                     _in_place(state, "node.key")),
                 id="after-renaming-the-key"),
    pytest.param(lambda state, new: (ident._write_pending(state, new.key_pem, new.chain_pem),
                                     _in_place(state, "node.pem")),
                 id="after-renaming-the-chain-only"),
])
def test_a_renewal_cut_short_once_the_new_pair_is_written_loads_the_new_pair(fake, tmp_path, crash):
    state, _, renewed = _renewal_cut_short(fake, tmp_path, crash)
    assert ident.load(state) == renewed
    assert _key_and_chain_in(state) == (renewed.key_pem, renewed.chain_pem), "the renames are finished"
    assert sorted(os.listdir(state)) == ["ca.pem", "node.conf", "node.key", "node.pem"], "no .new file left"
    assert all(mode(os.path.join(state, n)) == 0o600 for n in os.listdir(state))
    assert ident.load(state) == renewed


@pytest.mark.parametrize("crash", [
    pytest.param(lambda state, new: ident._write_atomic(state, "node.key.new", new.key_pem),
                 id="after-writing-node.key.new-only"),
    pytest.param(lambda state, new: ident._write_pending(state, new.key_pem, new.chain_pem[:100]),
                 id="with-a-node.pem.new-that-does-not-parse"),
    pytest.param(lambda state, new: ident._write_pending(state, ident.new_key_and_csr("x")[0], new.chain_pem),
                 id="with-a-new-pair-that-does-not-match"),
])
def test_a_renewal_cut_short_before_the_new_pair_is_whole_loads_the_old_pair(fake, tmp_path, crash):
    state, joined, _ = _renewal_cut_short(fake, tmp_path, crash)
    assert ident.load(state) == joined
    assert _key_and_chain_in(state) == (joined.key_pem, joined.chain_pem)
    assert sorted(os.listdir(state)) == ["ca.pem", "node.conf", "node.key", "node.pem"], "stale .new files removed"


# -- renewal timing --------------------------------------------------------------------


def test_renewal_is_due_at_two_thirds_of_the_lifetime_and_retried_at_a_tenth_of_what_is_left():
    assert ident.renew_delay(1000.0, 1300.0, 1000.0) == pytest.approx(200.0)
    assert ident.renew_delay(1000.0, 1300.0, 1150.0) == pytest.approx(50.0)
    assert ident.renew_delay(1000.0, 1300.0, 1250.0) == 0.0
    assert ident.retry_delay(1300.0, 1200.0) == pytest.approx(10.0)
    assert ident.retry_delay(1300.0, 1299.0) == 1.0, "at least a second"


# -- the join key ----------------------------------------------------------------


def _public(pem: bytes) -> bytes:
    from cryptography.hazmat.primitives import serialization
    spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    return serialization.load_pem_private_key(pem, password=None).public_key().public_bytes(*spki)


def test_a_join_asked_again_after_its_answer_was_lost_asks_with_the_key_it_saved(fake, tmp_path):
    state = tmp_path / "state"
    # The first try saved its key, then its answer was lost (a crash).
    token = JoinToken.parse(fake.join_token())
    key_pem, _ = ident.join_key_and_csr(str(state), token.id, "py-1")
    assert (state / "node.join.key").read_bytes() == key_pem and mode(state / "node.join.key") == 0o600
    assert mode(state / "node.join") == 0o600
    assert ident.load(str(state)) is None
    joined = join(token, "py-1", str(state))
    assert joined.key_pem == key_pem
    assert sorted(os.listdir(state)) == ["ca.pem", "node.conf", "node.key", "node.pem"], "the join key removed"
    leaf = x509.load_pem_x509_certificate(joined.chain_pem)
    from cryptography.hazmat.primitives import serialization
    assert leaf.public_key().public_bytes(serialization.Encoding.DER,
                                          serialization.PublicFormat.SubjectPublicKeyInfo) == _public(key_pem)


def test_a_join_over_an_identity_asks_with_a_new_key_never_the_old_one(fake, tmp_path):
    state = tmp_path / "state"
    first = join(JoinToken.parse(fake.join_token()), "py-1", str(state))
    assert ident.saved_join_key(str(state), TOKEN_ID, "py-1") is None, \
        "an identity's key is no join key"
    again = join(JoinToken.parse(fake.join_token()), "py-1", str(state))
    assert _public(again.key_pem) != _public(first.key_pem)
    assert ident.load(str(state)) == again


def test_a_refused_join_over_an_identity_leaves_it_as_it_was_and_asks_again_with_the_same_key(fake, tmp_path):
    state = tmp_path / "state"
    old = join(JoinToken.parse(fake.join_token()), "py-1", str(state))
    before = {name: (state / name).read_bytes() for name in os.listdir(state)}
    # Its certificate looked expired (the clock ahead): a join over it with
    # a token the coordinator refuses.
    spent = JoinToken.parse(fake.join_token())
    refused = JoinToken(spent.address, spent.ca_pin, new_credential())
    with pytest.raises(weft.WeftError):
        join(refused, "py-1", str(state))
    key_pem = (state / "node.join.key").read_bytes()
    assert _public(key_pem) != _public(old.key_pem)
    assert {name: (state / name).read_bytes() for name in before} == before, "node.conf and node.key as they were"
    assert ident.load(str(state)) == old
    # Asked again: the same new key, whether or not node.conf is there.
    with pytest.raises(weft.WeftError):
        join(refused, "py-1", str(state))
    asked = [x509.load_der_x509_csr(r.csr_der).public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo) for r in fake.join_requests[-2:]]
    assert asked == [_public(key_pem)] * 2
    assert ident.saved_join_key(str(state), refused.id, "py-1") == key_pem
    # Another token, or another name: never that key.
    assert ident.saved_join_key(str(state), refused.id, "py-2") is None
    again = join(JoinToken.parse(fake.join_token()), "py-1", str(state))
    assert _public(again.key_pem) != _public(key_pem) and ident.load(str(state)) == again
    asked = x509.load_der_x509_csr(fake.join_requests[-1].csr_der).public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    assert asked == _public(again.key_pem)
    assert sorted(os.listdir(state)) == ["ca.pem", "node.conf", "node.key", "node.pem"]


def test_a_join_answer_whose_save_was_cut_short_leaves_the_old_identity_and_the_key_or_the_new_one(fake, tmp_path):
    state = str(tmp_path / "state")
    old = join(JoinToken.parse(fake.join_token()), "py-1", state)
    before = {name: open(os.path.join(state, name), "rb").read() for name in os.listdir(state)}
    key_pem, _ = ident.join_key_and_csr(state, TOKEN_ID, "py-1")
    key = serialization.load_pem_private_key(key_pem, password=None)
    node_id = new_ulid()
    cert = fake.ca.node(key.public_key(), node_id, 3600).public_bytes(serialization.Encoding.PEM)
    new = ident.Identity(node_id, "py-1", old.coordinator, key_pem, cert + fake.ca.pem, fake.ca.pem)
    # Cut short before node.conf: the old identity, whole; the join key kept.
    ident._stage(state, new)
    assert ident.load(state) == old
    assert {name: open(os.path.join(state, name), "rb").read() for name in before} == before
    assert sorted(os.listdir(state)) == sorted([*before, "node.join.key", "node.join"]), \
        "the answer's .new files dropped"
    assert ident.saved_join_key(state, TOKEN_ID, "py-1") == key_pem
    # Cut short after node.conf: the new identity, completed, the join key gone.
    ident._stage(state, new)
    ident._write_conf(state, new)
    assert ident.load(state) == new
    assert sorted(os.listdir(state)) == ["ca.pem", "node.conf", "node.key", "node.pem"]
    # Cut short after the renames (node.join.key not removed yet): never asked with again.
    ident.save_join_key(state, key_pem, TOKEN_ID, "py-1")
    assert ident.saved_join_key(state, TOKEN_ID, "py-1") is None
    assert not os.path.exists(os.path.join(state, "node.join.key"))
    ident.save_join_key(state, key_pem, TOKEN_ID, "py-1")
    assert ident.load(state) == new and not os.path.exists(os.path.join(state, "node.join.key"))


def _answer(fake, key_pem: bytes, coordinator: str) -> ident.Identity:
    """An answer to a join asking with ``key_pem``, as the coordinator issues it."""
    key = serialization.load_pem_private_key(key_pem, password=None)
    node_id = new_ulid()
    cert = fake.ca.node(key.public_key(), node_id, 3600).public_bytes(serialization.Encoding.PEM)
    return ident.Identity(node_id, "py-1", coordinator, key_pem, cert + fake.ca.pem, fake.ca.pem)


@pytest.mark.parametrize("renamed", [1, 2], ids=["key renamed, not the chain", "chain renamed, not the CA"])
@pytest.mark.parametrize("over_identity", [False, True], ids=["first join", "over an identity"])
def test_a_join_answer_whose_save_was_cut_between_its_renames_loads_the_new_identity(fake, tmp_path, renamed,
                                                                                      over_identity):
    state = str(tmp_path / "state")
    if over_identity:
        join(JoinToken.parse(fake.join_token()), "py-1", state)
    key_pem, _ = ident.join_key_and_csr(state, TOKEN_ID, "py-1")
    new = _answer(fake, key_pem, "127.0.0.1:1")
    # save's order: the .new files, node.conf, then the renames (key, chain, CA), cut after `renamed`.
    ident._ensure_dir(state)
    ident._stage(state, new)
    ident._write_conf(state, new)
    for name in (ident.KEY_FILE, ident.CHAIN_FILE, ident.CA_FILE)[:renamed]:
        os.replace(os.path.join(state, name + ident.PENDING_SUFFIX), os.path.join(state, name))
    loaded = ident.load(state)
    assert loaded == new
    ident.check_chain(loaded.chain_pem, loaded.key_pem, loaded.node_id)
    for name, data in ((ident.KEY_FILE, new.key_pem), (ident.CHAIN_FILE, new.chain_pem), (ident.CA_FILE, new.ca_pem)):
        assert open(os.path.join(state, name), "rb").read() == data, name
    assert sorted(os.listdir(state)) == ["ca.pem", "node.conf", "node.key", "node.pem"], "no .new file or join key left"
    again, _ = ident.join_key_and_csr(state, TOKEN_ID, "py-1")
    assert _public(again) != _public(key_pem)


def test_a_save_whose_dir_sync_fails_fails_and_commits_nothing(fake, tmp_path, monkeypatch):
    state = str(tmp_path / "state")
    old = join(JoinToken.parse(fake.join_token()), "py-1", state)
    key_pem, _ = ident.join_key_and_csr(state, TOKEN_ID, "py-1")
    new = _answer(fake, key_pem, old.coordinator)
    real_fsync = os.fsync

    def fsync(fd):
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            raise OSError(5, "injected failure")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(OSError):
        ident.save(state, new)
    monkeypatch.undo()
    assert ident.load(state) == old, "not committed"
    assert ident.saved_join_key(state, TOKEN_ID, "py-1") == key_pem, "the join key kept, to ask again with"
    ident.save(state, new)
    assert ident.load(state) == new


def test_a_join_key_is_asked_with_only_under_the_token_and_name_it_was_saved_for(tmp_path):
    state = str(tmp_path / "state")
    key_pem, _ = ident.join_key_and_csr(state, TOKEN_ID, "py-1")
    assert ident.join_key_and_csr(state, TOKEN_ID, "py-1")[0] == key_pem
    assert ident.saved_join_key(state, "fedcba9876543210", "py-1") is None
    assert ident.saved_join_key(state, TOKEN_ID, "py-2") is None
    # A key without node.join (a crash before it was written): under no token.
    os.unlink(os.path.join(state, "node.join"))
    assert ident.saved_join_key(state, TOKEN_ID, "py-1") is None
    other, _ = ident.join_key_and_csr(state, "fedcba9876543210", "py-1")
    assert _public(other) != _public(key_pem)
    assert ident.saved_join_key(state, "fedcba9876543210", "py-1") == other
    assert ident.saved_join_key(state, TOKEN_ID, "py-1") is None
