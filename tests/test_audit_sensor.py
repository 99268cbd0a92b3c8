"""The audit sensor, evaluated with `build_sensor_context` against the real audit trail and the
real record of production changes (a history of thousands of past releases)."""

from datetime import UTC, datetime

import dagster as dg
import pytest

from conftest import GUARDRAIL_TOKEN, PRODUCT
from dagster_project.core import audit, changes, database
from dagster_project.core.spec import load_spec
from dagster_project.resources import ApprovalResource, AuditResource
from dagster_project.sensors import AUDIT_PAGE, release_sensors

SENSOR_PRODUCT = "sensor-test-product"
HISTORY = 2_500
ALREADY_AUDITED = 7


def _audit_sensor() -> dg.SensorDefinition:
    spec = load_spec(PRODUCT).model_copy(update={"product": SENSOR_PRODUCT})
    return next(s for s in release_sensors(spec) if s.name.startswith("audit_sensor"))


def _context(instance: dg.DagsterInstance, cursor: str | None) -> dg.SensorEvaluationContext:
    return dg.build_sensor_context(
        instance=instance,
        cursor=cursor,
        resources={"approval": ApprovalResource(), "audit_trail": AuditResource()},
    )


@pytest.fixture(scope="module")
def history() -> list[str]:
    """2,500 past production changes of one product, a few of them already audited."""
    changes.ensure_schema()
    rows = [
        (
            changes.change_id_for(SENSOR_PRODUCT, f"0.{i}.0", "promoted", f"run-{i}"),
            SENSOR_PRODUCT,
            f"0.{i}.0",
            "promoted",
            f"{i:064x}",
            f"run-{i}",
        )
        for i in range(HISTORY)
    ]
    with database.connection(database.CONTROL_DB) as conn, conn.cursor() as cur:
        cur.executemany(
            "INSERT INTO platform.production_changes "
            "(change_id, product, release, outcome, artifact_sha256, run_id) "
            "VALUES (%s, %s, %s, %s, %s, %s) ON CONFLICT DO NOTHING",
            rows,
        )
    for change_id, _, release, _, sha, run_id in rows[:ALREADY_AUDITED]:
        audit.append(
            change_id,
            {
                "timestamp": datetime.now(UTC).isoformat(),
                "identity": "ci:test",
                "artifact_sha256": sha,
                "environment": "production",
                "guardrail_token": GUARDRAIL_TOKEN,
                "product": SENSOR_PRODUCT,
                "release": release,
                "run_id": run_id,
                "outcome": "promoted",
            },
        )
    return [row[0] for row in rows]


@pytest.mark.slow
@pytest.mark.parametrize("token", [None, "tpt-wrong-token"])
def test_sensor_requests_nothing_without_the_right_token(
    history: list[str], token: str | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    if token is None:
        monkeypatch.delenv("GUARDRAIL_TOKEN", raising=False)
    else:
        monkeypatch.setenv("GUARDRAIL_TOKEN", token)
    instance = dg.DagsterInstance.ephemeral()
    result = _audit_sensor()(_context(instance, None))
    assert isinstance(result, dg.SkipReason)
    assert "GUARDRAIL_TOKEN" in (result.skip_message or "")
    if token:
        assert token not in (result.skip_message or "")


@pytest.mark.slow
def test_sensor_walks_history_with_a_bounded_cursor_and_dedupes(
    history: list[str], guardrail_token: str
) -> None:
    instance = dg.DagsterInstance.ephemeral()
    sensor = _audit_sensor()
    cursor: str | None = None
    requested: list[str] = []
    ticks = 0
    while True:
        ticks += 1
        assert ticks < 200, "the cursor must advance"
        result = sensor(_context(instance, cursor))
        assert isinstance(result, dg.SensorResult)
        run_requests = result.run_requests or []
        assert len(run_requests) <= AUDIT_PAGE  # bounded per tick
        requested.extend(r.run_key for r in run_requests)
        assert all(r.partition_key for r in run_requests)
        if result.cursor == cursor:
            break
        assert int(result.cursor) > int(cursor or 0)  # never rescans
        cursor = result.cursor
    assert len(requested) == len(set(requested))  # run keys are unique
    mine = set(history)
    assert set(requested) & mine == set(history[ALREADY_AUDITED:])  # audited ones skipped
    # A later tick with nothing new requests nothing and keeps its cursor.
    again = sensor(_context(instance, cursor))
    assert not (again.run_requests or [])
    assert again.cursor == cursor
