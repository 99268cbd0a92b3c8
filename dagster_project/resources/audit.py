"""The audit trail (hash-chained, append-only, with signed checkpoints) as a resource."""

from __future__ import annotations

from typing import Any

import dagster as dg


class AuditResource(dg.ConfigurableResource):
    def append(self, change_id: str, payload: dict[str, Any]) -> Any:
        from dagster_project.core import audit

        return audit.append(change_id, payload)

    def find(self, change_id: str) -> Any:
        from dagster_project.core import audit

        return audit.find(change_id)

    def verify(self) -> Any:
        from dagster_project.core import audit

        return audit.verify()

    def covering(self, seq: int, entry_hash: str) -> tuple[Any, str | None]:
        """The signed checkpoint covering entry `seq`, and what is wrong with it (None: it
        verifies)."""
        from dagster_project.core import audit

        return audit.covering(seq, entry_hash)
