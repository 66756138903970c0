"""A person's 3Bot identity: one Ed25519 key, its node id, its X25519 twin and its safety words.

The key lives in a file only its owner can read; we refuse to use a key file that others could
read, because a leaked key lets anyone impersonate its owner in every later call.
"""

from __future__ import annotations

import functools
import hashlib
import os
import stat
from dataclasses import dataclass
from pathlib import Path

import nacl.bindings
import nacl.exceptions
import nacl.signing
from mnemonic import Mnemonic

KEY_FILE_NAME = "identity.key"
# The file holds the 32-byte Ed25519 seed, hex encoded, and nothing else.
KEY_FILE_MODE = 0o600
PUBLIC_KEY_SIZE = 32
SIGNATURE_SIZE = 64
NODE_ID_SIZE = 32
# Five words from the 2048-word BIP39 list carry 55 bits: enough that an attacker cannot grind a
# key whose words match a victim's (2^55 Ed25519 key generations), short enough to read aloud.
SAFETY_WORD_COUNT = 5


class IdentityError(Exception):
    """The identity cannot be created, loaded or imported; the message says why, for a person."""


# Every DHT reply names up to 20 keys and each is hashed where it is used; a daemon talks to a few
# thousand keys, the 10k-node simulation to ~12k in one process (~200 B per entry).
_NODE_ID_CACHE = 1 << 15


@functools.lru_cache(maxsize=_NODE_ID_CACHE)
def node_id_for(public_key: bytes) -> bytes:
    """The DHT id of a key: BLAKE2b-256 of the public key, so nobody can choose where they sit."""
    return hashlib.blake2b(public_key, digest_size=NODE_ID_SIZE).digest()


def parse_public_key(text: str) -> bytes:
    """Parse a public key as typed by a person: 64 hex characters."""
    cleaned = text.strip().lower()
    if len(cleaned) != 2 * PUBLIC_KEY_SIZE:
        raise IdentityError(
            f"a public key is {2 * PUBLIC_KEY_SIZE} hex characters; got {len(cleaned)}"
        )
    try:
        raw = bytes.fromhex(cleaned)
    except ValueError:
        raise IdentityError("a public key is hex: only 0-9 and a-f") from None
    if not is_valid_public_key(raw):
        raise IdentityError("that is not a valid Ed25519 public key")
    return raw


def is_valid_public_key(raw: bytes) -> bool:
    """True when `raw` is an Ed25519 point that can verify signatures."""
    if len(raw) != PUBLIC_KEY_SIZE:
        return False
    try:
        nacl.bindings.crypto_sign_ed25519_pk_to_curve25519(raw)
    except (nacl.exceptions.RuntimeError, ValueError, TypeError):
        return False
    return True


def safety_words(public_key: bytes) -> list[str]:
    """Short words two people compare aloud to be sure they hold each other's real key."""
    digest = int.from_bytes(
        hashlib.blake2b(b"3bc-safety-words" + public_key, digest_size=16).digest(), "big"
    )
    wordlist = Mnemonic("english").wordlist
    words = []
    for _ in range(SAFETY_WORD_COUNT):
        words.append(wordlist[digest & 0x7FF])
        digest >>= 11
    return words


def verify(public_key: bytes, message: bytes, signature: bytes) -> bool:
    """Check an Ed25519 signature without raising."""
    if len(signature) != SIGNATURE_SIZE or len(public_key) != PUBLIC_KEY_SIZE:
        return False
    try:
        nacl.signing.VerifyKey(public_key).verify(message, signature)
    except (nacl.exceptions.BadSignatureError, nacl.exceptions.ValueError, ValueError):
        return False
    return True


@dataclass(frozen=True)
class Identity:
    """An Ed25519 key pair with the values derived from it that the overlay needs."""

    seed: bytes

    def __post_init__(self) -> None:
        if len(self.seed) != 32:
            raise IdentityError("an Ed25519 seed is 32 bytes")

    @classmethod
    def generate(cls) -> Identity:
        return cls(os.urandom(32))

    @classmethod
    def from_words(cls, phrase: str) -> Identity:
        """Import a 3Bot identity: its Ed25519 seed is the 32-byte entropy of the 24 words."""
        words = phrase.lower().split()
        if len(words) != 24:
            raise IdentityError(f"a 3Bot seed phrase has 24 words; got {len(words)}")
        mnemonic = Mnemonic("english")
        unknown = [w for w in words if w not in mnemonic.wordlist]
        if unknown:
            raise IdentityError(f"not a BIP39 word: {unknown[0]!r}")
        if not mnemonic.check(" ".join(words)):
            raise IdentityError("the words' checksum is wrong: check the order and spelling")
        return cls(bytes(mnemonic.to_entropy(words)))

    def to_words(self) -> str:
        return Mnemonic("english").to_mnemonic(self.seed)

    # Cached: building a SigningKey per signature halved the signing rate (simulations/ found it).
    @functools.cached_property
    def signing_key(self) -> nacl.signing.SigningKey:
        return nacl.signing.SigningKey(self.seed)

    @functools.cached_property
    def public_key(self) -> bytes:
        return bytes(self.signing_key.verify_key)

    @functools.cached_property
    def node_id(self) -> bytes:
        return node_id_for(self.public_key)

    @property
    def x25519_private(self) -> bytes:
        """The static Diffie-Hellman key sessions use, derived so one key file serves both."""
        return bytes(self.signing_key.to_curve25519_private_key())

    @property
    def x25519_public(self) -> bytes:
        return nacl.bindings.crypto_sign_ed25519_pk_to_curve25519(self.public_key)

    def sign(self, message: bytes) -> bytes:
        return self.signing_key.sign(message).signature

    def safety_words(self) -> list[str]:
        return safety_words(self.public_key)


def key_path(state_dir: Path) -> Path:
    return Path(state_dir) / KEY_FILE_NAME


def load(state_dir: Path) -> Identity:
    """Load the identity from the state dir, refusing a key file others can read."""
    path = key_path(state_dir)
    try:
        info = path.stat()
    except FileNotFoundError:
        raise IdentityError(f"no identity at {path}: run `3bc id` to create one") from None
    if info.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise IdentityError(
            f"{path} is readable by others (mode {stat.S_IMODE(info.st_mode):o}); "
            f"refusing to use it. Fix with: chmod 600 {path}"
        )
    text = path.read_text().strip()
    try:
        seed = bytes.fromhex(text)
    except ValueError:
        raise IdentityError(f"{path} is not a 3bc key file (expected 64 hex characters)") from None
    if len(seed) != 32:
        raise IdentityError(f"{path} is not a 3bc key file (expected 64 hex characters)")
    return Identity(seed)


def save(state_dir: Path, identity: Identity, *, overwrite: bool = False) -> Path:
    """Write the key file atomically with mode 0600 from the first byte."""
    state = Path(state_dir)
    state.mkdir(parents=True, exist_ok=True, mode=0o700)
    path = key_path(state)
    if path.exists() and not overwrite:
        raise IdentityError(f"{path} already exists; refusing to overwrite an identity")
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, KEY_FILE_MODE)
    with os.fdopen(fd, "w") as f:
        f.write(identity.seed.hex() + "\n")
    os.chmod(tmp, KEY_FILE_MODE)
    os.replace(tmp, path)
    return path


def load_or_create(state_dir: Path) -> tuple[Identity, bool]:
    """The identity in the state dir, creating one on first use; the flag says it was created."""
    if key_path(state_dir).exists():
        return load(state_dir), False
    identity = Identity.generate()
    save(state_dir, identity)
    return identity, True
