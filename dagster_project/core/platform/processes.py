"""Starting, probing and stopping the platform's detached processes on 127.0.0.1.

Processes run in their own session so they outlive the command that started them; a pid is
only trusted together with the process's create time, so a reused pid is never mistaken for
(or killed as) a platform process.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import socket
import subprocess
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil

from dagster_project.core.settings import release_home


class ProcessStartError(RuntimeError):
    """A platform process exited or never became ready; the message names the endpoint
    and the log file to read."""


@dataclass(frozen=True)
class Started:
    pid: int
    create_time: float
    command: str
    log_path: Path


_children: dict[int, subprocess.Popen[bytes]] = {}


def logs_dir() -> Path:
    path = release_home() / "logs"
    path.mkdir(parents=True, exist_ok=True)
    return path


def free_port() -> int:
    """A port that was free a moment ago (bind port 0 on loopback, then release it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_detached(
    argv: Sequence[str], *, log_name: str, env: Mapping[str, str], cwd: Path | None = None
) -> Started:
    """Start `argv` in a new session with stdout/stderr appended to logs/<log_name>.log."""
    log_path = logs_dir() / f"{log_name}.log"
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=dict(env),
            cwd=cwd,
            start_new_session=True,
        )
    # Kept so Python does not warn about a running child being garbage-collected: the child
    # is meant to outlive us, and `is_alive` reaps it if it dies while we are its parent.
    _children[proc.pid] = proc
    return Started(
        pid=proc.pid,
        create_time=_create_time(proc.pid) or time.time(),
        command=shlex.join(argv),
        log_path=log_path,
    )


def _create_time(pid: int) -> float | None:
    try:
        return psutil.Process(pid).create_time()
    except psutil.Error:
        return None


def _reap_if_child(pid: int) -> None:
    # A dead child of this process stays a zombie (and looks alive) until waited for.
    child = _children.get(pid)
    if child is not None:
        if child.poll() is not None:
            del _children[pid]
        return
    with contextlib.suppress(ChildProcessError):  # not our child: its parent reaps it
        os.waitpid(pid, os.WNOHANG)


def is_alive(pid: int, create_time: float) -> bool:
    """True if `pid` runs and is the same process that was recorded (create time matches)."""
    _reap_if_child(pid)
    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return False
        return abs(proc.create_time() - create_time) < 1.0
    except psutil.Error:
        return False


def terminate(targets: Iterable[tuple[int, float]], *, timeout: float = 5.0) -> list[int]:
    """SIGTERM every live target (its whole process group), then SIGKILL what is left after
    `timeout` seconds. Returns the pids that had to be killed."""
    live = [(pid, ct) for pid, ct in targets if is_alive(pid, ct)]
    for pid, _ in live:
        _signal_group(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        live = [(pid, ct) for pid, ct in live if is_alive(pid, ct)]
        if not live:
            return []
        time.sleep(0.05)
    killed = [pid for pid, ct in live if is_alive(pid, ct)]
    for pid in killed:
        _signal_group(pid, signal.SIGKILL)
    deadline = time.monotonic() + 2.0
    while time.monotonic() < deadline and any(is_alive(p, c) for p, c in live):
        time.sleep(0.05)
    return killed


def _signal_group(pid: int, sig: signal.Signals) -> None:
    # Each platform process leads its own session/group (start_new_session=True), so the
    # group signal also reaches any children it spawned.
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


def log_tail(log_path: Path, lines: int = 15) -> str:
    try:
        text = log_path.read_text(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:]) or "(empty log)"


def wait_ready(
    url: str,
    *,
    pid: int,
    create_time: float,
    log_path: Path,
    what: str,
    deadline_seconds: float = 30.0,
) -> None:
    """Poll `url` until it answers 200. Fails fast if the process exits; on timeout, raises
    naming the endpoint and the log file."""
    deadline = time.monotonic() + deadline_seconds
    last_problem = "no answer yet"
    with httpx.Client(timeout=1.0, trust_env=False) as client:
        while time.monotonic() < deadline:
            if not is_alive(pid, create_time):
                raise ProcessStartError(
                    f"{what} (pid {pid}) exited before {url} answered; see its log "
                    f"{log_path}:\n{log_tail(log_path)}"
                )
            try:
                response = client.get(url)
                if response.status_code == 200:
                    return
                last_problem = f"HTTP {response.status_code}"
            except httpx.HTTPError as exc:
                last_problem = type(exc).__name__
            time.sleep(0.1)
    raise ProcessStartError(
        f"{what} (pid {pid}) did not become ready: {url} gave {last_problem} for "
        f"{deadline_seconds:.0f}s; see its log {log_path}:\n{log_tail(log_path)}"
    )


def probe(url: str, *, timeout: float = 1.0) -> tuple[bool, str]:
    """One GET: (ok, reason) where reason says what went wrong."""
    try:
        response = httpx.get(url, timeout=timeout, trust_env=False)
    except httpx.HTTPError as exc:
        return False, f"{url} unreachable ({type(exc).__name__})"
    if response.status_code != 200:
        return False, f"{url} answered HTTP {response.status_code}"
    return True, "ok"
