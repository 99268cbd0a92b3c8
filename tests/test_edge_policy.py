"""TTL policy per endpoint class (issue 14, part 3): the spec's `cache_policy`, the judgement of
the headers an endpoint is served with, and a release whose API declares a too-long dynamic TTL
(`--set dynamic_max_age=3600`) blocked by the `edge_cache` gate with production untouched.

Fast pure tests, then one real-path `deploy` in a child process (slow). Release keys `ttl-*`
are this file's own (pytest workers share one state directory across files)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from conftest import GUARDRAIL_TOKEN
from dagster_project.core import knobs
from dagster_project.core.settings import product_dir
from dagster_project.core.smoke import is_cacheable, policy_problems
from dagster_project.core.spec import CachePolicy, SpecError, load_spec

PRODUCT = "4pnihc40q-yj"
DYNAMIC = CachePolicy(max_ttl_seconds=30)
STATIC = CachePolicy(min_ttl_seconds=3600, immutable=True)


# -- the judgement (pure) --------------------------------------------------------------------


def test_a_too_long_dynamic_ttl_names_the_endpoint_and_the_rule() -> None:
    problems = policy_problems("GET /v1/summary", "dynamic", DYNAMIC, "public, max-age=3600")
    assert problems == ["GET /v1/summary: dynamic max-age 3600 > policy 30 (rule max_ttl_seconds)"]


@pytest.mark.parametrize(
    "cache_control",
    ["public, max-age=5", "public, s-maxage=30", "public, max-age=3600, s-maxage=10", "no-store"],
)
def test_dynamic_ttls_within_the_policy_pass(cache_control: str) -> None:
    assert policy_problems("GET /v1/items", "dynamic", DYNAMIC, cache_control) == []


def test_the_shared_cache_ttl_is_what_is_judged() -> None:
    problems = policy_problems("GET /v1/items", "dynamic", DYNAMIC, "max-age=5, s-maxage=600")
    assert problems == ["GET /v1/items: dynamic s-maxage 600 > policy 30 (rule max_ttl_seconds)"]


def test_static_needs_a_long_ttl_and_immutable() -> None:
    assert policy_problems("GET /a.js", "static", STATIC, "public, max-age=86400, immutable") == []
    short = policy_problems("GET /a.js", "static", STATIC, "public, max-age=60, immutable")
    assert short == ["GET /a.js: static max-age 60 < policy 3600 (rule min_ttl_seconds)"]
    mutable = policy_problems("GET /a.js", "static", STATIC, "public, max-age=86400")
    assert len(mutable) == 1 and "(rule immutable)" in mutable[0]
    uncached = policy_problems("GET /a.js", "static", STATIC, "no-store")
    assert any("not cacheable" in p and "min_ttl_seconds" in p for p in uncached)


def test_set_cookie_only_on_an_uncacheable_response() -> None:
    bad = policy_problems("GET /v1/items", "dynamic", None, "public, max-age=5", set_cookie=True)
    assert bad == [
        "GET /v1/items: Set-Cookie on a cacheable response ('public, max-age=5') "
        "(rule no_set_cookie_when_cacheable)"
    ]
    assert policy_problems("GET /v1/items", "dynamic", None, "private", set_cookie=True) == []


@pytest.mark.parametrize(
    ("cache_control", "cacheable"),
    [
        ("public, max-age=5", True),
        ("s-maxage=5", True),
        ("max-age=0", False),
        ("private, max-age=60", False),
        ("no-store", False),
        (None, False),
    ],
)
def test_is_cacheable(cache_control: str | None, cacheable: bool) -> None:
    assert is_cacheable(cache_control) is cacheable


def test_the_knob_is_typed_and_bounded() -> None:
    assert knobs.validate({"dynamic_max_age": "3600"}) == {"dynamic_max_age": 3600.0}
    for bad in ("0", "-5", "forever", "1e9"):
        with pytest.raises(knobs.KnobError, match="dynamic_max_age"):
            knobs.validate({"dynamic_max_age": bad})


# -- the spec --------------------------------------------------------------------------------


def test_the_sample_product_has_a_policy_per_class() -> None:
    spec = load_spec(PRODUCT)
    assert spec.cache_policy["dynamic"].max_ttl_seconds == 30
    assert spec.cache_policy["static"].immutable is True


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
            lambda r: r["cache_policy"].update(hourly={"max_ttl_seconds": 5}),
            "cache_policy.hourly",
            "no TTL class 'hourly'",
        ),
        (
            lambda r: r["cache_policy"]["dynamic"].update(max_ttl_seconds=2),
            "cache_policy.dynamic.max_ttl_seconds",
            "breaks its own policy",
        ),
        (
            lambda r: r["cache_policy"]["dynamic"].update(max_ttl_seconds=0),
            "cache_policy.dynamic.max_ttl_seconds",
            "greater than 0",
        ),
        (
            lambda r: r["cache_policy"]["static"].update(max_ttl_seconds=60),
            "cache_policy.static",
            "above max_ttl_seconds",
        ),
        (
            lambda r: r["cache_policy"]["static"].update(forever=True),
            "cache_policy.static.forever",
            "not permitted",
        ),
    ],
)
def test_a_bad_policy_names_file_line_and_field(tmp_path, mutate, field, reason) -> None:
    path = _write_spec(tmp_path, mutate)
    with pytest.raises(SpecError) as err:
        load_spec(path)
    message = str(err.value)
    assert f"{path}:" in message
    assert f"field '{field}'" in message
    assert reason in message


# -- real path: deploy blocked by edge_cache -------------------------------------------------


@pytest.fixture(params=["embedded", "varnish"])
def platform(request: pytest.FixtureRequest) -> Iterator[tuple[object, str]]:
    """The platform with the staging and production edges of one kind; always down."""
    from dagster_project.core.platform.local import LocalPlatform

    kind = request.param
    if kind == "varnish":
        from real_parts import require_varnish

        require_varnish()
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("RELEASE_EDGE", kind)
        local = LocalPlatform(PRODUCT)
        try:
            local.up()
            yield local, kind
        finally:
            local.down()


@pytest.mark.slow
def test_a_too_long_dynamic_ttl_is_blocked_by_edge_cache(platform: tuple[object, str]) -> None:
    local, kind = platform
    before = local.current("production")  # type: ignore[attr-defined]
    env = {**os.environ, "GUARDRAIL_TOKEN": GUARDRAIL_TOKEN}  # RELEASE_EDGE from the fixture
    code = "from dagster_project.cli import deploy_main; raise SystemExit(deploy_main())"
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            code,
            PRODUCT,
            "--release",
            f"ttl-1.0.0-{kind}",
            "--set",
            "dynamic_max_age=3600",
        ],
        capture_output=True,
        text=True,
        timeout=900,
        env=env,
    )
    output = done.stdout + done.stderr
    print(output[-4000:])
    assert done.returncode == 3, output[-4000:]
    assert "blocked by edge_cache" in output
    assert "dynamic max-age 3600 > policy 30 (rule max_ttl_seconds)" in output
    assert "GET /v1/items" in output
    assert GUARDRAIL_TOKEN not in output
    assert local.current("production") == before  # type: ignore[attr-defined]
