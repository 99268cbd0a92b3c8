"""Probing the platform's processes on 127.0.0.1, and stopping processes by pid.

The processes themselves are run by supervisord (supervision.py): it starts them, restarts
them when they crash, and is the source of their pids and liveness. This module holds what
is not supervision: free ports, HTTP readiness probes, log tails.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import random
import signal
import socket
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import httpx
import psutil

from dagster_project.core import httpclient
from dagster_project.core.settings import release_home


class ProcessStartError(RuntimeError):
    """A platform process exited or never became ready; the message names the endpoint
    and the log file to read."""


# Listening ports are taken below the kernel's ephemeral range (where every outgoing
# connection and every bind to port 0 gets its port) and reserved for a while in one file per
# machine: between the moment a port is chosen and the moment its process binds it (a second
# or more), nothing else of ours is given it, and no client socket lands on it. (bind(0) then
# close, the old way, once handed a new edge's port to another test worker's API.)
PORT_RESERVATIONS = Path(tempfile.gettempdir()) / "release-pipeline-ports.json"
PORT_RESERVE_SECONDS = 600.0
PORT_RANGE_SIZE = 10_000


def free_port() -> int:
    """A port that is free now, chosen below the ephemeral range and reserved for
    PORT_RESERVE_SECONDS so that no other caller on this machine is handed it meanwhile."""
    span = _listening_range()
    with _reservations() as reserved:
        now = time.time()
        for _ in range(500):
            port = random.randint(*span) if span else _kernel_port()
            if reserved.get(str(port), 0.0) <= now and _bindable(port):
                reserved[str(port)] = now + PORT_RESERVE_SECONDS
                return port
    raise OSError(f"no free port in {span or 'the ephemeral range'} on 127.0.0.1 after 500 tries")


def _listening_range() -> tuple[int, int] | None:
    """Ports below net.ipv4.ip_local_port_range (32768-60999 unless changed); None when the
    ephemeral range starts too low to leave room below it (then the kernel picks)."""
    try:
        ephemeral_low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        ephemeral_low = 32768
    low, high = max(1024, ephemeral_low - 1 - PORT_RANGE_SIZE), ephemeral_low - 1
    return (low, high) if high - low >= 1000 else None


def _kernel_port() -> int:
    """A port the kernel picks (bind port 0, then release it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


@contextlib.contextmanager
def _reservations() -> Iterator[dict[str, float]]:
    """The machine's port reservations (port -> until), read and written under a lock;
    without a writable file, an empty map (the range alone still keeps clients off)."""
    try:
        handle = open(PORT_RESERVATIONS, "a+")  # noqa: SIM115 (held for the lock's span)
    except OSError:
        yield {}
        return
    with handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        handle.seek(0)
        try:
            loaded = json.loads(handle.read() or "{}")
        except ValueError:
            loaded = {}
        now = time.time()
        reserved = {
            str(k): float(v)
            for k, v in (loaded.items() if isinstance(loaded, dict) else [])
            if isinstance(v, int | float) and v > now
        }
        yield reserved
        handle.seek(0)
        handle.truncate()
        handle.write(json.dumps(reserved))


def is_alive(pid: int | None, create_time: float | None) -> bool:
    """True if `pid` runs and is the process that was seen (create time matches)."""
    if pid is None:
        return False
    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return False
        return create_time is None or abs(proc.create_time() - create_time) < 1.0
    except psutil.Error:
        return False


def terminate(
    targets: Iterable[tuple[int | None, float | None]], *, timeout: float = 5.0
) -> list[int]:
    """Stop these processes for good. A process supervised by this state directory's
    supervisord is stopped through it (a signal would only get it restarted); any other is
    sent SIGTERM, then SIGKILL after `timeout` seconds. Returns the pids that were killed."""
    from dagster_project.core.platform.supervision import Supervisor

    wanted = [(pid, ct) for pid, ct in targets if pid is not None and is_alive(pid, ct)]
    supervisor = Supervisor(release_home())
    by_pid = {info.pid: name for name, info in supervisor.all_info().items() if info.pid}
    for pid, _ in wanted:
        if pid in by_pid:
            supervisor.stop(by_pid[pid])
    live = [(pid, ct) for pid, ct in wanted if pid not in by_pid]
    for pid, _ in live:
        _signal_group(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while live and time.monotonic() < deadline:
        live = [(pid, ct) for pid, ct in live if is_alive(pid, ct)]
        time.sleep(0.05)
    killed = [pid for pid, ct in live if is_alive(pid, ct)]
    for pid in killed:
        _signal_group(pid, signal.SIGKILL)
    return killed


def _signal_group(pid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


def log_tail(log_path: Path | str, lines: int = 15) -> str:
    try:
        text = Path(log_path).read_text(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:]) or "(empty log)"


def wait_ready(
    url: str,
    *,
    problem: Callable[[], str | None],
    log_path: Path | str,
    what: str,
    deadline_seconds: float = 30.0,
) -> None:
    """Poll `url` until it answers 200. `problem()` says why waiting is pointless (the
    process exited, or its supervisor gave it up) and fails fast; on timeout, raises naming
    the endpoint and the log file."""
    deadline = time.monotonic() + deadline_seconds
    last_problem = "no answer yet"
    with httpclient.client(timeout=1.0) as client:
        while True:
            try:
                response = client.get(url)
                if response.status_code == 200:
                    return
                last_problem = f"HTTP {response.status_code}"
            except httpx.HTTPError as exc:
                last_problem = type(exc).__name__
            fatal = problem()
            if fatal:
                raise ProcessStartError(
                    f"{what} {fatal} before {url} answered; see its log {log_path}:\n"
                    f"{log_tail(log_path)}"
                )
            if time.monotonic() >= deadline:
                break
            time.sleep(0.1)
    raise ProcessStartError(
        f"{what} did not become ready: {url} gave {last_problem} for "
        f"{deadline_seconds:.0f}s; see its log {log_path}:\n{log_tail(log_path)}"
    )


def probe(url: str, *, timeout: float = 1.0) -> tuple[bool, str]:
    """One GET: (ok, reason) where reason says what went wrong."""
    try:
        response = httpclient.get(url, timeout=timeout)
    except httpx.HTTPError as exc:
        return False, f"{url} unreachable ({type(exc).__name__})"
    if response.status_code != 200:
        return False, f"{url} answered HTTP {response.status_code}"
    return True, "ok"


@contextlib.contextmanager
def file_lock(directory: Path) -> Iterator[None]:
    """An exclusive flock on `directory/.lock`, across processes (created on demand)."""
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / ".lock", "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
