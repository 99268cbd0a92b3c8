"""The local platform: real processes on 127.0.0.1 standing in for a CDN and a cluster.

Per environment (`staging`, `production`): an edge process, and per track (`stable`,
`canary`) one API process and one worker process of the deployed artifact. Which process
runs where, the traffic weights and the purge keys live in `release_control.platform.*`
(see state.py), so any process (CLI, Dagster run workers, the edges) sees the same platform.

Contract: docs/ARCHITECTURE.md, "Local platform".
"""

from __future__ import annotations

import logging
import os
import secrets
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Protocol

import httpx

from dagster_project.core import database, registry
from dagster_project.core.platform import processes
from dagster_project.core.platform.state import (
    ENVIRONMENTS,
    PURGE_KEY_HEADER,
    TRACKS,
    EnvironmentRecord,
    PlatformState,
    ProcessRecord,
    Role,
    check_env,
    check_track,
)
from dagster_project.core.settings import PROJECT_ROOT, list_products, release_home
from dagster_project.core.spec import load_spec

logger = logging.getLogger("release.platform")

STOP_TIMEOUT_SECONDS = 5.0


class PlatformError(RuntimeError):
    """A platform operation could not be done; the message says what and where."""


class ArtifactLike(Protocol):
    """What deploy needs of `registry.Artifact`."""

    @property
    def sha256(self) -> str: ...

    @property
    def version(self) -> str: ...


class LocalPlatform:
    def __init__(
        self, product_id: str | None = None, *, ready_deadline_seconds: float = 30.0
    ) -> None:
        self.product = product_id or _only_product()
        self.ready_deadline_seconds = ready_deadline_seconds
        self.spec = load_spec(self.product)
        self.state = PlatformState(self.product)

    # -- lifecycle -----------------------------------------------------------------------

    def up(self) -> dict[str, Any]:
        """Databases and both edges running; harmless when already up. Returns status()."""
        for name in (*ENVIRONMENTS, database.CONTROL_DB):
            database.ensure_database(name)
        self.state.ensure_schema()
        with self.state.lock():
            # Start both edges before waiting, so their start-ups overlap.
            starting = [edge for env in ENVIRONMENTS if (edge := self._ensure_edge(env))]
            for edge in starting:
                processes.wait_ready(
                    f"{edge.url}/_edge/health",
                    pid=edge.pid,
                    create_time=edge.create_time,
                    log_path=Path(edge.log_path),
                    what=f"edge of {edge.env}",
                    deadline_seconds=self.ready_deadline_seconds,
                )
        return self.status()

    def down(self) -> None:
        """Stop every recorded process of the platform (edges, APIs, workers), SIGTERM then
        SIGKILL, and clear the state. Postgres keeps running."""
        database.ensure_database(database.CONTROL_DB)
        self.state.ensure_schema()
        records = self.state.processes()
        killed = processes.terminate(
            [(p.pid, p.create_time) for p in records], timeout=STOP_TIMEOUT_SECONDS
        )
        survivors = [p.label for p in records if processes.is_alive(p.pid, p.create_time)]
        if survivors:
            raise PlatformError(f"down: could not stop {', '.join(survivors)}")
        self.state.remove_processes([p.id for p in records])
        self.state.delete_environments()
        if killed:
            logger.warning("down: pids %s ignored SIGTERM and were killed", killed)

    def _ensure_edge(self, env: str) -> ProcessRecord | None:
        """Leave a healthy edge alone (None); else start one and return its record."""
        record = self.state.environment(env)
        edges = self.state.processes(env, role="edge")
        live = [p for p in edges if processes.is_alive(p.pid, p.create_time)]
        if record and record.edge_url and len(live) == 1 and live[0].pid == record.edge_pid:
            ok, _ = processes.probe(f"{record.edge_url}/_edge/health")
            if ok:
                return None
        # A dead, stuck or stray edge is replaced; the purge key and weights are kept.
        processes.terminate([(p.pid, p.create_time) for p in live])
        self.state.remove_processes([p.id for p in edges])
        port = processes.free_port()
        purge_key = record.purge_key if record else secrets.token_urlsafe(32)
        self.state.upsert_environment(env, edge_port=port, edge_pid=None, purge_key=purge_key)
        argv = [
            sys.executable,
            "-m",
            "dagster_project.core.platform.edge",
            "--product",
            self.product,
            "--env",
            env,
            "--port",
            str(port),
        ]
        started = processes.start_detached(
            argv,
            log_name=f"{self.product}-{env}-edge",
            env=_child_env({}),
            cwd=PROJECT_ROOT,
        )
        edge = self.state.add_process(
            env=env,
            track=None,
            role="edge",
            status="serving",
            pid=started.pid,
            create_time=started.create_time,
            port=port,
            log_path=str(started.log_path),
            command=started.command,
        )
        self.state.set_edge_pid(env, started.pid)
        return edge

    # -- releases ------------------------------------------------------------------------

    def deploy(self, env: str, track: str, artifact: ArtifactLike) -> dict[str, Any]:
        """Start an API and a worker of `artifact` on env/track, wait until the API is ready,
        route the track to it, then stop what served that track before."""
        check_env(env)
        check_track(track)
        self._require_up(env)
        deploy_dir = materialize(artifact)
        with self.state.lock():
            started = self._start_release(
                env, track, deploy_dir, version=artifact.version, artifact_sha=artifact.sha256
            )
            self.state.switch_serving(env, track, [p.id for p in started])
            self._push_routes(env)
            self._stop_status(env, "retiring")
        api = next(p for p in started if p.role == "api")
        return {
            "env": env,
            "track": track,
            "version": artifact.version,
            "artifact_sha": artifact.sha256,
            "api_url": api.url,
            "pids": {p.role: p.pid for p in started},
            "deploy_dir": str(deploy_dir),
        }

    def _start_release(
        self, env: str, track: str, deploy_dir: Path, *, version: str, artifact_sha: str
    ) -> list[ProcessRecord]:
        """Start api + worker (recorded as `starting`); on failure stop them and raise."""
        port = processes.free_port()
        service_env = _child_env(
            {
                "SERVICE_DATABASE_URL": database.server().dsn(env),
                "SERVICE_VERSION": version,
                "SERVICE_TRACK": track,
                "SERVICE_MANIFEST": str(deploy_dir / "manifest.json"),
                # The release's own spec (shipped in the artifact) when it carries one.
                "SERVICE_PRODUCT_SPEC": str(
                    deploy_dir / "product.yaml"
                    if (deploy_dir / "product.yaml").is_file()
                    else self.spec.source_path
                ),
            }
        )
        service_dir = deploy_dir / self.spec.service_dir
        commands: dict[Role, list[str]] = {
            "api": [
                sys.executable,
                "-m",
                "uvicorn",
                "api:app",
                "--app-dir",
                str(service_dir),
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--no-access-log",
            ],
            "worker": [sys.executable, str(service_dir / "worker.py")],
        }
        records: list[ProcessRecord] = []
        try:
            for role, argv in commands.items():
                started = processes.start_detached(
                    argv,
                    log_name=f"{self.product}-{env}-{track}-{role}-{version}",
                    env=service_env,
                    cwd=deploy_dir,
                )
                records.append(
                    self.state.add_process(
                        env=env,
                        track=track,
                        role=role,
                        status="starting",
                        pid=started.pid,
                        create_time=started.create_time,
                        port=port if role == "api" else None,
                        version=version,
                        artifact_sha=artifact_sha,
                        deploy_dir=str(deploy_dir),
                        log_path=str(started.log_path),
                        command=started.command,
                    )
                )
            api, worker = records
            processes.wait_ready(
                f"{api.url}/readyz",
                pid=api.pid,
                create_time=api.create_time,
                log_path=Path(api.log_path),
                what=f"api {version} of {env}/{track}",
                deadline_seconds=self.ready_deadline_seconds,
            )
            if not processes.is_alive(worker.pid, worker.create_time):
                raise processes.ProcessStartError(
                    f"worker {version} of {env}/{track} (pid {worker.pid}) exited at start; "
                    f"see its log {worker.log_path}:\n"
                    f"{processes.log_tail(Path(worker.log_path))}"
                )
        except BaseException:
            processes.terminate([(p.pid, p.create_time) for p in records])
            self.state.remove_processes([p.id for p in records])
            raise
        return records

    def set_weights(self, env: str, weights: dict[str, int]) -> dict[str, Any]:
        """Store the traffic split and push it to the edge at once."""
        check_env(env)
        full = self._validated_weights(env, weights)
        generation = self.state.set_weights(env, full)
        self._push_routes(env)
        return {"env": env, "weights": full, "generation": generation}

    def _validated_weights(self, env: str, weights: dict[str, int]) -> dict[str, int]:
        unknown = sorted(set(weights) - set(TRACKS))
        if unknown:
            raise ValueError(
                f"weights for {env}: unknown track(s) {unknown}; tracks are {', '.join(TRACKS)}"
            )
        full = {track: weights.get(track, 0) for track in TRACKS}
        for track, weight in full.items():
            if isinstance(weight, bool) or not isinstance(weight, int) or not 0 <= weight <= 100:
                raise ValueError(
                    f"weights for {env}: {track} must be an integer 0..100, got {weight!r}"
                )
        if sum(full.values()) != 100:
            raise ValueError(f"weights for {env} must add up to 100, got {full}")
        serving = self.current(env)
        missing = [t for t, w in full.items() if w > 0 and t not in serving]
        if missing:
            raise PlatformError(
                f"weights for {env}: no release is deployed on track(s) {missing}; "
                "deploy one before sending it traffic"
            )
        return full

    def rollback(self, env: str) -> dict[str, Any]:
        """All traffic to stable (pushed to the edge first), then the canary is stopped."""
        check_env(env)
        started = time.monotonic()
        generation = self.state.set_weights(env, {"stable": 100, "canary": 0})
        push_errors: list[PlatformError] = []
        try:
            self._push_routes(env)
        except PlatformError as exc:  # still stop the canary; the edge reloads state anyway
            push_errors.append(exc)
        switched = time.monotonic() - started
        with self.state.lock():
            self.state.mark_retiring([p.id for p in self.state.processes(env, track="canary")])
            self.state.bump_generation(env)
            stopped = self._stop_status(env, "retiring")
        try:
            self._push_routes(env)  # the edge forgets the stopped canary upstream
        except PlatformError as exc:
            push_errors.append(exc)
        if push_errors:
            raise push_errors[0]
        return {
            "env": env,
            "weights": {"stable": 100, "canary": 0},
            "generation": generation,
            "switch_seconds": round(switched, 4),
            "seconds": round(time.monotonic() - started, 4),
            "stopped_pids": stopped,
            "stable_serving": "stable" in self.current(env),
        }

    def promote(self, env: str) -> dict[str, Any]:
        """The canary's release becomes stable at 100%; the old stable and the canary
        processes are retired. Stable processes are started fresh from the canary's artifact
        so their metrics carry track="stable"."""
        check_env(env)
        self._require_up(env)
        with self.state.lock():
            canary_api = self.state.processes(env, track="canary", role="api", status="serving")
            if not canary_api:
                raise PlatformError(f"promote {env}: no canary release is serving to promote")
            source = canary_api[0]
            assert source.deploy_dir and source.version and source.artifact_sha
            retired_version = self.current(env).get("stable", {}).get("version")
            started = self._start_release(
                env,
                "stable",
                Path(source.deploy_dir),
                version=source.version,
                artifact_sha=source.artifact_sha,
            )
            self.state.switch_serving(env, "stable", [p.id for p in started])
            self.state.mark_retiring([p.id for p in self.state.processes(env, track="canary")])
            generation = self.state.set_weights(env, {"stable": 100, "canary": 0})
            self._push_routes(env)
            stopped = self._stop_status(env, "retiring")
        return {
            "env": env,
            "version": source.version,
            "artifact_sha": source.artifact_sha,
            "retired_version": retired_version,
            "stopped_pids": stopped,
            "weights": {"stable": 100, "canary": 0},
            "generation": generation,
        }

    def _stop_status(self, env: str, status: str) -> list[int]:
        doomed = self.state.processes(env, status=status)
        processes.terminate([(p.pid, p.create_time) for p in doomed], timeout=STOP_TIMEOUT_SECONDS)
        self.state.remove_processes([p.id for p in doomed])
        return [p.pid for p in doomed]

    # -- edge operations -----------------------------------------------------------------

    def _edge_call(self, env: str, path: str, payload: dict[str, Any]) -> dict[str, Any]:
        record = self._require_up(env)
        url = f"{record.edge_url}{path}"
        try:
            response = httpx.post(
                url,
                json=payload,
                headers={PURGE_KEY_HEADER: record.purge_key},
                timeout=2.0,
                trust_env=False,
            )
        except httpx.HTTPError as exc:
            raise PlatformError(
                f"edge of {env} unreachable at {url}: {type(exc).__name__}"
            ) from None
        if response.status_code != 200:
            raise PlatformError(
                f"edge of {env} refused POST {url}: HTTP {response.status_code} {response.text}"
            )
        result: dict[str, Any] = response.json()
        return result

    def _push_routes(self, env: str) -> None:
        self._edge_call(env, "/_edge/routes", self.state.routes(env))

    def purge(self, env: str, url: str | None = None, surrogate_key: str | None = None) -> int:
        """Purge the env's edge cache by URL (path and query; all tracks) or surrogate key."""
        check_env(env)
        if (url is None) == (surrogate_key is None):
            raise ValueError("purge: give exactly one of url= or surrogate_key=")
        payload = {"url": url} if url is not None else {"surrogate_key": surrogate_key}
        return int(self._edge_call(env, "/_edge/purge", payload)["purged"])

    # -- queries -------------------------------------------------------------------------

    def _require_up(self, env: str) -> EnvironmentRecord:
        check_env(env)
        record = self.state.environment(env)
        if record is None or not record.edge_url:
            raise PlatformError(
                f"environment {env} of {self.product} is not up: run `release platform up`"
            )
        return record

    def edge_url(self, env: str) -> str:
        return str(self._require_up(env).edge_url)

    def api_urls(self, env: str) -> dict[str, str]:
        check_env(env)
        return {
            p.track: p.url
            for p in self.state.processes(env, role="api", status="serving")
            if p.track and p.url
        }

    def current(self, env: str) -> dict[str, dict[str, str | None]]:
        check_env(env)
        return {
            p.track: {"version": p.version, "artifact_sha": p.artifact_sha}
            for p in self.state.processes(env, role="api", status="serving")
            if p.track
        }

    def status(self) -> dict[str, Any]:
        """Per environment: edge, weights, tracks, problems; `healthy` only when the edge
        answers and every recorded process is alive (and every API ready)."""
        database.ensure_database(database.CONTROL_DB)
        self.state.ensure_schema()
        return {env: self._env_status(env) for env in ENVIRONMENTS}

    def _env_status(self, env: str) -> dict[str, Any]:
        record = self.state.environment(env)
        records = self.state.processes(env)
        problems: list[str] = []
        if record is None:
            problems.append(f"environment {env} is not up: run `release platform up`")
        edge_info: dict[str, Any] = {"url": None, "pid": None, "alive": False, "ready": False}
        for proc in (p for p in records if p.role == "edge"):
            alive = processes.is_alive(proc.pid, proc.create_time)
            ready = False
            if alive:
                ready, why = processes.probe(f"{proc.url}/_edge/health")
                if not ready:
                    problems.append(f"{proc.label}: {why}")
            else:
                problems.append(f"{proc.label} is not running; see its log {proc.log_path}")
            edge_info = {"url": proc.url, "pid": proc.pid, "alive": alive, "ready": ready}
        if record is not None and not any(p.role == "edge" for p in records):
            problems.append(f"edge of {env} has no recorded process: run `release platform up`")

        tracks: dict[str, Any] = {}
        for track in TRACKS:
            serving = [p for p in records if p.track == track and p.status == "serving"]
            if not serving:
                continue
            pids: dict[str, int] = {}
            alive_all, ready = True, False
            api = None
            for proc in serving:
                pids[proc.role] = proc.pid
                alive = processes.is_alive(proc.pid, proc.create_time)
                alive_all = alive_all and alive
                if not alive:
                    problems.append(f"{proc.label} is not running; see its log {proc.log_path}")
                elif proc.role == "api":
                    ready, why = processes.probe(f"{proc.url}/readyz")
                    if not ready:
                        problems.append(f"{proc.label} not ready: {why}")
                if proc.role == "api":
                    api = proc
            for role in ("api", "worker"):
                if role not in pids:
                    problems.append(f"{env}/{track} has no {role} process recorded")
            tracks[track] = {
                "version": serving[0].version,
                "artifact_sha": serving[0].artifact_sha,
                "api_url": api.url if api else None,
                "pids": pids,
                "alive": alive_all and {"api", "worker"} <= set(pids),
                "ready": ready,
            }
        for proc in records:
            if proc.status != "serving":
                problems.append(
                    f"{proc.label} is {proc.status}: an operation is in progress or was "
                    "interrupted (`release platform down` clears it)"
                )
        return {
            "product": self.product,
            "env": env,
            "edge_url": record.edge_url if record else None,
            "edge": edge_info,
            "healthy": not problems,
            "database": database.server().display_url(env),
            "weights": record.weights if record else None,
            "tracks": tracks,
            "problems": problems,
        }


# -- helpers ---------------------------------------------------------------------------------


def _only_product() -> str:
    products = list_products()
    if len(products) != 1:
        raise PlatformError(
            f"LocalPlatform needs a product id: products found {products or 'none'}"
        )
    return products[0]


def _child_env(extra: dict[str, str]) -> dict[str, str]:
    # Children inherit RELEASE_HOME / RELEASE_DATABASE_URL / RELEASE_DB_PREFIX so they reach
    # the same Postgres; the guardrail token is never handed to platform processes.
    env = {k: v for k, v in os.environ.items() if k != "GUARDRAIL_TOKEN"}
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


def materialize(artifact: ArtifactLike) -> Path:
    """Fetch the artifact from the registry (so only pushed artifacts are deployed) and
    extract it, verified, into `$RELEASE_HOME/deployments/<sha>/` once."""
    target = release_home() / "deployments" / artifact.sha256
    if (target / "manifest.json").is_file():
        return target
    stored = registry.fetch(artifact.sha256)
    partial = target.with_name(f".{artifact.sha256}.{os.getpid()}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    registry.extract(stored, partial)
    if not (partial / "manifest.json").is_file():
        shutil.rmtree(partial, ignore_errors=True)
        raise PlatformError(f"artifact {stored.path}: no manifest.json at the archive root")
    try:
        partial.rename(target)
    except OSError:  # another process extracted it first
        shutil.rmtree(partial, ignore_errors=True)
    return target
