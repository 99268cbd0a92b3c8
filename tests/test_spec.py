from pathlib import Path

import pytest
import yaml

from dagster_project.core.settings import product_dir, validate_release_key
from dagster_project.core.spec import SpecError, load_spec

PRODUCT = "4pnihc40q-yj"


def test_product_spec_loads_with_the_notes_tier_names() -> None:
    spec = load_spec(PRODUCT)
    assert (spec.tiers.edge.name, spec.tiers.api.name, spec.tiers.worker.name) == (
        "edge-wsjqannq",
        "api-i",
        "worker-f76v7exz5",
    )
    assert spec.ttl_classes["dynamic"] < spec.ttl_classes["static"]
    assert [s.weight for s in spec.canary.steps] == [5, 25, 50]
    assert spec.queues.high.max_attempts >= 1
    assert len(spec.guardrail.token_sha256) == 64


def _write_spec(tmp_path: Path, mutate) -> Path:
    raw = yaml.safe_load((product_dir(PRODUCT) / "product.yaml").read_text())
    mutate(raw)
    folder = tmp_path / PRODUCT
    folder.mkdir()
    path = folder / "product.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.mark.parametrize(
    ("mutate", "field", "reason"),
    [
        (
            lambda r: r["canary"]["steps"][1].update(weight=150),
            "canary.steps.1.weight",
            "less than 100",
        ),
        (
            lambda r: r["guardrail"].update(token_sha256="tpt-not-a-hash"),
            "guardrail.token_sha256",
            "SHA-256",
        ),
        (
            lambda r: r["endpoints"][0].update(ttl_class="forever"),
            "endpoints.0.ttl_class",
            "dynamic",
        ),
        (lambda r: r.pop("slos"), "slos", "required"),
        (
            lambda r: r["canary"].update(
                steps=[{"weight": 50, "bake_seconds": 1}, {"weight": 5, "bake_seconds": 1}]
            ),
            "canary.steps",
            "increase",
        ),
        (lambda r: r["tiers"]["api"].update(replicas="x"), "tiers.api.replicas", "not permitted"),
    ],
)
def test_invalid_spec_names_file_field_and_reason(tmp_path, mutate, field, reason) -> None:
    path = _write_spec(tmp_path, mutate)
    with pytest.raises(SpecError) as err:
        load_spec(path)
    message = str(err.value)
    assert str(path) in message
    assert f"field '{field}'" in message
    assert reason in message


def test_unknown_product_is_refused() -> None:
    with pytest.raises(SpecError, match="not found"):
        load_spec("no-such-product")


@pytest.mark.parametrize("key", ["1,2", "1|2", "1 2", "1..2", "", "-x"])
def test_bad_release_keys_are_refused(key: str) -> None:
    with pytest.raises(ValueError, match="refused"):
        validate_release_key(key)


def test_good_release_keys_pass() -> None:
    assert validate_release_key("1.4.0") == "1.4.0"
    assert validate_release_key("2.0.0-rc1") == "2.0.0-rc1"
