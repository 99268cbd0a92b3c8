"""Listening ports for the platform's processes (`processes.free_port`): below the kernel's
ephemeral range, free when handed out, and never handed out twice while reserved."""

from __future__ import annotations

import itertools
import json
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from dagster_project.core.platform import processes


@pytest.fixture
def reservations(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "ports.json"
    monkeypatch.setattr(processes, "PORT_RESERVATIONS", path)
    return path


def test_ports_are_below_the_ephemeral_range_distinct_and_reserved(reservations: Path) -> None:
    span = processes._listening_range()
    assert span is not None
    low, high = span
    ports = [processes.free_port() for _ in range(40)]
    assert len(set(ports)) == len(ports)
    assert all(low <= port <= high for port in ports)
    ephemeral = Path("/proc/sys/net/ipv4/ip_local_port_range")
    if ephemeral.is_file():
        assert high < int(ephemeral.read_text().split()[0])
    assert set(json.loads(reservations.read_text())) == {str(p) for p in ports}


@pytest.fixture
def three_ports(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    """A range of three ports, the first two bound by this test."""
    low, _ = processes._listening_range() or (20000, 0)
    held = []
    for port in range(low, low + 200):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            sock.close()
            continue
        held.append(sock)
        if len(held) == 3:
            break
    ports = [s.getsockname()[1] for s in held]
    held[2].close()  # the one free port
    monkeypatch.setattr(processes, "_listening_range", lambda: (min(ports), max(ports)))
    choices = itertools.cycle(ports)  # every port of the range in turn
    monkeypatch.setattr(processes.random, "randint", lambda low, high: next(choices))
    yield ports
    for sock in held[:2]:
        sock.close()


def test_a_bound_or_reserved_port_is_never_handed_out(
    reservations: Path, three_ports: list[int]
) -> None:
    assert processes.free_port() == three_ports[2]  # the two others are bound
    with pytest.raises(OSError, match="no free port"):
        processes.free_port()  # the third is now reserved
    reservations.write_text(json.dumps({str(three_ports[2]): 0.0}))  # its reservation expired
    assert processes.free_port() == three_ports[2]


def test_with_no_room_below_the_ephemeral_range_the_kernel_picks(
    reservations: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(processes, "_listening_range", lambda: None)
    ports = {processes.free_port() for _ in range(10)}
    assert len(ports) == 10 and all(port >= 1024 for port in ports)
    assert set(json.loads(reservations.read_text())) == {str(p) for p in ports}
