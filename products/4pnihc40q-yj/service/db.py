"""A small, thread-safe Postgres access layer for the API: a bounded psycopg2 pool, created
lazily so the process starts (and answers /healthz) even while the database is down."""

from __future__ import annotations

import threading
from typing import Any

import psycopg2
import psycopg2.extras
import psycopg2.pool


class DatabaseUnavailable(RuntimeError):
    """Postgres could not be reached; the message names the database, never a password."""


class Database:
    def __init__(
        self,
        url: str,
        *,
        display_url: str,
        application_name: str,
        max_connections: int = 8,
        statement_timeout_ms: int = 5000,
    ) -> None:
        self._url = url
        self.display_url = display_url
        self._connect_kwargs = {
            "connect_timeout": 5,
            "application_name": application_name,
            "options": f"-c statement_timeout={statement_timeout_ms}",
        }
        self._max_connections = max_connections
        self._pool: psycopg2.pool.ThreadedConnectionPool | None = None
        self._pool_lock = threading.Lock()
        # ThreadedConnectionPool raises instead of waiting when exhausted; callers wait here.
        self._slots = threading.BoundedSemaphore(max_connections)

    def _get_pool(self) -> psycopg2.pool.ThreadedConnectionPool:
        with self._pool_lock:
            if self._pool is None:
                try:
                    self._pool = psycopg2.pool.ThreadedConnectionPool(
                        1, self._max_connections, self._url, **self._connect_kwargs
                    )
                except psycopg2.OperationalError as exc:
                    raise DatabaseUnavailable(
                        f"database {self.display_url} is unreachable: {str(exc).strip()}"
                    ) from None
            return self._pool

    def query(self, sql: str, params: tuple[Any, ...] = ()) -> list[dict[str, Any]]:
        """Run one statement in its own transaction; rows as dicts (empty if none returned).

        Blocking: call it through starlette's run_in_threadpool from async code.
        """
        with self._slots:
            pool = self._get_pool()
            try:
                conn = pool.getconn()
            except psycopg2.OperationalError as exc:
                raise DatabaseUnavailable(
                    f"database {self.display_url} is unreachable: {str(exc).strip()}"
                ) from None
            broken = False
            try:
                with conn, conn.cursor(cursor_factory=psycopg2.extras.RealDictCursor) as cur:
                    cur.execute(sql, params)
                    return [dict(row) for row in cur.fetchall()] if cur.description else []
            except (psycopg2.OperationalError, psycopg2.InterfaceError) as exc:
                broken = True  # the server went away: drop this connection, not the pool
                raise DatabaseUnavailable(
                    f"database {self.display_url} failed: {str(exc).strip()}"
                ) from None
            finally:
                pool.putconn(conn, close=broken or bool(conn.closed))

    def close(self) -> None:
        with self._pool_lock:
            if self._pool is not None:
                self._pool.closeall()
                self._pool = None
