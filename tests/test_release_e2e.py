"""Whole releases through the real path: the Dagster instance on the session's Postgres, the
local platform's processes, real traffic through the edges. Slow by nature (each canary bakes
with real load), so one module-scoped platform serves the whole sequence, in order."""

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import GUARDRAIL_TOKEN, PRODUCT
from dagster_project import deploy as deploy_cli
from dagster_project.core import audit, changes, database, httpclient

pytestmark = pytest.mark.slow

STAGING_DB = database.environment_database(PRODUCT, "staging")  # the product's own database


@pytest.fixture(scope="module")
def platform() -> Iterator[object]:
    from dagster_project.core.platform.local import LocalPlatform

    os.environ["GUARDRAIL_TOKEN"] = GUARDRAIL_TOKEN
    local = LocalPlatform(PRODUCT)
    local.up()
    yield local
    local.down()


def _production(local: object) -> dict:
    return local.current("production")  # type: ignore[attr-defined]


def _served_versions(local: object, n: int = 60) -> dict[str, int]:
    """What production actually serves, measured through its edge (cache bypassed)."""
    counts: dict[str, int] = {}
    with httpclient.client(timeout=5) as client:
        for i in range(n):
            response = client.get(f"{local.edge_url('production')}/v1/items?probe={i}")  # type: ignore[attr-defined]
            version = response.headers.get("x-release", "?")
            counts[version] = counts.get(version, 0) + 1
    return counts


def _deploy(version: str, *pairs: str) -> deploy_cli.DeployOutcome:
    outcome = deploy_cli.deploy(PRODUCT, version, list(pairs), echo=lambda line: None)
    print(outcome)
    return outcome


CAPTURED: list[str] = []  # stdout/stderr of real CLI runs, scanned for the token at the end


def _deploy_cli(version: str, *args: str, token: str | None = GUARDRAIL_TOKEN) -> int:
    """The real `deploy` entry point in a child process, output captured."""
    env = {k: v for k, v in os.environ.items() if k != "GUARDRAIL_TOKEN"}
    if token is not None:
        env["GUARDRAIL_TOKEN"] = token
    code = "from dagster_project.cli import deploy_main; raise SystemExit(deploy_main())"
    done = subprocess.run(
        [sys.executable, "-c", code, PRODUCT, "--release", version, *args],
        capture_output=True,
        text=True,
        timeout=900,
        env=env,
    )
    CAPTURED.extend([done.stdout, done.stderr])
    print(done.stdout[-3000:], done.stderr[-3000:])
    return done.returncode


def test_first_release_is_promoted_and_audited(platform: object) -> None:
    outcome = _deploy("1.0.0")
    assert outcome.exit_code == deploy_cli.EXIT_OK, outcome.headline
    assert _production(platform)["stable"]["version"] == "1.0.0"
    assert "canary" not in _production(platform)
    assert _served_versions(platform) == {"1.0.0": 60}
    promoted = [c for c in changes.for_release(PRODUCT, "1.0.0") if c.outcome == "promoted"]
    assert len(promoted) == 1
    entry = audit.find(promoted[0].change_id)
    assert entry is not None
    for field in ("timestamp", "identity", "artifact_sha256", "environment", "guardrail_token"):
        assert entry.payload[field]
    assert entry.payload["environment"] == "production"


def test_second_release_replaces_the_first(platform: object) -> None:
    before = _production(platform)["stable"]
    assert _deploy_cli("1.1.0") == deploy_cli.EXIT_OK
    assert "promoted and audited" in CAPTURED[-2]
    after = _production(platform)
    assert after["stable"]["version"] == "1.1.0"
    assert after["stable"]["artifact_sha"] != before["artifact_sha"]
    assert "canary" not in after  # the old version is retired, nothing parked
    assert _served_versions(platform) == {"1.1.0": 60}


def test_redeploying_the_current_release_is_a_no_op(platform: object) -> None:
    runs_before = len(changes.for_release(PRODUCT, "1.1.0"))
    outcome = _deploy("1.1.0")
    assert outcome.exit_code == deploy_cli.EXIT_OK
    assert "already in production" in outcome.headline
    assert outcome.run_id is None
    assert len(changes.for_release(PRODUCT, "1.1.0")) == runs_before


def test_a_backfill_of_an_older_release_never_moves_production_backwards(
    platform: object,
) -> None:
    before = _production(platform)
    assert before["stable"]["version"] == "1.1.0"
    outcome = _deploy("1.0.0")  # registered before 1.1.0: what a backfill re-runs
    assert outcome.exit_code == deploy_cli.EXIT_BLOCKED, outcome.headline
    why = {b["check"]: b["why"] for b in outcome.blocked_by}
    assert "never moved backwards" in why["slo_regression"]
    assert _production(platform) == before
    assert _served_versions(platform) == {"1.1.0": 60}


def test_bad_release_is_blocked_at_the_canary_with_production_untouched(platform: object) -> None:
    outcome = _deploy("1.2.0", "error_rate=0.2")
    assert outcome.exit_code == deploy_cli.EXIT_BLOCKED, outcome.headline
    assert "slo_regression" in [b["check"] for b in outcome.blocked_by]
    assert _production(platform)["stable"]["version"] == "1.1.0"
    assert "canary" not in _production(platform)
    assert _served_versions(platform) == {"1.1.0": 60}
    aborted = [c for c in changes.for_release(PRODUCT, "1.2.0") if c.outcome == "aborted"]
    assert len(aborted) == 1
    assert audit.find(aborted[0].change_id) is not None  # production carried canary traffic


def test_after_a_promotion_and_an_abort_the_trail_verifies_and_the_tickets_sign_off(
    platform: object, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Issue 15's done-when: `release audit verify` exits 0 and checks the signed checkpoints;
    `release audit ticket` writes the promotion's page with its snapshots embedded, and the
    aborted canary's, whose deploy items do not apply."""
    import base64

    from dagster_project.cli import release_main

    assert release_main(["audit", "verify"]) == 0
    out = capsys.readouterr().out
    assert "signed checkpoints verified" in out, out
    assert release_main(["audit", "ticket", PRODUCT, "1.1.0", "--out", str(tmp_path)]) == 0
    (page,) = tmp_path.glob("1.1.0-promoted-seq*.html")
    (promoted,) = [c for c in changes.for_release(PRODUCT, "1.1.0") if c.outcome == "promoted"]
    assert promoted.details.snapshots
    for snap in promoted.details.snapshots:
        embedded = base64.b64encode(Path(snap.path).read_bytes()).decode()
        assert f"data:image/png;base64,{embedded}" in page.read_text()
    assert release_main(["audit", "ticket", PRODUCT, "1.2.0", "--out", str(tmp_path)]) == 0
    assert "not applicable" in next(tmp_path.glob("1.2.0-aborted-seq*.md")).read_text()
    assert GUARDRAIL_TOKEN not in capsys.readouterr().out


def test_hand_made_schema_change_on_staging_blocks_on_schema_drift(platform: object) -> None:
    from dagster_project.core import database

    before = _production(platform)
    with database.connection(STAGING_DB) as conn, conn.cursor() as cur:
        cur.execute("ALTER TABLE items ADD COLUMN hand_made text")
    try:
        assert _deploy_cli("1.2.1") == deploy_cli.EXIT_BLOCKED
        summary = CAPTURED[-2]
        assert "schema_drift" in summary
        assert "hand_made" in summary  # the difference is shown
    finally:
        with database.connection(STAGING_DB) as conn, conn.cursor() as cur:
            cur.execute("ALTER TABLE items DROP COLUMN hand_made")
    assert _production(platform) == before


def test_bad_data_in_staging_blocks_on_data_quality(platform: object) -> None:
    from dagster_project.core import database

    before = _production(platform)
    with database.connection(STAGING_DB) as conn, conn.cursor() as cur:
        # A dead letter claiming zero attempts: no constraint forbids it, the suite does.
        cur.execute(
            "INSERT INTO dead_letter (job_key, queue, payload, attempts, last_error) "
            "VALUES ('e2e-bad-dlq', 'high', '{}'::jsonb, 0, 'made by hand')"
        )
    try:
        outcome = _deploy("1.2.2")
        assert outcome.exit_code == deploy_cli.EXIT_BLOCKED, outcome.headline
        assert "data_quality" in [b["check"] for b in outcome.blocked_by]
    finally:
        with database.connection(STAGING_DB) as conn, conn.cursor() as cur:
            cur.execute("DELETE FROM dead_letter WHERE job_key = 'e2e-bad-dlq'")
    assert _production(platform) == before


def test_promotion_launched_alone_refuses_after_a_failed_gate(platform: object) -> None:
    import dagster as dg

    from dagster_project.definitions import defs
    from dagster_project.instance import get_instance

    instance = get_instance()
    promotion_key = dg.AssetKey([PRODUCT, "promotion"])
    # What a UI launch of `promotion` alone for this partition executes.
    job = defs.resolve_job_def("release_" + PRODUCT.replace("-", "_"))
    result = job.execute_in_process(
        asset_selection=[promotion_key],
        partition_key="1.2.0",
        instance=instance,
        raise_on_error=False,
    )
    assert not result.success
    failure = next(e for e in result.all_events if e.is_step_failure)
    message = failure.event_specific_data.error.message
    assert "blocking checks upstream did not pass" in message
    assert "slo_regression" in message
    assert _production(platform)["stable"]["version"] == "1.1.0"


@pytest.mark.parametrize("token", [None, "tpt-wrong-token"])
def test_missing_or_wrong_token_is_refused_with_production_untouched(
    platform: object, token: str | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    if token is None:
        monkeypatch.delenv("GUARDRAIL_TOKEN", raising=False)
    else:
        monkeypatch.setenv("GUARDRAIL_TOKEN", token)
    before = _production(platform)
    outcome = _deploy("1.3.0")
    assert outcome.exit_code == deploy_cli.EXIT_REFUSED, outcome.headline
    assert "GUARDRAIL_TOKEN" in outcome.headline
    assert GUARDRAIL_TOKEN not in outcome.headline
    if token:
        assert token not in outcome.headline
        assert _deploy_cli("1.3.1", token=token) == deploy_cli.EXIT_REFUSED
        assert "GUARDRAIL_TOKEN" in CAPTURED[-2] + CAPTURED[-1]
        assert token not in CAPTURED[-2] + CAPTURED[-1]
    assert _production(platform) == before
    assert _served_versions(platform) == {"1.1.0": 60}


def test_re_running_the_audit_never_duplicates_an_entry(platform: object) -> None:
    from dagster_project.definitions import defs
    from dagster_project.instance import get_instance

    before = [(e.seq, e.entry_hash) for e in audit.entries(PRODUCT)]
    job = defs.resolve_job_def("audit_" + PRODUCT.replace("-", "_"))
    for release in ("1.0.0", "1.2.0"):  # a promotion and an aborted canary
        result = job.execute_in_process(
            partition_key=release, instance=get_instance(), raise_on_error=False
        )
        materialized = [
            e for e in result.all_events if e.event_type_value == "ASSET_MATERIALIZATION"
        ]
        assert materialized, release
    assert [(e.seq, e.entry_hash) for e in audit.entries(PRODUCT)] == before
    assert audit.verify().ok


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["no-such-product"], "not found"),
        ([PRODUCT, "--release", "1,2"], "comma"),
        ([PRODUCT, "--release", "1.4.0", "--set", "nonsense"], "KEY=VALUE"),
        ([PRODUCT, "--release", "1.4.0", "--set", "error_rate=7"], "error_rate"),
    ],
)
def test_bad_input_exits_2_through_the_real_entry_point(args: list[str], needle: str) -> None:
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            "from dagster_project.cli import deploy_main; raise SystemExit(deploy_main())",
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2, done.stdout + done.stderr
    assert needle in done.stdout + done.stderr


def test_release_status_json_shows_production_without_secrets(platform: object) -> None:
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            "from dagster_project.cli import release_main; raise SystemExit(release_main())",
            "status",
            PRODUCT,
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    status = json.loads(done.stdout)
    production = status["environments"]["production"]
    assert production["version"] == "1.1.0"
    assert production["weights"] == {"stable": 100}
    assert production["edge_url"].startswith("http://127.0.0.1:")
    assert "postgres" in production["database_url"]
    assert GUARDRAIL_TOKEN not in done.stdout


def test_the_token_is_recorded_in_the_audit_trail_and_nowhere_else(
    platform: object, release_home
) -> None:
    """After full releases, a blocked one and refused ones: scan every place a secret leaks."""
    from dagster_project.core import database

    token = GUARDRAIL_TOKEN
    assert any(token == e.payload["guardrail_token"] for e in audit.entries(PRODUCT))
    # Captured stdout/stderr of the real CLI runs.
    assert CAPTURED and all(token not in text for text in CAPTURED)
    # Every row of every table Dagster stores (runs, run config, tags, event logs with
    # metadata, logs and exception texts, asset and check records).
    leaks = _tables_containing(database.DAGSTER_DB, token, skip_schemas=())
    # The control database: platform state, production changes, registry; the audit schema
    # is the one place the token belongs.
    leaks += _tables_containing(database.CONTROL_DB, token, skip_schemas=("audit",))
    for env in ("staging", "production"):  # the product's own databases
        leaks += _tables_containing(database.environment_database(PRODUCT, env), token, ())
    assert leaks == []
    # Every file in the state directory but the database's own data files: Dagster compute
    # logs, platform process logs, artifacts, snapshots, caches.
    needle = token.encode()
    files = [
        path
        for path in release_home.rglob("*")
        if path.is_file() and "pg" not in path.relative_to(release_home).parts[:1]
    ]
    assert files
    assert [str(p) for p in files if needle in p.read_bytes()] == []


def _tables_containing(db: str, needle: str, skip_schemas: tuple[str, ...]) -> list[str]:
    from dagster_project.core import database

    found = []
    with database.connection(db) as conn, conn.cursor() as cur:
        cur.execute(
            "SELECT table_schema, table_name FROM information_schema.tables "
            "WHERE table_type = 'BASE TABLE' "
            "AND table_schema NOT IN ('pg_catalog', 'information_schema')"
        )
        for schema, table in cur.fetchall():
            if schema in skip_schemas:
                continue
            cur.execute(
                f'SELECT count(*) FROM "{schema}"."{table}" AS t WHERE t::text LIKE %s',
                (f"%{needle}%",),
            )
            if cur.fetchone()[0]:
                found.append(f"{db}.{schema}.{table}")
    return found
