"""A production lock per product, held while a release changes production traffic.

The Dagster run queue limits concurrent runs per product, but CLI materialisations run
in-process and bypass the queue, so production is also guarded here: a session-level
Postgres advisory lock on a dedicated connection, released when the block ends or the
process dies.
"""

from __future__ import annotations

import contextlib
import time
import zlib
from collections.abc import Iterator

from dagster_project.core import database


class ProductionLocked(RuntimeError):
    """Another release holds production for this product."""


def _lock_id(product: str) -> int:
    return zlib.crc32(f"production:{product}".encode())


@contextlib.contextmanager
def production_lock(product: str, holder: str, *, wait_seconds: float = 30.0) -> Iterator[None]:
    database.ensure_database(database.CONTROL_DB)
    conn = database.connect(database.CONTROL_DB)
    try:
        with conn.cursor() as cur:
            cur.execute("SET application_name = %s", (f"release-lock:{holder}"[:63],))
            deadline = time.monotonic() + wait_seconds
            while True:
                cur.execute("SELECT pg_try_advisory_lock(%s)", (_lock_id(product),))
                if cur.fetchone()[0]:
                    break
                if time.monotonic() >= deadline:
                    raise ProductionLocked(
                        f"production of {product} is locked by another release "
                        f"({_holder(cur, product)}); waited {wait_seconds:.0f}s"
                    )
                time.sleep(0.5)
        yield
    finally:
        conn.close()  # closing the session releases the advisory lock


def _holder(cur, product: str) -> str:
    cur.execute(
        "SELECT a.application_name FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid "
        "WHERE l.locktype = 'advisory' AND l.objid = %s AND l.granted",
        (_lock_id(product) & 0xFFFFFFFF,),
    )
    row = cur.fetchone()
    return row[0] if row else "unknown holder"
