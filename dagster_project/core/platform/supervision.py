"""One supervisord per RELEASE_HOME runs every platform process (edges, APIs, workers).

Everything lives under `$RELEASE_HOME/supervisor/`: `supervisord.conf`, the control socket
(`s.sock`), `supervisord.log`/`.pid`, one `programs/<name>.conf` per program (included by the
main config) and the programs' logs in `logs/`. supervisord is started on demand, daemonised
so it outlives the command that started it, and controlled over its XML-RPC unix socket
(`supervisor.xmlrpc.SupervisorTransport`). Programs are added and removed at run time by
writing or deleting their file, then `reloadConfig` + `addProcessGroup` / `removeProcessGroup`.

Every program runs with autorestart, so a crashed process comes back with the same command
line, i.e. on the same port. Liveness, pids and start times come from supervisord.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import logging
import os
import re
import shlex
import socket
import subprocess
import sys
import tempfile
import time
import xmlrpc.client
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
from supervisor.xmlrpc import Faults, SupervisorTransport

from dagster_project.core.platform import processes
from dagster_project.core.platform.errors import PlatformError

logger = logging.getLogger("release.platform.supervision")

# Seconds a program must stay up to count as started; short, readiness is probed over HTTP.
START_SECONDS = 1
# Spawn attempts before supervisord gives a program up (FATAL): backoff 1 + 2 + 3 s.
START_RETRIES = 3
STOP_WAIT_SECONDS = 5
RPC_TIMEOUT_SECONDS = STOP_WAIT_SECONDS + 25.0
SUPERVISORD_START_SECONDS = 15.0
# sun_path is 108 bytes on Linux (104 on macOS); keep a margin.
_MAX_SOCKET_PATH = 100
# Programs are named <product>.<env>...; product ids and envs never contain a dot.
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# Variables supervisord itself needs; every program gets its full environment explicitly.
_SUPERVISORD_ENV = ("PATH", "HOME", "LANG", "LC_ALL", "TMPDIR", "TZ")


class SupervisorError(PlatformError):
    """supervisord could not be started, reached or told to do something."""


@dataclass(frozen=True)
class ProgramInfo:
    """One program as supervisord sees it (`getProcessInfo`)."""

    name: str
    state: str  # STOPPED STARTING RUNNING BACKOFF STOPPING EXITED FATAL UNKNOWN
    pid: int | None
    start: float | None  # epoch seconds of the last spawn (precise from psutil when running)
    now: float
    description: str
    exitstatus: int
    spawnerr: str
    log_path: str

    @property
    def running(self) -> bool:
        return self.state == "RUNNING" and self.pid is not None

    @property
    def restarting(self) -> bool:
        """supervisord is bringing it (back) up on its own."""
        return self.state in ("STARTING", "BACKOFF", "EXITED")

    @property
    def uptime_seconds(self) -> float | None:
        if not self.running or self.start is None:
            return None
        return round(max(0.0, time.time() - self.start), 1)

    @property
    def create_time(self) -> float | None:
        return self.start if self.running else None


class Supervisor:
    """The supervisord of one state directory (default: `$RELEASE_HOME`)."""

    def __init__(self, home: Path) -> None:
        self.home = home
        self.dir = home / "supervisor"
        self.config_path = self.dir / "supervisord.conf"
        self.programs_dir = self.dir / "programs"
        self.logs_dir = self.dir / "logs"
        self.pidfile = self.dir / "supervisord.pid"
        self.logfile = self.dir / "supervisord.log"
        self.socket_path = _socket_path(self.dir)

    # -- supervisord itself --------------------------------------------------------------

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Serialise start, stop and config changes of this supervisord across processes
        (it is shared by every product of the state directory)."""
        with processes.file_lock(self.dir):
            yield

    def is_running(self) -> bool:
        try:
            state = self._call("supervisor.getState")
        except (OSError, SupervisorError):
            return False
        return bool(state.get("statename") in ("RUNNING", "RESTARTING"))

    def ensure_running(self) -> None:
        """Start supervisord unless it answers; idempotent and safe across processes."""
        with self.lock():
            self._ensure_running_locked()

    def _ensure_running_locked(self) -> None:
        if self.is_running():
            return
        for path in (self.programs_dir, self.logs_dir):
            path.mkdir(parents=True, exist_ok=True)
        _write_private(self.config_path, self._main_config())
        launch_log = self.dir / "launch.log"
        with open(launch_log, "ab") as out:
            # The launcher forks the daemon (new session, reparented to init) and exits 0 once
            # the control socket is bound; config errors make it exit non-zero here.
            completed = subprocess.run(
                [sys.executable, "-m", "supervisor.supervisord", "-c", str(self.config_path)],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=_supervisord_env(),
                cwd=self.dir,
                timeout=SUPERVISORD_START_SECONDS,
                check=False,
            )
        deadline = time.monotonic() + SUPERVISORD_START_SECONDS
        while time.monotonic() < deadline:
            if self.is_running():
                return
            if completed.returncode != 0:
                break
            time.sleep(0.05)
        raise SupervisorError(
            f"supervisord did not start (exit {completed.returncode}) with "
            f"{self.config_path}; see {launch_log} and {self.logfile}:\n"
            f"{_tail(launch_log)}\n{_tail(self.logfile)}"
        )

    def pid(self) -> int | None:
        with contextlib.suppress(OSError, SupervisorError, xmlrpc.client.Error):
            return int(self._call("supervisor.getPID"))
        return None

    def shutdown_if_idle(self) -> bool:
        """Stop supervisord when it runs no program and no program file is left; True if it
        is not running afterwards."""
        with self.lock():
            if not self.is_running():
                return True
            if self.all_info() or any(self.programs_dir.glob("*.conf")):
                return False
            pid = self.pid()
            with contextlib.suppress(OSError, SupervisorError, xmlrpc.client.Error):
                self._call("supervisor.shutdown")
            deadline = time.monotonic() + STOP_WAIT_SECONDS + 10
            while pid is not None and _pid_running(pid):
                if time.monotonic() > deadline:
                    raise SupervisorError(f"supervisord (pid {pid}) did not exit after shutdown")
                time.sleep(0.05)
            return True

    # -- programs ------------------------------------------------------------------------

    def program_path(self, name: str) -> Path:
        return self.programs_dir / f"{name}.conf"

    def log_path(self, name: str) -> Path:
        return self.logs_dir / f"{name}.log"

    def add_program(
        self,
        name: str,
        argv: Sequence[str],
        *,
        env: Mapping[str, str],
        cwd: Path,
    ) -> Path:
        """Write programs/<name>.conf and have supervisord start it (autorestart). Returns
        the log file (stdout and stderr)."""
        _check_name(name)
        log_path = self.log_path(name)
        with self.lock():
            self._ensure_running_locked()
            _write_private(
                self.program_path(name), self._program_config(name, argv, env, cwd, log_path)
            )
            self._activate_locked(name)
        return log_path

    def readd_program(self, name: str) -> bool:
        """Make supervisord know a program whose file exists (after supervisord was
        restarted without it, say). False when the file is gone."""
        with self.lock():
            if not self.program_path(name).is_file():
                return False
            self._ensure_running_locked()
            self._activate_locked(name)
            return True

    def _activate_locked(self, name: str) -> None:
        self._call("supervisor.reloadConfig")
        try:
            self._call("supervisor.addProcessGroup", name)
        except xmlrpc.client.Fault as fault:
            if fault.faultCode != Faults.ALREADY_ADDED:
                raise SupervisorError(f"supervisord refused program {name}: {fault}") from None

    def remove_program(self, name: str) -> ProgramInfo | None:
        """Stop the program (its whole process group), forget it and delete its file.
        Returns what it was before. Harmless for an unknown program."""
        before = self.info(name)
        with self.lock():
            if before is not None:
                with contextlib.suppress(xmlrpc.client.Fault):  # NOT_RUNNING: already down
                    self._call("supervisor.stopProcess", name, True)
                with contextlib.suppress(xmlrpc.client.Fault):  # BAD_NAME: already gone
                    self._call("supervisor.removeProcessGroup", name)
            with contextlib.suppress(FileNotFoundError):
                self.program_path(name).unlink()
        return before

    def start(self, name: str) -> None:
        """Start a stopped or given-up (FATAL) program without waiting for it."""
        try:
            self._call("supervisor.startProcess", name, False)
        except xmlrpc.client.Fault as fault:
            if fault.faultCode != Faults.ALREADY_STARTED:
                raise SupervisorError(f"supervisord could not start {name}: {fault}") from None

    def stop(self, name: str) -> None:
        """Stop a program and leave it stopped (a deliberate stop is not restarted)."""
        with contextlib.suppress(xmlrpc.client.Fault):  # NOT_RUNNING
            self._call("supervisor.stopProcess", name, True)

    def info(self, name: str) -> ProgramInfo | None:
        try:
            raw = self._call("supervisor.getProcessInfo", name)
        except (OSError, SupervisorError):
            return None
        except xmlrpc.client.Fault as fault:
            if fault.faultCode == Faults.BAD_NAME:
                return None
            raise
        return _program_info(raw)

    def all_info(self) -> dict[str, ProgramInfo]:
        """Every program supervisord runs, by name; empty when supervisord is not running."""
        try:
            raw = self._call("supervisor.getAllProcessInfo")
        except (OSError, SupervisorError):
            return {}
        return {info.name: info for info in map(_program_info, raw)}

    def program_files(self) -> list[str]:
        return sorted(p.stem for p in self.programs_dir.glob("*.conf"))

    # -- internals -----------------------------------------------------------------------

    def _call(self, method: str, *args: Any) -> Any:
        if not self.socket_path.exists():
            raise SupervisorError(f"supervisord is not running (no socket {self.socket_path})")
        transport = _UnixTransport(str(self.socket_path))
        try:
            proxy = xmlrpc.client.ServerProxy("http://127.0.0.1", transport=transport)
            return getattr(proxy, method)(*args)
        except (xmlrpc.client.ProtocolError, http.client.HTTPException) as exc:
            raise SupervisorError(f"supervisord at {self.socket_path}: {exc!r}") from None
        except xmlrpc.client.Fault as fault:
            if fault.faultCode == Faults.SHUTDOWN_STATE:  # on its way out: as good as gone
                raise SupervisorError(
                    f"supervisord at {self.socket_path} is shutting down"
                ) from None
            raise
        finally:
            transport.close()

    def _main_config(self) -> str:
        sock = _value(str(self.socket_path))
        return "\n".join(
            [
                "; written by dagster_project.core.platform.supervision; do not edit",
                "[unix_http_server]",
                f"file={sock}",
                "chmod=0700",
                "",
                "[supervisord]",
                f"logfile={_value(str(self.logfile))}",
                "logfile_maxbytes=5MB",
                "logfile_backups=2",
                f"pidfile={_value(str(self.pidfile))}",
                f"childlogdir={_value(str(self.logs_dir))}",
                f"directory={_value(str(self.dir))}",
                "nodaemon=false",
                "minfds=256",
                "minprocs=64",
                "umask=022",
                "",
                "[rpcinterface:supervisor]",
                "supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface",
                "",
                "[supervisorctl]",
                f"serverurl=unix://{sock}",
                "",
                "[include]",
                f"files={_value(str(self.programs_dir))}/*.conf",
                "",
            ]
        )

    def _program_config(
        self,
        name: str,
        argv: Sequence[str],
        env: Mapping[str, str],
        cwd: Path,
        log_path: Path,
    ) -> str:
        return "\n".join(
            [
                f"[program:{name}]",
                f"command={_value(shlex.join(argv))}",
                f"directory={_value(str(cwd))}",
                f"environment={_environment(env)}",
                "autostart=true",
                "autorestart=true",
                f"startsecs={START_SECONDS}",
                f"startretries={START_RETRIES}",
                "stopsignal=TERM",
                f"stopwaitsecs={STOP_WAIT_SECONDS}",
                # Signals reach the program's children too; nothing outlives a stop.
                "stopasgroup=true",
                "killasgroup=true",
                "redirect_stderr=true",
                f"stdout_logfile={_value(str(log_path))}",
                "stdout_logfile_maxbytes=10MB",
                "stdout_logfile_backups=2",
                "",
            ]
        )


# -- helpers ---------------------------------------------------------------------------------


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str) -> None:
        super().__init__("localhost", timeout=RPC_TIMEOUT_SECONDS)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self._path)
        except OSError:
            sock.close()
            raise
        self.sock = sock


class _UnixTransport(SupervisorTransport):  # type: ignore[misc]
    """supervisor's own transport (as supervisorctl uses it), with a timeout so a wedged
    supervisord cannot hang the caller."""

    def __init__(self, path: str) -> None:
        super().__init__(None, None, f"unix://{path}")
        self._get_connection = lambda: _UnixConnection(path)


def _socket_path(directory: Path) -> Path:
    path = directory / "s.sock"
    if len(str(path).encode()) <= _MAX_SOCKET_PATH:
        return path
    # A deep state directory: the socket goes to the temp dir, named after the directory.
    digest = hashlib.sha256(str(directory).encode()).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / f"release-supervisor-{digest}.sock"


def _check_name(name: str) -> None:
    if not _NAME_RE.match(name):
        raise ValueError(f"program name {name!r}: letters, digits, '.', '_', '-' only")


def _value(text: str) -> str:
    """A config value as supervisor reads it back: `%` is an expansion, a `;` or `#` after
    whitespace starts a comment, a line break ends the value."""
    if _unwritable(text):
        raise ValueError(f"cannot be written to a supervisor config: {text!r}")
    return text.replace("%", "%%")


def _environment(env: Mapping[str, str]) -> str:
    """`KEY="value",...` for supervisor's `environment=` (shlex in non-POSIX mode: a quoted
    value is literal up to the same quote, so commas and `=` are safe; no escapes)."""
    pairs = []
    for key, value in sorted(env.items()):
        quote = '"' if '"' not in value else "'"
        if (
            not _ENV_NAME_RE.match(key)
            or (quote in value)
            or _unwritable(value)
            or value.endswith(("'", '"'))  # supervisor strips quote characters at the ends
            or value.startswith(("'", '"'))
        ):
            # Cannot be expressed in supervisor's syntax (exported shell functions, multi-line
            # values); the platform's own variables never look like this.
            logger.debug("environment variable %s not passed to supervised programs", key)
            continue
        pairs.append(f"{key}={quote}{value.replace('%', '%%')}{quote}")
    return ",".join(pairs)


def _unwritable(text: str) -> bool:
    # `%(here)s` is replaced by the config's directory before `%%` is unescaped, so even
    # escaped it would not survive.
    return bool(re.search(r"[\n\r\0]|\s[;#]", text)) or "%(here)s" in text


def _supervisord_env() -> dict[str, str]:
    # supervisord's own environment leaks into every program, so it gets only the basics
    # (never the guardrail token); programs get theirs through `environment=`.
    return {k: os.environ[k] for k in _SUPERVISORD_ENV if k in os.environ}


def _write_private(path: Path, text: str) -> None:
    # Program files carry database URLs: owner-only, and replaced atomically so a concurrent
    # reloadConfig never reads half a file (the temp name does not match *.conf).
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
    os.replace(tmp, path)


def _program_info(raw: dict[str, Any]) -> ProgramInfo:
    pid = int(raw.get("pid") or 0) or None
    start = float(raw["start"]) if raw.get("start") else None
    state = str(raw["statename"])
    description = str(raw.get("description") or "")
    if pid is not None and state == "RUNNING":
        if _pid_running(pid):
            # supervisord reports whole seconds; the process's own create time is finer.
            with contextlib.suppress(psutil.Error):
                start = psutil.Process(pid).create_time() + _boot_time_fraction()
        else:  # died a moment ago; supervisord has not reaped it yet
            state, description = "EXITED", f"pid {pid} exited, not yet reaped by supervisord"
    return ProgramInfo(
        name=str(raw["name"]),
        state=state,
        pid=pid,
        start=start,
        now=float(raw.get("now") or time.time()),
        description=description,
        exitstatus=int(raw.get("exitstatus") or 0),
        spawnerr=str(raw.get("spawnerr") or ""),
        log_path=str(raw.get("stdout_logfile") or ""),
    )


def _boot_time_fraction() -> float:
    """What psutil's create times lack: on Linux they count from the boot time in whole
    seconds (/proc/stat btime), so they run up to 1 s early. The boot clock knows better."""
    clock = getattr(time, "CLOCK_BOOTTIME", None)
    if clock is None:
        return 0.0
    fraction = time.time() - time.clock_gettime(clock) - psutil.boot_time()
    return fraction if 0.0 <= fraction < 1.0 else 0.0


def _pid_running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _tail(path: Path, lines: int = 10) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return f"({path}: no file)"
