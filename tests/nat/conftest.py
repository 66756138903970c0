"""Fixtures for the NAT test bed; they skip only when the machine truly cannot build it.

Why loud: a silently skipped NAT suite looks green while proving nothing, so every skip says
"NAT TESTS DID NOT RUN" with the missing capability, and the run ends with a banner.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
from collections.abc import Iterator

import pytest

from .netbed import NetBed

REQUIRED_TOOLS = {
    "ip": "iproute2",
    "iptables": "iptables",
    "iptables-restore": "iptables",
    "conntrack": "conntrack",
    "turnserver": "coturn",
}
SKIP_BANNER = "NAT TESTS DID NOT RUN"
_skipped_reasons: set[str] = set()


@functools.cache
def missing_capability() -> str | None:
    """Why the bed cannot be built here, or None when it can."""
    if os.geteuid() != 0:
        return "not root (network namespaces and iptables need root; CI runs as root)"
    for tool, package in REQUIRED_TOOLS.items():
        if shutil.which(tool) is None:
            return f"`{tool}` not found: apt-get install -y {package}"
    probe = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True)
    if probe.returncode != 0:
        return f"`ip netns` does not work here: {probe.stderr.strip()}"
    if not os.path.exists("/dev/net/tun"):
        return "/dev/net/tun missing (the impaired link needs TAP devices)"
    return None


def _skip_if_incapable() -> None:
    reason = missing_capability()
    if reason is not None:
        _skipped_reasons.add(reason)
        pytest.skip(f"{SKIP_BANNER}: {reason}")


@pytest.fixture
def nat_capable() -> None:
    """For tests that build beds by other means (e.g. the command line) but need the same
    capabilities."""
    _skip_if_incapable()


@pytest.fixture
def netbed() -> Iterator[NetBed]:
    """A fresh, started bed for one test; torn down afterwards even if the test failed."""
    _skip_if_incapable()
    with NetBed() as bed:
        yield bed


@pytest.fixture
def netbed_factory() -> Iterator[type[NetBed]]:
    """For tests that need several beds at once or manage the lifetime themselves."""
    _skip_if_incapable()
    beds: list[NetBed] = []

    class TrackedNetBed(NetBed):
        def __init__(self) -> None:
            super().__init__()
            beds.append(self)

    yield TrackedNetBed
    for bed in beds:
        bed.close()


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    for reason in sorted(_skipped_reasons):
        terminalreporter.write_sep("!", f"{SKIP_BANNER}: {reason}", red=True, bold=True)
