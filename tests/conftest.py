"""Test session setup: a private state directory (and embedded Postgres) per session, or a
prefix on an external server when RELEASE_DATABASE_URL is set; everything reaped afterwards."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import dagster  # noqa: F401  (see below)
import matplotlib.font_manager  # noqa: F401  (see below)
import pytest

# Dagster is imported here, before any test's guard (`_pure`): its import runs `file -b` on the
# interpreter (its vendored croniter asks platform.architecture()), which no test asked for.
# So is matplotlib's font manager: on a machine without its font cache (a fresh clone's first
# run), its first import runs `fc-list` and writes the cache, and the canary snapshot tests
# are otherwise pure.

# The production guardrail token is published to operators in the architecture note; the
# tests present it the way CI would, through the environment.
GUARDRAIL_TOKEN = os.environ.get("GUARDRAIL_TOKEN") or "tpt-rifvn-of1ce"
PRODUCT = "4pnihc40q-yj"


@pytest.fixture(scope="session", autouse=True)
def release_home() -> Iterator[Path]:
    # Short path: the embedded server's unix socket lives under it.
    home = Path(tempfile.mkdtemp(prefix="rt", dir="/tmp"))
    os.environ["RELEASE_HOME"] = str(home)
    os.environ["DAGSTER_HOME"] = str(home / "dagster")
    # Half the canary steps' bakes (never the sample a step needs, nor the promotion's watch):
    # at 25% or 50% a step has its sample within about 3 s, so the bake is the rest of its wait.
    os.environ.setdefault("RELEASE_BAKE_SCALE", "0.5")
    if os.environ.get("RELEASE_DATABASE_URL"):
        os.environ["RELEASE_DB_PREFIX"] = f"t{os.getpid()}_"
    # Resolve the code location once, up front: Dagster's definitions load context keeps a weak
    # reference to the instance that was current when it is first built, and a test's
    # short-lived instance would leave later tests with a dead one.
    from dagster_project.definitions import defs

    defs.get_repository_def()
    yield home
    _teardown(home)


@pytest.fixture(autouse=True)
def _no_open_dagster_instance_left() -> Iterator[None]:
    """Fail the test that leaves a Dagster instance entered. Entering one sets the current
    definitions-state storage (a context variable); a context never exited (a schedule context
    built without `with`, say) leaves it pointing at a deleted folder, and a later test in the
    same worker fails loading definitions, far from the cause."""
    from dagster._core.storage.defs_state.base import DefsStateStorage

    before = DefsStateStorage.get()
    yield
    if DefsStateStorage.get() is not before:
        pytest.fail("the test left a Dagster instance entered: use its context with `with`")


def _teardown(home: Path) -> None:
    # No supervisor folder: no platform process was ever started (and stopping one would start
    # the embedded Postgres just to find that out).
    if (home / "supervisor").exists():
        with contextlib.suppress(ImportError):
            from dagster_project.core.platform import local

            with contextlib.suppress(Exception):
                local.LocalPlatform().down()
    from dagster_project.core import database

    if os.environ.get("RELEASE_DATABASE_URL"):
        with (
            contextlib.suppress(Exception),
            database.connection("postgres") as conn,
            conn.cursor() as cur,
        ):
            cur.execute(
                "SELECT datname FROM pg_database WHERE datname LIKE %s",
                (os.environ["RELEASE_DB_PREFIX"] + "%",),
            )
            for (name,) in cur.fetchall():
                cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    else:
        database.stop_embedded()
    shutil.rmtree(home, ignore_errors=True)


@pytest.fixture
def guardrail_token(monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("GUARDRAIL_TOKEN", GUARDRAIL_TOKEN)
    return GUARDRAIL_TOKEN


# The longest files first, so the workers finish together: pytest-xdist `--dist loadfile`
# hands out files in this order as workers free up, given `--no-loadscope-reorder`
# (pyproject.toml; by default xdist sorts files by their number of tests, which put the
# seven-test fault matrix, the longest file, last). Ordered by measured seconds per file (a
# rehearsal's junit XML, 2026-12-03); the rest follow in collection order, all under 25 s.
_LONGEST_FIRST = (
    "test_production_faults.py",  # 472
    "test_production_races.py",  # 384, about 280 since its two-release runs became one
    "test_release_e2e.py",  # 196
    "test_real_edge_e2e.py",  # 161
    "test_worker_canary.py",  # 156
    "test_many_products.py",  # 132
    "test_canary_analysis.py",  # 91
    "test_smoke.py",  # 80
    "test_platform.py",  # 77
    "test_prometheus_metrics.py",  # 51
    "test_edge_policy.py",  # 42
    "test_service_guardrails.py",  # 40
    "test_data_quality.py",  # 35
    "test_bad_input.py",  # 27
    "test_automations.py",  # 23
)


# `slow` is what starts a process or talks to Postgres: `-m "not slow"` runs the pure tests only,
# in seconds. Kept true by a guard: an unmarked test (its fixtures' setup included) that starts
# a process or connects to Postgres fails, naming the marker it lacks.
class StartsProcesses(Exception):
    pass


@contextlib.contextmanager
def _pure(item: pytest.Item) -> Iterator[None]:
    if item.get_closest_marker("slow") is not None:
        yield
        return
    import subprocess
    from unittest import mock

    import psycopg2

    def refuse(*args: object, **kwargs: object) -> None:
        raise StartsProcesses(
            f"{item.nodeid} starts a process or connects to Postgres but is not marked slow: "
            "add @pytest.mark.slow (or the module's pytestmark)"
        )

    with (
        mock.patch.object(subprocess.Popen, "_execute_child", refuse),
        mock.patch.object(psycopg2, "connect", refuse),
    ):
        yield


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_setup(item: pytest.Item) -> Iterator[None]:
    with _pure(item):
        yield


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Iterator[None]:
    with _pure(item):
        yield


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    def rank(item: pytest.Item) -> int:
        name = item.path.name
        return _LONGEST_FIRST.index(name) if name in _LONGEST_FIRST else len(_LONGEST_FIRST)

    items.sort(key=rank)  # stable: the order within a file is kept
