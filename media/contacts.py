"""The address book: public key → name, a JSON file in the state dir (mode 0600, atomic writes).

Contacts decide who may ring us (see callservice's auto-answer policy), so the file is private to
the owner like the key file, and every write goes to a temporary file that replaces the old one:
a crash mid-write leaves the previous book, never half of one.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from overlay.identity import IdentityError, parse_public_key

CONTACTS_FILE = "contacts.json"
FILE_VERSION = 1
# A name is for a person to read in a list: 64 characters is a long full name.
MAX_NAME = 64
# Far more than anyone's address book; bounds the file a corrupted or hostile write could make.
MAX_CONTACTS = 10_000
# The file is read whole: 10k contacts × ~150 B is 1.5 MB; refuse anything much larger.
MAX_FILE_BYTES = 4 * 1024 * 1024


class ContactsError(Exception):
    """A contact or the contacts file is invalid; the message says what and where."""


@dataclass(frozen=True, slots=True)
class Contact:
    public_key: bytes
    name: str

    def to_dict(self) -> dict[str, str]:
        return {"public_key": self.public_key.hex(), "name": self.name}


def parse_key(text: str) -> bytes:
    """A person-typed public key (64 hex chars) → 32 bytes, or ContactsError saying why not."""
    if not isinstance(text, str):
        raise ContactsError("a public key is a string of 64 hex characters")
    try:
        return parse_public_key(text)
    except IdentityError as exc:
        raise ContactsError(f"bad public key: {exc}") from None


def check_name(name: str) -> str:
    if not isinstance(name, str):
        raise ContactsError("a contact name must be a string")
    cleaned = name.strip()
    if not cleaned:
        raise ContactsError("a contact name cannot be empty")
    if len(cleaned) > MAX_NAME:
        raise ContactsError(f"a contact name is at most {MAX_NAME} characters, got {len(cleaned)}")
    if not cleaned.isprintable():
        raise ContactsError("a contact name cannot contain control characters")
    return cleaned


class Contacts:
    """The contact list, loaded from and saved to ``<state_dir>/contacts.json``."""

    def __init__(self, state_dir: str | os.PathLike[str]) -> None:
        self.path = Path(state_dir) / CONTACTS_FILE
        self._by_key: dict[bytes, Contact] = {}
        self._load()

    def _load(self) -> None:
        try:
            size = self.path.stat().st_size
        except FileNotFoundError:
            return
        if size > MAX_FILE_BYTES:
            raise ContactsError(f"{self.path} is {size} bytes, larger than {MAX_FILE_BYTES}")
        try:
            doc = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ContactsError(f"cannot read {self.path}: {exc}") from None
        if not isinstance(doc, dict) or doc.get("version") != FILE_VERSION:
            raise ContactsError(f"{self.path}: not a version {FILE_VERSION} contacts file")
        entries = doc.get("contacts")
        if not isinstance(entries, list) or len(entries) > MAX_CONTACTS:
            raise ContactsError(f"{self.path}: 'contacts' must be a list of at most {MAX_CONTACTS}")
        for i, entry in enumerate(entries):
            if not isinstance(entry, dict):
                raise ContactsError(f"{self.path}: entry {i} is not an object")
            try:
                key = parse_key(entry.get("public_key"))  # type: ignore[arg-type]
                name = check_name(entry.get("name"))  # type: ignore[arg-type]
            except ContactsError as exc:
                raise ContactsError(f"{self.path}: entry {i}: {exc}") from None
            self._by_key[key] = Contact(key, name)

    def _save(self) -> None:
        doc = {"version": FILE_VERSION, "contacts": [c.to_dict() for c in self.list()]}
        data = json.dumps(doc, indent=2).encode() + b"\n"
        directory = self.path.parent
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        # mkstemp creates the file 0600 from the start: no moment where others could read it.
        fd, tmp = tempfile.mkstemp(prefix=".contacts-", suffix=".tmp", dir=directory)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, 0o600)
            os.replace(tmp, self.path)
        except OSError as exc:
            Path(tmp).unlink(missing_ok=True)
            raise ContactsError(f"cannot write {self.path}: {exc}") from None
        dir_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)  # make the rename itself durable
        finally:
            os.close(dir_fd)

    def add(self, key: str | bytes, name: str) -> tuple[Contact, bool]:
        """Add a contact, or rename it if the key is known; returns (contact, created)."""
        raw = parse_key(key) if isinstance(key, str) else parse_key(bytes(key).hex())
        contact = Contact(raw, check_name(name))
        created = raw not in self._by_key
        if created and len(self._by_key) >= MAX_CONTACTS:
            raise ContactsError(f"the contact list is full ({MAX_CONTACTS} entries)")
        self._by_key[raw] = contact
        self._save()
        return contact, created

    def remove(self, key: str | bytes) -> Contact:
        raw = parse_key(key) if isinstance(key, str) else bytes(key)
        contact = self._by_key.pop(raw, None)
        if contact is None:
            raise ContactsError(f"no contact with key {raw.hex()}")
        self._save()
        return contact

    def get(self, key: bytes) -> Contact | None:
        return self._by_key.get(bytes(key))

    def __contains__(self, key: object) -> bool:
        return isinstance(key, bytes) and key in self._by_key

    def __len__(self) -> int:
        return len(self._by_key)

    def list(self) -> list[Contact]:
        """Contacts sorted by name (then key), as a person scans them."""
        return sorted(self._by_key.values(), key=lambda c: (c.name.casefold(), c.public_key))
