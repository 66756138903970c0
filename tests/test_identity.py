import os
import stat

import pytest
from hypothesis import given
from hypothesis import strategies as st
from mnemonic import Mnemonic

from overlay import identity as ident


def test_key_file_is_created_owner_only(tmp_path):
    identity, created = ident.load_or_create(tmp_path / "state")
    assert created
    path = ident.key_path(tmp_path / "state")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    again, created_again = ident.load_or_create(tmp_path / "state")
    assert not created_again
    assert again.public_key == identity.public_key


def test_refuses_key_file_others_can_read(tmp_path):
    ident.load_or_create(tmp_path)
    os.chmod(ident.key_path(tmp_path), 0o644)
    with pytest.raises(ident.IdentityError, match=r"readable by others.*chmod 600"):
        ident.load(tmp_path)


def test_refuses_garbage_key_file(tmp_path):
    path = ident.key_path(tmp_path)
    path.write_text("not a key")
    os.chmod(path, 0o600)
    with pytest.raises(ident.IdentityError, match="not a 3bc key file"):
        ident.load(tmp_path)


def test_import_words_uses_entropy_as_seed():
    entropy = bytes(range(32))
    words = Mnemonic("english").to_mnemonic(entropy)
    identity = ident.Identity.from_words(words)
    assert identity.seed == entropy
    assert identity.to_words() == words


@pytest.mark.parametrize(
    ("phrase", "message"),
    [
        ("abandon " * 12, "24 words"),
        ("abandon " * 23 + "zzzz", "not a BIP39 word"),
        ("abandon " * 24, "checksum"),
    ],
)
def test_import_words_rejects_bad_phrases(phrase, message):
    with pytest.raises(ident.IdentityError, match=message):
        ident.Identity.from_words(phrase)


def test_safety_words_are_stable_and_differ_between_keys():
    a, b = ident.Identity(bytes(32)), ident.Identity(bytes(31) + b"\x01")
    assert a.safety_words() == ident.safety_words(a.public_key)
    assert len(a.safety_words()) == ident.SAFETY_WORD_COUNT
    assert a.safety_words() != b.safety_words()


def test_x25519_twin_matches():
    import nacl.bindings

    identity = ident.Identity.generate()
    assert nacl.bindings.crypto_scalarmult_base(identity.x25519_private) == identity.x25519_public


@given(st.text(max_size=80))
def test_parse_public_key_never_crashes(text):
    try:
        key = ident.parse_public_key(text)
    except ident.IdentityError:
        return
    assert len(key) == 32


def test_signatures_verify_only_for_the_signer():
    a, b = ident.Identity.generate(), ident.Identity.generate()
    sig = a.sign(b"hello")
    assert ident.verify(a.public_key, b"hello", sig)
    assert not ident.verify(b.public_key, b"hello", sig)
    assert not ident.verify(a.public_key, b"hellO", sig)
    assert not ident.verify(a.public_key, b"hello", sig[:-1])
