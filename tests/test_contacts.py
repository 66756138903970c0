"""The contact list file: validation, private mode, atomic replacement, clear errors."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest

from media.contacts import CONTACTS_FILE, MAX_NAME, Contacts, ContactsError
from overlay.identity import Identity

ALICE = Identity(bytes([1]) * 32).public_key
BOB = Identity(bytes([2]) * 32).public_key


def test_add_list_remove_round_trip(tmp_path: Path) -> None:
    book = Contacts(tmp_path)
    assert book.list() == []
    contact, created = book.add(BOB.hex(), "  Bob ")
    assert created and contact.name == "Bob"
    book.add(ALICE.hex().upper(), "alice")
    # Sorted by name as a person reads them; the file survives a reload.
    again = Contacts(tmp_path)
    assert [c.name for c in again.list()] == ["alice", "Bob"]
    assert ALICE in again and again.get(BOB).name == "Bob"  # type: ignore[union-attr]
    # Adding a known key renames it.
    _, created = again.add(BOB.hex(), "Robert")
    assert not created and Contacts(tmp_path).get(BOB).name == "Robert"  # type: ignore[union-attr]
    assert again.remove(ALICE.hex()).name == "alice"
    assert [c.to_dict() for c in Contacts(tmp_path).list()] == [
        {"public_key": BOB.hex(), "name": "Robert"}
    ]


def test_file_is_private_and_replaced_atomically(tmp_path: Path) -> None:
    book = Contacts(tmp_path)
    book.add(BOB.hex(), "Bob")
    path = tmp_path / CONTACTS_FILE
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    inode = path.stat().st_ino
    book.add(ALICE.hex(), "Alice")
    assert path.stat().st_ino != inode  # a new file renamed over the old one
    assert [p.name for p in tmp_path.iterdir()] == [CONTACTS_FILE]  # no temp files left
    assert json.loads(path.read_text())["version"] == 1


@pytest.mark.parametrize(
    ("key", "name", "message"),
    [
        ("abc", "X", "64 hex characters"),
        ("zz" * 32, "X", "hex"),
        ("00" * 32, "X", "not a valid Ed25519"),
        (BOB.hex(), "   ", "cannot be empty"),
        (BOB.hex(), "x" * (MAX_NAME + 1), f"at most {MAX_NAME}"),
        (BOB.hex(), "bad\nname", "control characters"),
    ],
)
def test_invalid_contacts_are_refused_clearly(
    tmp_path: Path, key: str, name: str, message: str
) -> None:
    book = Contacts(tmp_path)
    with pytest.raises(ContactsError, match=message):
        book.add(key, name)
    assert not (tmp_path / CONTACTS_FILE).exists()


def test_unknown_key_and_corrupt_file(tmp_path: Path) -> None:
    with pytest.raises(ContactsError, match="no contact"):
        Contacts(tmp_path).remove(BOB.hex())
    (tmp_path / CONTACTS_FILE).write_text("{not json")
    with pytest.raises(ContactsError, match="cannot read"):
        Contacts(tmp_path)
    (tmp_path / CONTACTS_FILE).write_text(
        json.dumps({"version": 1, "contacts": [{"public_key": "00", "name": "x"}]})
    )
    with pytest.raises(ContactsError, match="entry 0"):
        Contacts(tmp_path)
