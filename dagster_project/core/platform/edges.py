"""The edge of an environment behind one small interface, and which one (and which metrics
source) an environment runs.

Two edges: `EmbeddedEdge` (edge.py, our caching proxy; the default) and `VarnishEdge`
(varnish.py: Varnish with VCL generated from the spec). Both are a supervisord program on the
environment's edge port, answer `GET /_edge/health`, and purge through `POST /_edge/purge`
for loopback clients presenting the environment's `X-Purge-Key`; they differ in how routes
reach them (`POST /_edge/routes` vs. a VCL loaded through varnishadm) and how a purge names
its target (a JSON body vs. `X-Purge-URL` / `X-Purge-Surrogate-Key` headers).

The product spec picks the edge and the metrics source per environment (`platform:` in
product.yaml, default embedded + scrape); `RELEASE_EDGE=embedded|varnish` and
`RELEASE_METRICS=scrape|prometheus` override both environments.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol, get_args

from dagster_project.core.platform import prometheus, varnish
from dagster_project.core.platform.errors import PlatformError
from dagster_project.core.spec import EdgeKind, MetricsKind, ProductSpec

EDGE_VARIABLE = "RELEASE_EDGE"
METRICS_VARIABLE = "RELEASE_METRICS"
EDGE_KINDS: tuple[str, ...] = get_args(EdgeKind)
METRICS_KINDS: tuple[str, ...] = get_args(MetricsKind)


class PartChoiceError(PlatformError):
    """A variable names an edge or metrics source that does not exist, or one that is not
    installed here; the message names the variable or the Debian package."""


def _override(variable: str, allowed: tuple[str, ...]) -> str | None:
    value = os.environ.get(variable)
    if value is None or value == "":
        return None
    if value not in allowed:
        raise PartChoiceError(
            f"{variable}={value[:40]!r} is not one of {', '.join(allowed)} "
            f"(unset it to use the product spec's choice)"
        )
    return value


def edge_kind(spec: ProductSpec, env: str) -> str:
    """The edge `env` runs: RELEASE_EDGE if set, else the spec's `platform.<env>.edge`."""
    return _override(EDGE_VARIABLE, EDGE_KINDS) or getattr(spec.platform, env).edge


def metrics_kind(spec: ProductSpec, env: str) -> str:
    """Where the canary judge reads `env`'s metrics: RELEASE_METRICS if set, else the spec."""
    return _override(METRICS_VARIABLE, METRICS_KINDS) or getattr(spec.platform, env).metrics


def require_installed(spec: ProductSpec, envs: tuple[str, ...]) -> None:
    """PartChoiceError naming the Debian package when a chosen part's binary is missing."""
    for env in envs:
        if edge_kind(spec, env) == "varnish" and (missing := varnish.binaries_missing()):
            raise PartChoiceError(
                f"the edge of {env} is Varnish but {', '.join(missing)} is not installed: "
                f"{varnish.install_hint()}, or choose {EDGE_VARIABLE}=embedded"
            )
        if metrics_kind(spec, env) == "prometheus" and prometheus.binary_missing():
            raise PartChoiceError(
                f"the metrics source of {env} is Prometheus but it is not installed: "
                f"{prometheus.install_hint()}, or choose {METRICS_VARIABLE}=scrape"
            )


def kind_of_program(program: str | None) -> str:
    """The edge kind a recorded edge program runs (by its name)."""
    return "varnish" if program and program.endswith(".varnish") else "embedded"


def program_name(product: str, env: str, kind: str) -> str:
    return f"{product}.{env}.{'varnish' if kind == 'varnish' else 'edge'}"


# -- the interface ---------------------------------------------------------------------------

# (path, JSON payload, extra headers) -> the edge's JSON answer; the platform's `_edge_call`
# (purge key header added, one wait for a restart on a connection error).
EdgeCall = Callable[[str, dict[str, Any], dict[str, str]], dict[str, Any]]


class Edge(Protocol):
    kind: str

    def argv(self) -> list[str]:
        """The program's command line (supervisord restarts it with the same one)."""
        ...

    def prepare(self, routes: Mapping[str, Any]) -> None:
        """Files the program needs before it (re)starts, for this route table."""
        ...

    def push_routes(self, routes: Mapping[str, Any]) -> dict[str, Any]:
        """Make the running edge route by this table now."""
        ...

    def purge(self, url: str | None, surrogate_key: str | None) -> int:
        """Objects removed for a URL (every track's copy) or a surrogate key."""
        ...

    def details(self) -> dict[str, Any]:
        """What `release platform status` shows about this edge."""
        ...

    def remove_files(self) -> None:
        """What the edge left on disk, once its program is gone."""
        ...


class EmbeddedEdge:
    kind = "embedded"

    def __init__(self, product: str, env: str, port: int, call: EdgeCall) -> None:
        self.product, self.env, self.port, self._call = product, env, port, call

    def argv(self) -> list[str]:
        return [
            sys.executable,
            "-m",
            "dagster_project.core.platform.edge",
            "--product",
            self.product,
            "--env",
            self.env,
            "--port",
            str(self.port),
        ]

    def prepare(self, routes: Mapping[str, Any]) -> None:
        return None  # it reads its routes from platform state at start and every 2 s

    def push_routes(self, routes: Mapping[str, Any]) -> dict[str, Any]:
        return self._call("/_edge/routes", dict(routes), {})

    def purge(self, url: str | None, surrogate_key: str | None) -> int:
        payload = {"url": url} if url is not None else {"surrogate_key": surrogate_key}
        return int(self._call("/_edge/purge", payload, {})["purged"])

    def details(self) -> dict[str, Any]:
        return {"kind": self.kind}

    def remove_files(self) -> None:
        return None


class VarnishEdge:
    kind = "varnish"

    def __init__(
        self,
        spec: ProductSpec,
        env: str,
        port: int,
        purge_key: str,
        home: Path,
        call: EdgeCall,
    ) -> None:
        self.spec, self.env, self.purge_key, self._call = spec, env, purge_key, call
        self.instance = varnish.VarnishInstance(
            workdir=home / "varnish" / f"{spec.product}-{env}", port=port
        )

    def argv(self) -> list[str]:
        return self.instance.argv()

    def vcl(self, routes: Mapping[str, Any]) -> str:
        return varnish.render_vcl(self.spec, self.env, routes, self.purge_key)

    def prepare(self, routes: Mapping[str, Any]) -> None:
        self.instance.prepare()
        self.instance.write_vcl(self.vcl(routes))

    def push_routes(self, routes: Mapping[str, Any]) -> dict[str, Any]:
        generation = int(routes.get("generation") or 0)
        return {"generation": generation, **self.instance.load(self.vcl(routes), generation)}

    def purge(self, url: str | None, surrogate_key: str | None) -> int:
        if url is not None:
            headers = {"X-Purge-URL": url}
        else:
            headers = {"X-Purge-Surrogate-Key": str(surrogate_key)}
        return int(self._call("/_edge/purge", {}, headers)["purged"])

    def details(self) -> dict[str, Any]:
        info: dict[str, Any] = {"kind": self.kind, "workdir": str(self.instance.workdir)}
        try:
            info["active_vcl"] = self.instance.active_vcl()
        except (PlatformError, OSError) as exc:
            info["active_vcl"] = None
            info["admin_problem"] = str(exc)
        return info

    def remove_files(self) -> None:
        self.instance.remove_files()
