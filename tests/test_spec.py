import shutil
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
    shutil.copy(product_dir(PRODUCT) / "contract.yaml", folder / "contract.yaml")
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


def test_unknown_product_is_refused_listing_the_known_ones() -> None:
    with pytest.raises(SpecError, match="unknown product 'no-such-product'") as err:
        load_spec("no-such-product")
    assert PRODUCT in str(err.value)


@pytest.mark.parametrize("product", ["../etc", "/etc/passwd", "a/b", "A", "", "-x", "x" * 10_000])
def test_a_product_id_is_a_name_never_a_path(product: str) -> None:
    with pytest.raises(SpecError, match="product id") as err:
        load_spec(product)
    message = str(err.value)
    assert "known products: " + PRODUCT in message
    assert len(message) < 400  # a 10,000-character id is quoted cut, with its length


@pytest.mark.parametrize(
    ("mutate", "field", "reason"),
    [
        (lambda r: r["ttl_classes"].update(dynamic=-5), "ttl_classes.dynamic", "greater than 0"),
        (lambda r: r["ttl_classes"].update(static=0), "ttl_classes.static", "greater than 0"),
        (lambda r: r["canary"]["steps"][0].update(bake_seconds=0), "bake_seconds", "greater"),
        (lambda r: r["canary"]["steps"][0].update(weight=0), "canary.steps.0.weight", "greater"),
        (lambda r: r["slos"].update(success_rate_min=1.5), "slos.success_rate_min", "less"),
        (lambda r: r["slos"].update(p99_latency_ms_max=-1), "slos.p99_latency_ms_max", "greater"),
        (
            lambda r: r["slos"].update(latency_shift_floor_ms=-3),
            "slos.latency_shift_floor_ms",
            "greater",
        ),
        (lambda r: r["canary"].update(load_rps=10**6), "canary.load_rps", "less"),
        (lambda r: r["queues"]["high"].update(backoff_max_ms=-1), "backoff_max_ms", "greater"),
        (lambda r: r["endpoints"][0].update(load_weight=-1), "endpoints.0.load_weight", "greater"),
    ],
)
def test_every_number_has_a_range(tmp_path, mutate, field, reason) -> None:
    path = _write_spec(tmp_path, mutate)
    with pytest.raises(SpecError) as err:
        load_spec(path)
    assert field in str(err.value)
    assert reason in str(err.value)


def test_problems_are_reported_together_with_line_and_column(tmp_path: Path) -> None:
    text = (product_dir(PRODUCT) / "product.yaml").read_text()
    text = text.replace("  dynamic: 5\n", "  dynamic: -5\n").replace(
        "{weight: 25, bake_seconds: 6}", "{weight: 25, bake_seconds: 0}"
    )
    folder = tmp_path / PRODUCT
    folder.mkdir()
    path = folder / "product.yaml"
    path.write_text(text)
    shutil.copy(product_dir(PRODUCT) / "contract.yaml", folder / "contract.yaml")
    lines = text.splitlines()
    ttl_line = next(i for i, line in enumerate(lines, 1) if "dynamic: -5" in line)
    bake_line = next(i for i, line in enumerate(lines, 1) if "bake_seconds: 0" in line)
    bake_col = lines[bake_line - 1].index("0}") + 1
    with pytest.raises(SpecError) as err:
        load_spec(path)
    message = str(err.value)
    assert "2 problem(s)" in message
    assert f"{path}:{ttl_line}:12: field 'ttl_classes.dynamic'" in message
    assert f"{path}:{bake_line}:{bake_col}: field 'canary.steps.1.bake_seconds'" in message


def test_a_missing_field_points_at_the_mapping_that_lacks_it(tmp_path: Path) -> None:
    path = _write_spec(tmp_path, lambda r: r["slos"].pop("success_rate_min"))
    with pytest.raises(SpecError, match=r"product.yaml:\d+:\d+: field 'slos.success_rate_min'"):
        load_spec(path)


def test_a_token_pasted_into_the_fingerprint_field_is_never_echoed(tmp_path: Path) -> None:
    path = _write_spec(tmp_path, lambda r: r["guardrail"].update(token_sha256="tpt-secret-xy"))
    with pytest.raises(SpecError) as err:
        load_spec(path)
    assert "tpt-secret-xy" not in str(err.value)
    assert "guardrail.token_sha256" in str(err.value)


@pytest.mark.parametrize("key", ["1,2", "1|2", "1 2", "1..2", "", "-x"])
def test_bad_release_keys_are_refused(key: str) -> None:
    with pytest.raises(ValueError, match="refused"):
        validate_release_key(key)


def test_good_release_keys_pass() -> None:
    assert validate_release_key("1.4.0") == "1.4.0"
    assert validate_release_key("2.0.0-rc1") == "2.0.0-rc1"
