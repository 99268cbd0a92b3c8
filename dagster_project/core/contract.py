"""The contract of an endpoint, as seen by clients: status, content type and JSON shape.

Promotion purges the edge selectively: only the surrogate keys of endpoints whose contract
differs between the old and the new version (the architecture note: "purge selectively on
schema or contract changes").
"""

from __future__ import annotations

from typing import Any

import httpx

from dagster_project.core.spec import ProductSpec


def shape(value: Any) -> Any:
    """The JSON shape: keys and value types, not values."""
    if isinstance(value, dict):
        return {key: shape(item) for key, item in sorted(value.items())}
    if isinstance(value, list):
        return [shape(value[0])] if value else []
    return type(value).__name__


def contract(base_url: str, path: str, client: httpx.Client) -> dict[str, Any]:
    url = base_url.rstrip("/") + path
    try:
        response = client.get(url)
    except httpx.HTTPError as exc:
        raise ConnectionError(f"cannot read the contract of {url}: {exc}") from exc
    content_type = response.headers.get("content-type", "").split(";")[0]
    body = response.json() if content_type == "application/json" else None
    return {"status": response.status_code, "content_type": content_type, "shape": shape(body)}


def changed_surrogate_keys(spec: ProductSpec, old_url: str, new_url: str) -> list[dict[str, Any]]:
    """Endpoints whose contract differs between two API processes, with their surrogate keys."""
    changed = []
    with httpx.Client(timeout=5.0) as client:
        for endpoint in spec.endpoints:
            old = contract(old_url, endpoint.path, client)
            new = contract(new_url, endpoint.path, client)
            if old != new:
                changed.append(
                    {"path": endpoint.path, "surrogate_keys": list(endpoint.surrogate_keys)}
                )
    return changed
