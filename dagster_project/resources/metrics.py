"""Where canary metrics come from: the platform's choice per environment (the APIs' own
Prometheus endpoints scraped, or the platform's Prometheus queried with PromQL; see
core/platform/edges.py), or an external Prometheus server (real deployments)."""

from __future__ import annotations

from typing import Any, Literal

import dagster as dg


class MetricsResource(dg.ConfigurableResource):
    kind: Literal["local", "prometheus"] = "local"
    prometheus_url: str = ""

    def source(
        self, api_urls: dict[str, str], *, platform: Any = None, env: str | None = None
    ) -> Any:
        """The judge's `MetricsSource` for env. `local`: what the platform runs for env
        (`LocalPlatform.metrics_source`; the APIs scraped when no platform is given);
        `prometheus`: PromQL at `prometheus_url`, one scrape target per track."""
        from dagster_project.core.canary import metrics

        if self.kind == "prometheus":
            if not self.prometheus_url:
                raise ValueError("metrics kind 'prometheus' needs RELEASE_PROMETHEUS_URL")

            def hosts(urls: dict[str, str]) -> dict[str, str]:
                return {track: url.removeprefix("http://") for track, url in urls.items()}

            # The workers' scrape targets come from the platform; without it the worker
            # metrics are missing, which the judge never passes.
            workers = platform.worker_metrics_urls(env) if platform and env else {}
            return metrics.PrometheusSource(
                self.prometheus_url, instances=hosts(api_urls), worker_instances=hosts(workers)
            )
        if platform is not None and env is not None:
            return platform.metrics_source(env)
        return metrics.LocalScrapeSource(api_urls)
