"""The local platform: real processes on 127.0.0.1 standing in for a CDN and a cluster.

Per environment (`staging`, `production`): an edge process, and per track (`stable`,
`canary`) one API process and one worker process of the deployed artifact. Every process is
a program of the state directory's supervisord (supervision.py), which restarts a crashed one
with the same command line, so an edge URL and a track's API URL never change. Which program
runs where, the traffic weights and the purge keys live in `release_control.platform.*` (see
state.py), so any process (CLI, Dagster run workers, the edges) sees the same platform; pids
and liveness come from supervisord. Traffic only goes to a track whose API is ready.

Contract: docs/ARCHITECTURE.md, "Local platform".
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import os
import secrets
import shlex
import sys
import time
from pathlib import Path
from typing import Any, Protocol

import httpx

from dagster_project.core import database, httpclient, registry
from dagster_project.core.platform import edges, processes
from dagster_project.core.platform.errors import PlatformError
from dagster_project.core.platform.prometheus import PrometheusInstance
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
from dagster_project.core.platform.supervision import Supervisor
from dagster_project.core.settings import PROJECT_ROOT, list_products, release_home
from dagster_project.core.spec import load_spec

logger = logging.getLogger("release.platform")

# Start times are precise to a clock tick (10 ms): a start within this of another is the same.
START_TOLERANCE_SECONDS = 0.05


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
        self.supervisor = Supervisor(release_home())
        self.state = PlatformState(self.product, live=self.supervisor.all_info)

    # -- lifecycle -----------------------------------------------------------------------

    def up(self) -> dict[str, Any]:
        """Databases, supervisord and both edges running; harmless when already up (a
        stopped or given-up serving process is started again, on its port). Returns
        status()."""
        edges.require_installed(self.spec, ENVIRONMENTS)  # before any work: names the package
        for env in ENVIRONMENTS:  # the product's own databases, one per environment
            database.ensure_database(self.database(env))
        database.ensure_database(database.CONTROL_DB)
        self.state.ensure_schema()
        self.supervisor.ensure_running()
        if any(edges.metrics_kind(self.spec, env) == "prometheus" for env in ENVIRONMENTS):
            self._ensure_prometheus()
        with self.state.lock():
            self._ensure_validator()  # under the lock: two ups at once add it once
            # Start both edges before waiting, so their start-ups overlap.
            starting = [edge for env in ENVIRONMENTS if (edge := self._ensure_edge(env))]
            for edge in starting:
                self._wait_ready(edge, f"{edge.url}/_edge/health", f"edge of {edge.env}")
            self._note_ready(starting)
            for proc in self.state.processes(status="serving"):
                if proc.role != "edge" and proc.program:
                    try:
                        self._revive(proc)
                    except PlatformError as exc:  # status() lists it; the edges are up
                        logger.warning("up: %s", exc)
            for env in ENVIRONMENTS:
                self._write_targets(env)
        return self.status()

    def down(self) -> None:
        """Stop every process of the product (edges, APIs, workers) through supervisord and
        clear the state; supervisord itself exits once no product has a program left.
        Postgres keeps running."""
        self.state.ensure_schema()  # creates the control database if missing
        with self.state.lock():
            records = self.state.processes()
            seen = [(p.pid, p.create_time, p.label) for p in records if p.pid]
            for proc in records:
                if proc.program:
                    self.supervisor.remove_program(proc.program)
            for name in self._programs(f"{self.product}."):
                info = self.supervisor.remove_program(name)
                if info and info.pid:
                    seen.append((info.pid, info.create_time, f"program {name}"))
            survivors = [label for pid, ct, label in seen if processes.is_alive(pid, ct)]
            if survivors:
                raise PlatformError(f"down: could not stop {', '.join(survivors)}")
            self.state.remove_processes([p.id for p in records])
            self.state.delete_environments()
            # What the edges and Prometheus kept on disk (VCL, admin secret, TSDB) goes too.
            for env in ENVIRONMENTS:
                self._edge_impl(env, "varnish", 0, "").remove_files()
            self._prometheus().remove_files()
            for parent in ("varnish", "prometheus"):  # gone once no product has files there
                with contextlib.suppress(OSError):
                    (release_home() / parent).rmdir()
        if not self.supervisor.shutdown_if_idle():
            logger.info("down: supervisord keeps running programs of other products")

    def _programs(self, prefix: str) -> list[str]:
        """Program names supervisord runs or has a file for, starting with `prefix`."""
        names = set(self.supervisor.all_info()) | set(self.supervisor.program_files())
        return sorted(n for n in names if n.startswith(prefix))

    def _ensure_edge(self, env: str) -> ProcessRecord | None:
        """None when the env's edge answers; else its record after making supervisord run
        it (same port when the environment has one)."""
        record = self.state.environment(env)
        kind = edges.edge_kind(self.spec, env)
        recorded = self.state.processes(env, role="edge")
        usable = [
            p
            for p in recorded
            if record
            and p.program
            and p.port == record.edge_port
            and edges.kind_of_program(p.program) == kind
        ][-1:]
        stale = [p for p in recorded if p not in usable]
        for proc in stale:  # an edge of the other kind (the choice changed), or a lost one
            if proc.program:
                self.supervisor.remove_program(proc.program)
                if edges.kind_of_program(proc.program) != kind:
                    self._edge_impl(env, edges.kind_of_program(proc.program), 0, "").remove_files()
        self.state.remove_processes([p.id for p in stale])
        if usable:
            edge = usable[0]
            if edge.info is not None and edge.info.running:
                ok, _ = processes.probe(f"{edge.url}/_edge/health")
                if ok:
                    return None
            assert record is not None
            impl = self._edge_impl(env, kind, int(str(edge.port)), record.purge_key)
            impl.prepare(self.state.routes(env))  # a restart loads the current routes
            if edge.info is None and not self.supervisor.readd_program(str(edge.program)):
                self._add_edge_program(str(edge.program), impl)
            else:
                self._revive(edge)
            return edge
        port = record.edge_port if record and record.edge_port else processes.free_port()
        purge_key = record.purge_key if record else secrets.token_urlsafe(32)
        self.state.upsert_environment(env, edge_port=port, purge_key=purge_key)
        impl = self._edge_impl(env, kind, port, purge_key)
        impl.prepare(self.state.routes(env))
        name = edges.program_name(self.product, env, kind)
        edge = self.state.add_process(
            env=env,
            track=None,
            role="edge",
            status="serving",
            program=name,
            port=port,
            log_path=str(self.supervisor.log_path(name)),
            command=shlex.join(impl.argv()),
        )
        try:
            self._add_edge_program(name, impl)
        except BaseException:
            self.state.remove_processes([edge.id])
            raise
        return edge

    def _edge_impl(self, env: str, kind: str, port: int, purge_key: str) -> edges.Edge:
        """The edge of `kind` for env (edges.py): its command line, routes and purges."""

        def call(path: str, payload: dict[str, Any], headers: dict[str, str]) -> dict[str, Any]:
            return self._edge_call(env, path, payload, headers)

        if kind == "varnish":
            return edges.VarnishEdge(self.spec, env, port, purge_key, release_home(), call)
        return edges.EmbeddedEdge(self.product, env, port, call)

    def _edge(self, env: str) -> edges.Edge:
        """The edge env runs now (whatever this process would choose: the recorded one)."""
        record = self._require_up(env)
        recorded = self.state.processes(env, role="edge")
        kind = edges.kind_of_program(recorded[-1].program if recorded else None)
        return self._edge_impl(env, kind, int(record.edge_port or 0), record.purge_key)

    def _add_edge_program(self, name: str, impl: edges.Edge) -> None:
        self.supervisor.add_program(name, impl.argv(), env=_child_env({}), cwd=PROJECT_ROOT)

    # -- the data-quality validator -----------------------------------------------------

    def _ensure_validator(self) -> None:
        """The product's data-quality validator (data_quality.serve_platform) running: it
        imports Great Expectations once, so a release's gate does not. Not waited for: until
        its socket appears, a gate validates in a child of its own."""
        # Here, not at the top: the module imports SQLAlchemy, which `release status` skips.
        from dagster_project.core import data_quality

        name = f"{self.product}.validator"
        info = self.supervisor.info(name)
        if info is None:
            self.supervisor.add_program(
                name, data_quality.platform_argv(self.product), env=_child_env({}), cwd=PROJECT_ROOT
            )
        elif info.state in ("STOPPED", "FATAL", "EXITED"):
            self.supervisor.start(name)

    # -- Prometheus ----------------------------------------------------------------------

    def _prometheus(self) -> PrometheusInstance:
        return PrometheusInstance(self.product, release_home() / "prometheus" / self.product)

    def _ensure_prometheus(self) -> None:
        """Prometheus of this product running and ready (same port across restarts)."""
        instance = self._prometheus()
        argv = instance.argv()
        info = self.supervisor.info(instance.program)
        if info is None:
            self.supervisor.add_program(
                instance.program, argv, env=_child_env({}), cwd=instance.home
            )
        elif info.state in ("STOPPED", "FATAL", "EXITED"):
            self.supervisor.start(instance.program)
        try:
            processes.wait_ready(
                f"{instance.url}/-/ready",
                problem=lambda: self._problem(instance.program),
                log_path=self.supervisor.log_path(instance.program),
                what=f"Prometheus of {self.product} (program {instance.program})",
                deadline_seconds=self.ready_deadline_seconds,
            )
        except processes.ProcessStartError as exc:
            raise PlatformError(str(exc)) from None

    def _write_targets(self, env: str) -> None:
        """Prometheus's service discovery for env: its serving APIs (when Prometheus runs
        for this product). Every routing change calls it, so deploy, rollback and promote
        rewrite it."""
        instance = self._prometheus()
        if instance.config_path.is_file():
            instance.write_targets(env, self.state.processes(env, status="serving"))

    def prometheus_url(self) -> str:
        """Where this product's Prometheus answers; PlatformError when it does not run."""
        instance = self._prometheus()
        info = self.supervisor.info(instance.program)
        # Running, or being restarted by supervisord (queries meanwhile fail: fail closed).
        if instance.url is None or info is None or not (info.running or info.restarting):
            raise PlatformError(
                f"Prometheus of {self.product} is not running (program {instance.program}): "
                f"run `release platform up` with {edges.METRICS_VARIABLE}=prometheus or the "
                "spec's platform.<env>.metrics: prometheus"
            )
        return instance.url

    def metrics_source(self, env: str) -> Any:
        """Where the canary judge reads env's metrics (`core/canary/metrics.MetricsSource`):
        the APIs' own /metrics, or PromQL on the platform's Prometheus, limited to env's
        serving API of each track."""
        from dagster_project.core.canary import metrics

        urls, workers = self.api_urls(env), self.worker_metrics_urls(env)
        if edges.metrics_kind(self.spec, env) == "scrape":
            return metrics.LocalScrapeSource(urls, worker_urls=workers)

        def hosts(by_track: dict[str, str]) -> dict[str, str]:
            return {track: url.removeprefix("http://") for track, url in by_track.items()}

        return metrics.PrometheusSource(
            self.prometheus_url(),
            selector=f'product="{self.product}",env="{env}"',
            instances=hosts(urls),
            worker_instances=hosts(workers),
        )

    # -- supervision helpers -------------------------------------------------------------

    def _revive(self, proc: ProcessRecord) -> None:
        """Have supervisord run `proc` again if it is stopped, given up or unknown to it (a
        restarting one is left to supervisord). Raises PlatformError if it cannot be."""
        if not proc.program:
            raise PlatformError(
                f"{proc.label} is not supervised (recorded by an older platform version): "
                "run `release platform down`, then `up`"
            )
        info = self.supervisor.info(proc.program)
        if info is None:
            if not self.supervisor.readd_program(proc.program):
                raise PlatformError(
                    f"{proc.label}: its program file "
                    f"{self.supervisor.program_path(proc.program)} is gone, so supervisord "
                    "cannot restart it"
                )
        elif info.state in ("STOPPED", "FATAL", "EXITED"):
            logger.warning("starting %s again (it was %s)", proc.label, info.state)
            self.supervisor.start(proc.program)

    def _problem(self, program: str | None) -> str | None:
        """Why waiting for `program` is pointless, or None while it runs or restarts."""
        if not program:
            return "is not supervised"
        info = self.supervisor.info(program)
        if info is None:
            return f"is not known to supervisord (program {program})"
        if info.state == "FATAL":
            return f"was given up by supervisord ({info.description or info.spawnerr})"
        if info.state in ("STOPPED", "STOPPING"):
            return "was stopped"
        return None

    def _wait_ready(
        self, proc: ProcessRecord, url: str, what: str, deadline: float | None = None
    ) -> None:
        processes.wait_ready(
            url,
            problem=lambda: self._problem(proc.program),
            log_path=proc.log_path,
            what=f"{what} (program {proc.program})",
            deadline_seconds=self.ready_deadline_seconds if deadline is None else deadline,
        )

    def _wait_running(self, proc: ProcessRecord, what: str, deadline: float | None = None) -> None:
        """Until supervisord counts `proc` as started (up for `startsecs`)."""
        seconds = self.ready_deadline_seconds if deadline is None else deadline
        until = time.monotonic() + seconds
        while True:
            info = self.supervisor.info(str(proc.program))
            if info is not None and info.running:
                return
            problem = self._problem(proc.program)
            if problem or time.monotonic() >= until:
                state = info.state if info else "unknown"
                raise processes.ProcessStartError(
                    f"{what} (program {proc.program}) "
                    f"{problem or f'is still {state} after {seconds:.0f}s'}; see its log "
                    f"{proc.log_path}:\n{processes.log_tail(proc.log_path)}"
                )
            time.sleep(0.1)

    def _note_ready(self, records: list[ProcessRecord]) -> None:
        """Wait until supervisord counts each ready process as RUNNING (it may answer
        before `startsecs`), and remember that spawn, so a later one shows as a restart."""
        starts = {}
        for proc in records:
            self._wait_running(proc, proc.label)
            info = self.supervisor.info(str(proc.program))
            if info is not None and info.running and info.start is not None:
                starts[proc.id] = info.start
        self.state.set_ready_start(starts)

    def ensure_ready(self, env: str, track: str, deadline_seconds: float | None = None) -> None:
        """Wait until the release serving env/track is running and its API answers /readyz
        (a stopped or given-up process is started again first); PlatformError otherwise."""
        check_env(env)
        check_track(track)
        deadline = self.ready_deadline_seconds if deadline_seconds is None else deadline_seconds
        serving = self.state.processes(env, track=track, status="serving")
        api = next((p for p in serving if p.role == "api"), None)
        if api is None:
            raise PlatformError(f"{env}/{track}: no release is serving on this track")
        began = time.monotonic()
        try:
            for proc in serving:
                self._revive(proc)
            what = f"api {api.version} of {env}/{track}"
            self._wait_ready(api, f"{api.url}/readyz", what, deadline)
            for worker in (p for p in serving if p.role == "worker"):
                left = max(0.5, deadline - (time.monotonic() - began))
                self._wait_running(worker, f"worker {worker.version} of {env}/{track}", left)
        except (processes.ProcessStartError, PlatformError) as exc:
            raise PlatformError(f"{env}/{track} is not ready: {exc}") from None

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
        live = {p.role: p.pid for p in self.state.processes(env, track=track, status="serving")}
        return {
            "env": env,
            "track": track,
            "version": artifact.version,
            "artifact_sha": artifact.sha256,
            "api_url": api.url,
            "pids": live,
            "programs": {p.role: p.program for p in started},
            "deploy_dir": str(deploy_dir),
        }

    def _start_release(
        self, env: str, track: str, deploy_dir: Path, *, version: str, artifact_sha: str
    ) -> list[ProcessRecord]:
        """Add api + worker programs (recorded as `starting`) and wait until the API is
        ready and the worker stays up; on failure remove them and raise. Callers hold the
        state lock, so `reap_orphans` never takes a release that is still starting."""
        port = processes.free_port()
        metrics_port = processes.free_port()  # the worker's /metrics (the canary judges it)
        service_env = _child_env(
            {
                "SERVICE_DATABASE_URL": database.server().dsn(self.database(env)),
                "SERVICE_VERSION": version,
                "SERVICE_TRACK": track,
                "SERVICE_MANIFEST": str(deploy_dir / "manifest.json"),
                # The release's own spec (shipped in the artifact) when it carries one.
                "SERVICE_PRODUCT_SPEC": str(
                    deploy_dir / "product.yaml"
                    if (deploy_dir / "product.yaml").is_file()
                    else self.spec.source_path
                ),
                # The API's fault drill endpoint (the staging smoke opens its circuit
                # breaker with it); never on production.
                "SERVICE_FAULT_INJECTION": "1" if env == "staging" else "0",
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
        ports: dict[Role, int] = {"api": port, "worker": metrics_port}
        suffix = secrets.token_hex(3)
        records: list[ProcessRecord] = []
        try:
            for role, argv in commands.items():
                name = f"{self.product}.{env}.{track}-{role}.{suffix}"
                # Recorded before supervisord starts it, so nothing runs unrecorded.
                records.append(
                    self.state.add_process(
                        env=env,
                        track=track,
                        role=role,
                        status="starting",
                        program=name,
                        port=ports[role],
                        version=version,
                        artifact_sha=artifact_sha,
                        deploy_dir=str(deploy_dir),
                        log_path=str(self.supervisor.log_path(name)),
                        command=shlex.join(argv),
                    )
                )
                program_env = service_env
                if role == "worker":
                    program_env = {**service_env, "SERVICE_METRICS_PORT": str(metrics_port)}
                self.supervisor.add_program(name, argv, env=program_env, cwd=deploy_dir)
            api, worker = records
            self._wait_ready(api, f"{api.url}/readyz", f"api {version} of {env}/{track}")
            self._wait_ready(worker, f"{worker.url}/metrics", f"worker {version} of {env}/{track}")
            self._wait_running(worker, f"worker {version} of {env}/{track}")
            self._note_ready(records)
        except BaseException:
            for proc in records:
                self.supervisor.remove_program(str(proc.program))
            self.state.remove_processes([p.id for p in records])
            raise
        return records

    def set_weights(self, env: str, weights: dict[str, int]) -> dict[str, Any]:
        """Store the traffic split and push it to the edge at once. Every track given
        traffic must be ready (waited for within `ready_deadline_seconds`); if one is not,
        nothing changes and PlatformError says why."""
        check_env(env)
        full = self._validated_weights(env, weights)
        self._require_ready_tracks(env, full, f"weights {full} not applied")
        generation = self.state.set_weights(env, full)
        self._push_routes(env)
        return {"env": env, "weights": full, "generation": generation}

    def _require_ready_tracks(self, env: str, weights: dict[str, int], refused: str) -> None:
        for track, weight in weights.items():
            if weight <= 0:
                continue
            try:
                self.ensure_ready(env, track)
            except PlatformError as exc:
                record = self.state.environment(env)
                kept = {t: record.weights.get(t, 0) for t in TRACKS} if record else None
                raise PlatformError(
                    f"{refused}: {exc}; the last ready routing {kept} of {env} is kept"
                ) from None

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
        """All traffic to stable (pushed to the edge first), then the canary is stopped.

        Stable must be ready first: one that supervisord is restarting is waited for (within
        `ready_deadline_seconds`), a stopped or given-up one is started again. If it cannot
        be made ready, the routing is left as it was (the canary keeps serving) and
        PlatformError says so. With no stable release at all (a first release), the canary
        is stopped and the edge answers 503."""
        check_env(env)
        started = time.monotonic()
        if "stable" in self.current(env):
            self._require_ready_tracks(
                env, {"stable": 100}, f"rollback of {env} refused to switch to stable"
            )
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
        so their metrics carry track="stable"; traffic moves only once they are ready.

        An old stable that carries no traffic (the canary at 100%, as after the promotion's
        watch) is stopped first, so env never runs three releases at once (a promotion's
        memory is a first release's). Should the fresh stable then fail to start, the old one
        is started again before the error is raised: a caller's rollback still has it."""
        check_env(env)
        self._require_up(env)
        with self.state.lock():
            canary_api = self.state.processes(env, track="canary", role="api", status="serving")
            if not canary_api:
                raise PlatformError(f"promote {env}: no canary release is serving to promote")
            source = canary_api[0]
            retired_version = self.current(env).get("stable", {}).get("version")
            idle = self._idle_stable(env)
            if idle:
                self.ensure_ready(env, "canary")  # all of production while stable restarts
            stopped: list[int] = []
            try:
                if idle:
                    self.state.mark_retiring([p.id for p in idle])
                    self.state.bump_generation(env)
                    stopped = self._stop_status(env, "retiring")
                    # It carried no traffic: an edge that missed this push reloads its routes.
                    with contextlib.suppress(PlatformError):
                        self._push_routes(env)
                started = self._start_stable_of(env, source)
            except BaseException:
                if idle:
                    self._restart_stable(env, idle)
                raise
            self.state.switch_serving(env, "stable", [p.id for p in started])
            self.state.mark_retiring([p.id for p in self.state.processes(env, track="canary")])
            generation = self.state.set_weights(env, {"stable": 100, "canary": 0})
            self._push_routes(env)
            stopped += self._stop_status(env, "retiring")
        return {
            "env": env,
            "version": source.version,
            "artifact_sha": source.artifact_sha,
            "retired_version": retired_version,
            "stopped_pids": stopped,
            "weights": {"stable": 100, "canary": 0},
            "generation": generation,
        }

    def _idle_stable(self, env: str) -> list[ProcessRecord]:
        """The serving stable processes of env when the canary carries all its traffic."""
        record = self.state.environment(env)
        if record is None or record.weights.get("stable", 0) or record.weights.get("canary") != 100:
            return []
        return self.state.processes(env, track="stable", status="serving")

    def _restart_stable(self, env: str, retired: list[ProcessRecord]) -> None:
        """Start the release of `retired` (an old stable stopped by `promote`) on stable again,
        at 0%: the promotion failed and production must keep a version to return to."""
        api = next((p for p in retired if p.role == "api"), None)
        if api is None:
            return
        try:
            if self.state.processes(env, track="stable", status="serving"):
                return  # it was never stopped (the error came before)
            again = self._start_stable_of(env, api)
            self.state.switch_serving(env, "stable", [p.id for p in again])
            self._push_routes(env)
        except Exception as exc:  # the promotion's own error is the one to raise
            logger.error("restarting %s's stable %s failed: %s", env, api.version, exc)

    def _start_stable_of(self, env: str, api: ProcessRecord) -> list[ProcessRecord]:
        """A fresh api + worker on env's stable track, of the release `api` runs."""
        if not (api.deploy_dir and api.version and api.artifact_sha):
            raise PlatformError(f"{api.label}: its record names no deployment to start again")
        return self._start_release(
            env, "stable", Path(api.deploy_dir), version=api.version, artifact_sha=api.artifact_sha
        )

    def _stop_status(self, env: str, status: str) -> list[int]:
        doomed = self.state.processes(env, status=status)
        for proc in doomed:
            if proc.program:
                self.supervisor.remove_program(proc.program)
        self.state.remove_processes([p.id for p in doomed])
        return [p.pid for p in doomed if p.pid]

    def reap_orphans(self, env: str) -> list[str]:
        """Stop and forget what no serving track owns: processes left `starting` or
        `retiring` by an operation that was killed, and programs of env that no record
        names. Runs under the state lock, which every operation holds while it has such
        processes, so a live operation's processes are never taken. Returns descriptions."""
        check_env(env)
        reaped: list[str] = []
        with self.state.lock():
            records = self.state.processes(env)
            doomed = [p for p in records if p.status != "serving"]
            for proc in doomed:
                if proc.program:
                    self.supervisor.remove_program(proc.program)
                reaped.append(
                    f"stopped {proc.label}: {proc.version or ''} left {proc.status} by an "
                    "interrupted operation".replace("  ", " ")
                )
            self.state.remove_processes([p.id for p in doomed])
            known = {p.program for p in records}
            for name in self._programs(f"{self.product}.{env}."):
                if name in known:
                    continue
                info = self.supervisor.remove_program(name)
                pid = f"pid {info.pid}" if info and info.pid else "not running"
                reaped.append(f"stopped program {name} ({pid}): no platform record owns it")
        for what in reaped:
            logger.warning("reaped in %s: %s", env, what)
        return reaped

    def outages(self, env: str, since: float) -> list[str]:
        """Every serving process of env (the edge, each serving track's api and worker) that
        is not RUNNING now, or that (re)started after the epoch time `since`, described.
        Empty: no outage since `since`. A process deployed after `since` counts too."""
        check_env(env)
        found: list[str] = []
        serving = self.state.processes(env, status="serving")
        if self.state.environment(env) is None:
            found.append(f"environment {env} of {self.product} is not up")
        elif not any(p.role == "edge" for p in serving):
            found.append(f"edge of {env} has no process")
        for proc in serving:
            info = proc.info
            if info is None:
                found.append(f"{proc.label} is not running under supervisord")
            elif not info.running:
                found.append(
                    f"{proc.label} is {info.state}"
                    + (f" ({info.description})" if info.description else "")
                )
            elif info.start is not None and info.start > since - START_TOLERANCE_SECONDS:
                found.append(
                    f"{proc.label} (re)started at {_clock(info.start)}, "
                    f"{info.start - since:.1f}s after {_clock(since)}"
                )
        return found

    def kill_worker(self, env: str) -> int:
        """SIGKILL the serving stable worker of env (a crash drill: supervisord restarts it
        with the same command line); returns the pid killed. Raises when none is running."""
        import signal

        check_env(env)
        for proc in self.state.processes(env, track="stable", role="worker", status="serving"):
            if proc.pid and proc.info is not None and proc.info.running:
                os.kill(proc.pid, signal.SIGKILL)
                return proc.pid
        raise RuntimeError(f"no running stable worker serving {env} of {self.product}")

    # -- edge operations -----------------------------------------------------------------

    def _edge_call(
        self,
        env: str,
        path: str,
        payload: dict[str, Any],
        headers: dict[str, str] | None = None,
    ) -> dict[str, Any]:
        record = self._require_up(env)
        url = f"{record.edge_url}{path}"
        for attempt in (1, 2):
            try:
                response = httpclient.post(
                    url,
                    json=payload,
                    headers={**(headers or {}), PURGE_KEY_HEADER: record.purge_key},
                    timeout=2.0,
                )
                break
            except httpx.HTTPError as exc:
                edge = self.state.processes(env, role="edge")
                if attempt == 2 or not edge:
                    raise PlatformError(
                        f"edge of {env} unreachable at {url}: {type(exc).__name__}"
                    ) from None
                # supervisord may be restarting it (same port): wait for it once.
                try:
                    self._wait_ready(edge[0], f"{record.edge_url}/_edge/health", f"edge of {env}")
                except processes.ProcessStartError as down:
                    raise PlatformError(f"edge of {env} unreachable at {url}: {down}") from None
        if response.status_code != 200:
            raise PlatformError(
                f"edge of {env} refused POST {url}: HTTP {response.status_code} {response.text}"
            )
        result: dict[str, Any] = response.json()
        return result

    def _push_routes(self, env: str) -> dict[str, Any]:
        """The route table to the env's edge, and its serving APIs to Prometheus's service
        discovery."""
        self._write_targets(env)
        return self._edge(env).push_routes(self.state.routes(env))

    def purge(self, env: str, url: str | None = None, surrogate_key: str | None = None) -> int:
        """Purge the env's edge cache by URL (path and query; all tracks) or surrogate key."""
        check_env(env)
        if (url is None) == (surrogate_key is None):
            raise ValueError("purge: give exactly one of url= or surrogate_key=")
        return self._edge(env).purge(url, surrogate_key)

    # -- queries -------------------------------------------------------------------------

    def database(self, env: str) -> str:
        """The logical database of the product's environment (its own, per product)."""
        return database.environment_database(self.product, check_env(env))

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
        return self._urls(env, "api")

    def worker_metrics_urls(self, env: str) -> dict[str, str]:
        """Per track, where the serving worker answers /metrics."""
        return self._urls(env, "worker")

    def _urls(self, env: str, role: Role) -> dict[str, str]:
        check_env(env)
        return {
            p.track: p.url
            for p in self.state.processes(env, role=role, status="serving")
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
        """Per environment: edge, weights, tracks, supervisord's view of every process
        (state, pid, uptime, restarts), problems; `healthy` only when the edge answers and
        every serving process runs (and every API is ready)."""
        self.state.ensure_schema()  # creates the control database if missing
        supervisor = {
            "running": self.supervisor.is_running(),
            "pid": self.supervisor.pid(),
            "socket": str(self.supervisor.socket_path),
            "config": str(self.supervisor.config_path),
        }
        return {env: {**self._env_status(env), "supervisor": supervisor} for env in ENVIRONMENTS}

    def _env_status(self, env: str) -> dict[str, Any]:
        record = self.state.environment(env)
        records = self.state.processes(env)
        problems: list[str] = []
        restarts: list[str] = []
        if record is None:
            problems.append(f"environment {env} is not up: run `release platform up`")
        edge_info: dict[str, Any] = {"url": None, "pid": None, "alive": False, "ready": False}
        for proc in (p for p in records if p.role == "edge"):
            alive = _running(proc, problems)
            ready = False
            if alive:
                ready, why = processes.probe(f"{proc.url}/_edge/health")
                if not ready:
                    problems.append(f"{proc.label}: {why}")
            edge_info = {
                "url": proc.url,
                "alive": alive,
                "ready": ready,
                **_live(proc, restarts),
                **(self._edge(env).details() if record is not None else {}),
            }
        if record is not None and not any(p.role == "edge" for p in records):
            problems.append(f"edge of {env} has no recorded process: run `release platform up`")
        try:
            edge_info["chosen"] = edges.edge_kind(self.spec, env)
            metrics_info = self._metrics_status(env, problems)
        except edges.PartChoiceError as exc:
            problems.append(str(exc))
            metrics_info = {}

        tracks: dict[str, Any] = {}
        for track in TRACKS:
            serving = [p for p in records if p.track == track and p.status == "serving"]
            if not serving:
                continue
            pids: dict[str, int | None] = {}
            programs: dict[str, dict[str, Any]] = {}
            alive_all, ready = True, False
            api = None
            for proc in serving:
                pids[proc.role] = proc.pid
                programs[proc.role] = _live(proc, restarts)
                alive = _running(proc, problems)
                alive_all = alive_all and alive
                if alive and proc.role == "api":
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
                "processes": programs,
                "alive": alive_all and {"api", "worker"} <= set(pids),
                "ready": ready,
            }
        for proc in records:
            if proc.status != "serving":
                problems.append(
                    f"{proc.label} is {proc.status}: an operation is in progress or was "
                    "interrupted (reap_orphans or `release platform down` clears it)"
                )
        return {
            "product": self.product,
            "env": env,
            "edge_url": record.edge_url if record else None,
            "edge": edge_info,
            "metrics": metrics_info,
            "healthy": not problems,
            "database": database.server().display_url(self.database(env)),
            "weights": record.weights if record else None,
            "tracks": tracks,
            "restarts": restarts,
            "problems": problems,
        }

    def _metrics_status(self, env: str, problems: list[str]) -> dict[str, Any]:
        """The metrics source env's canary judge uses, and this product's Prometheus."""
        kind = edges.metrics_kind(self.spec, env)
        instance = self._prometheus()
        info = self.supervisor.info(instance.program)
        prometheus: dict[str, Any] | None = None
        if info is not None or instance.config_path.is_file():
            ready = False
            if info is not None and info.running and instance.url:
                ready, why = processes.probe(f"{instance.url}/-/ready")
                if not ready and kind == "prometheus":
                    problems.append(f"Prometheus of {self.product}: {why}")
            prometheus = {
                "url": instance.url,
                "program": instance.program,
                "state": info.state if info else "ABSENT",
                "pid": info.pid if info else None,
                "ready": ready,
                "targets": instance.targets().get(env, []),
                "log": str(self.supervisor.log_path(instance.program)),
            }
        if kind == "prometheus" and (prometheus is None or not prometheus["ready"]):
            problems.append(
                f"the metrics source of {env} is Prometheus, which is not running: run "
                "`release platform up`"
            )
        return {"kind": kind, "prometheus": prometheus}


# -- helpers ---------------------------------------------------------------------------------


def _only_product() -> str:
    products = list_products()
    if len(products) != 1:
        raise PlatformError(
            f"LocalPlatform needs a product id: products found {products or 'none'}"
        )
    return products[0]


def _running(proc: ProcessRecord, problems: list[str]) -> bool:
    """True if supervisord runs `proc`; else a problem naming its state and log."""
    if proc.info is not None and proc.info.running:
        return True
    if not proc.program:
        problems.append(
            f"{proc.label} is not supervised (recorded by an older platform version): run "
            "`release platform down`, then `up`"
        )
        return False
    why = f" ({proc.info.description})" if proc.info and proc.info.description else ""
    if proc.info is not None and proc.info.restarting:
        problems.append(f"{proc.label} is {proc.state}{why}: supervisord is restarting it")
    else:
        problems.append(
            f"{proc.label} is not running ({proc.state}{why}); see its log {proc.log_path}"
        )
    return False


def _live(proc: ProcessRecord, restarts: list[str]) -> dict[str, Any]:
    """supervisord's view of `proc`; a restart since it was seen ready goes to `restarts`."""
    info = proc.info
    seen = proc.ready_start
    restarted = bool(info and info.start and seen and info.start - seen > START_TOLERANCE_SECONDS)
    if restarted and info is not None and info.start is not None and seen is not None:
        restarts.append(
            f"{proc.label} was restarted by supervisord at {_clock(info.start)} "
            f"(first ready from {_clock(seen)}; now {info.state}, up {info.uptime_seconds}s)"
        )
    return {
        "program": proc.program,
        "state": proc.state,
        "pid": proc.pid,
        "uptime_seconds": info.uptime_seconds if info else None,
        "started_at": _clock(info.start) if info and info.start else None,
        "restarted": restarted,
        "log": proc.log_path,
    }


def _clock(epoch: float) -> str:
    return dt.datetime.fromtimestamp(epoch, tz=dt.UTC).strftime("%H:%M:%S.%f")[:-3] + "Z"


def _child_env(extra: dict[str, str]) -> dict[str, str]:
    # Children inherit RELEASE_HOME / RELEASE_DATABASE_URL / RELEASE_DB_PREFIX so they reach
    # the same Postgres; the guardrail token is never handed to platform processes.
    env = {k: v for k, v in os.environ.items() if k != "GUARDRAIL_TOKEN"}
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


def materialize(artifact: ArtifactLike) -> Path:
    """The pushed artifact's files (`registry.unpacked`: verified, extracted once, atomically)."""
    return registry.unpacked(artifact.sha256)
