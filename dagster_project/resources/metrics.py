"""Where canary metrics come from: the API processes' own Prometheus endpoints (local), or a
Prometheus server queried with PromQL (real deployments)."""

from __future__ import annotations

from typing import Any, Literal

import dagster as dg


class MetricsResource(dg.ConfigurableResource):
    kind: Literal["local", "prometheus"] = "local"
    prometheus_url: str = ""

    def source(self, api_urls: dict[str, str]) -> Any:
        from dagster_project.core.canary import metrics

        if self.kind == "prometheus":
            if not self.prometheus_url:
                raise ValueError("metrics kind 'prometheus' needs RELEASE_PROMETHEUS_URL")
            return metrics.PrometheusSource(self.prometheus_url)
        return metrics.LocalScrapeSource(api_urls)
