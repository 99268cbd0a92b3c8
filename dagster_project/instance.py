"""The Dagster instance every entry point shares: storage on the project's Postgres."""

import os
from pathlib import Path

import dagster as dg

from dagster_project.core import database
from dagster_project.core.settings import PROJECT_ROOT, dagster_home

TEMPLATE = PROJECT_ROOT / "dagster.yaml"


def prepare_instance_home() -> Path:
    """Render $DAGSTER_HOME/dagster.yaml and export DAGSTER_HOME/DAGSTER_PG_URL for children."""
    home = dagster_home()
    os.environ["DAGSTER_HOME"] = str(home)
    database.ensure_database(database.DAGSTER_DB)
    url = database.server().sqlalchemy_url(database.DAGSTER_DB)
    os.environ["DAGSTER_PG_URL"] = url
    if database.server().url.password:
        # Keep secrets out of files: child processes read the URL from the environment.
        storage = "storage:\n  postgres:\n    postgres_url:\n      env: DAGSTER_PG_URL\n"
    else:
        storage = f'storage:\n  postgres:\n    postgres_url: "{url}"\n'
    rendered = TEMPLATE.read_text() + "\n" + storage
    target = home / "dagster.yaml"
    if target.resolve() == TEMPLATE.resolve():
        raise RuntimeError(f"DAGSTER_HOME must not be the project folder ({PROJECT_ROOT})")
    if not target.exists() or target.read_text() != rendered:
        target.write_text(rendered)
    return home


def get_instance() -> dg.DagsterInstance:
    prepare_instance_home()
    instance = dg.DagsterInstance.get()
    ensure_product_pools(instance)
    return instance


def ensure_product_pools(
    instance: dg.DagsterInstance, products: list[str] | None = None
) -> list[str]:
    """Create each product's pool (`release-<product>`) at the instance's default limit if it
    does not exist yet; returns the pools created. One read when they all exist.

    The queue daemon initialises a pool it has not seen before it can count runs against it
    (`_initialize_pool_limits` in dagster/_core/op_concurrency_limits_counter.py). On Postgres,
    Dagster 1.13's re-initialisation of a pool that already exists aborts its own transaction
    (dagster-io/dagster#33552: the INSERT conflict, then an UPDATE in the aborted transaction),
    and the daemon then gives up counting pools for that pass. So pools are created here, once,
    before any run needs them, and only when missing; a concurrent creator wins silently.
    """
    from sqlalchemy.exc import SQLAlchemyError

    from assets.common import release_pool
    from dagster_project.core.settings import list_products

    storage = instance.event_log_storage
    if (
        not storage.supports_global_concurrency_limits
        or instance.global_op_concurrency_default_limit is None
    ):
        return []
    existing = storage.get_concurrency_keys()
    created = []
    for product in list_products() if products is None else products:
        pool = release_pool(product)
        if pool in existing:
            continue
        try:
            storage.initialize_concurrency_limit_to_default(pool)
        except SQLAlchemyError:
            if pool not in storage.get_concurrency_keys():
                raise
        else:
            created.append(pool)
    return created
