"""The platform adapter: where releases run. `local` is the embedded platform on 127.0.0.1."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

import dagster as dg

if TYPE_CHECKING:
    from dagster_project.core.platform.local import LocalPlatform


class PlatformResource(dg.ConfigurableResource):
    kind: Literal["local"] = "local"

    def for_product(self, product_id: str) -> LocalPlatform:
        from dagster_project.core.platform.local import LocalPlatform

        return LocalPlatform(product_id)
