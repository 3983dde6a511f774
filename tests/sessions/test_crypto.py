"""Master key handling and record sealing (no sockets, no daemon)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import stat

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from llmws_core import errors
from llmws_core.sessions.crypto import Sealer, load_or_create_master_key

ENV = "LLMWS_TEST_MASTER_KEY"
SID_A = "0b0f3a8e-6a43-4f39-9a7f-0c6a2d3c9e11"
SID_B = "5d1c2b7a-1f0e-4c8d-8b2a-7e9f6a5b4c3d"


@pytest.fixture(autouse=True)
def _no_env_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV, raising=False)


def _mode(path: os.PathLike[str]) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_key_file_created_private_and_stable(tmp_path):
    """The first start creates a 32-byte key readable only by the owner; later starts reuse it."""
    keys = tmp_path / "var" / "keys"
    key = load_or_create_master_key(keys, env_var=ENV)
    assert len(key) == 32
    assert _mode(keys) == 0o700
    assert _mode(keys / "master.key") == 0o600
    assert load_or_create_master_key(keys, env_var=ENV) == key
    assert [p.name for p in keys.iterdir()] == ["master.key"]  # no temporary left behind


def test_key_file_with_loose_permissions_is_tightened(tmp_path):
    """A key file others could read is restricted to 0600 rather than used as is."""
    keys = tmp_path / "keys"
    key = load_or_create_master_key(keys, env_var=ENV)
    os.chmod(keys / "master.key", 0o644)
    assert load_or_create_master_key(keys, env_var=ENV) == key
    assert _mode(keys / "master.key") == 0o600


def test_env_var_overrides_file(tmp_path, monkeypatch):
    """A key in the environment is used and no key file is written."""
    wanted = os.urandom(32)
    monkeypatch.setenv(ENV, base64.b64encode(wanted).decode())
    assert load_or_create_master_key(tmp_path / "keys", env_var=ENV) == wanted
    assert not (tmp_path / "keys" / "master.key").exists()


@pytest.mark.parametrize(
    "value",
    [
        "not base64 at all!",
        base64.b64encode(os.urandom(16)).decode(),  # AES-128-sized: too short
        base64.b64encode(os.urandom(33)).decode(),
        base64.urlsafe_b64encode(b"\xfb" * 32).decode(),  # url-safe alphabet is not accepted
    ],
)
def test_bad_env_key_is_rejected_clearly(tmp_path, monkeypatch, value):
    """A malformed key in the environment stops start-up with a clear message that hides the value."""
    monkeypatch.setenv(ENV, value)
    with pytest.raises(ValueError, match="32") as info:
        load_or_create_master_key(tmp_path / "keys", env_var=ENV)
    assert value not in str(info.value)
    assert ENV in str(info.value)


def test_bad_key_file_is_rejected_not_replaced(tmp_path):
    """A damaged key file is reported and left alone (replacing it would lose every session)."""
    keys = tmp_path / "keys"
    keys.mkdir(mode=0o700)
    (keys / "master.key").write_text("garbage\n")
    os.chmod(keys / "master.key", 0o600)
    with pytest.raises(ValueError):
        load_or_create_master_key(keys, env_var=ENV)
    assert (keys / "master.key").read_text() == "garbage\n"


def test_sealer_rejects_wrong_key_length():
    """A master key of the wrong size is refused."""
    with pytest.raises(ValueError):
        Sealer(b"short")


def test_seal_open_roundtrip_hides_plaintext():
    """A sealed record opens to the same bytes and does not contain them in the clear."""
    sealer = Sealer(os.urandom(32))
    plaintext = b"the launch code is swordfish"
    nonce, ciphertext = sealer.seal(SID_A, "event", 7, plaintext)
    assert len(nonce) == 12
    assert b"swordfish" not in ciphertext
    assert sealer.open(SID_A, "event", 7, nonce, ciphertext) == plaintext


def test_nonces_are_fresh():
    """Sealing the same text twice gives different nonces and ciphertexts."""
    sealer = Sealer(os.urandom(32))
    first = sealer.seal(SID_A, "event", 1, b"same")
    second = sealer.seal(SID_A, "event", 1, b"same")
    assert first[0] != second[0] and first[1] != second[1]


@pytest.mark.parametrize(
    ("sid", "kind", "seq"),
    [(SID_B, "event", 7), (SID_A, "state", 7), (SID_A, "event", 8)],
    ids=["other-session", "other-kind", "other-seq"],
)
def test_record_moved_elsewhere_fails(sid, kind, seq):
    """A record opened as another session, kind or position is refused as corrupt."""
    sealer = Sealer(os.urandom(32))
    nonce, ciphertext = sealer.seal(SID_A, "event", 7, b"hello")
    with pytest.raises(errors.CorruptRecord):
        sealer.open(sid, kind, seq, nonce, ciphertext)


def test_flipped_bits_fail():
    """Any flipped byte in nonce or ciphertext is detected."""
    sealer = Sealer(os.urandom(32))
    nonce, ciphertext = sealer.seal(SID_A, "event", 1, b"hello world")
    for i in range(len(ciphertext)):
        bad = bytearray(ciphertext)
        bad[i] ^= 0x01
        with pytest.raises(errors.CorruptRecord):
            sealer.open(SID_A, "event", 1, nonce, bytes(bad))
    bad_nonce = bytes([nonce[0] ^ 0x80]) + nonce[1:]
    with pytest.raises(errors.CorruptRecord):
        sealer.open(SID_A, "event", 1, bad_nonce, ciphertext)
    with pytest.raises(errors.CorruptRecord):
        sealer.open(SID_A, "event", 1, nonce[:8], ciphertext)


def test_other_master_key_cannot_open():
    """Records sealed under one master key do not open under another."""
    nonce, ciphertext = Sealer(os.urandom(32)).seal(SID_A, "event", 1, b"x")
    with pytest.raises(errors.CorruptRecord):
        Sealer(os.urandom(32)).open(SID_A, "event", 1, nonce, ciphertext)


def test_format_matches_documentation():
    """Records follow the documented format (HKDF info, AAD), so other tools can read them with the key."""
    master = os.urandom(32)
    # RFC 5869 HKDF-SHA256 with no salt, written out independently of the module
    prk = hmac.new(b"\x00" * 32, master, hashlib.sha256).digest()
    info = b"llmws-session:" + SID_A.encode()
    okm = hmac.new(prk, info + b"\x01", hashlib.sha256).digest()
    aad = b'["llmws/1","' + SID_A.encode() + b'","event",5]'
    nonce = os.urandom(12)
    ciphertext = AESGCM(okm).encrypt(nonce, b"documented", aad)
    assert Sealer(master).open(SID_A, "event", 5, nonce, ciphertext) == b"documented"


def test_associated_data_is_the_json_of_its_context():
    """The cached AAD prefix gives the same bytes as the JSON the format specifies."""
    import json

    from llmws_core.sessions import crypto

    for sid, kind, seq in [("s-1", "event", 0), ('we"ird\\id', "state", 7), ("s-1", "event", 10**12)]:
        expected = json.dumps([crypto._AAD_VERSION, sid, kind, seq], separators=(",", ":")).encode()
        assert crypto._aad(sid, kind, seq) == expected
