"""The local platform: edges, API and worker processes on 127.0.0.1, state in Postgres.

`LocalPlatform` (local.py) is the entry point; the edge runs as its own process (edge.py).
"""

from dagster_project.core.platform.local import LocalPlatform, PlatformError

__all__ = ["LocalPlatform", "PlatformError"]
