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
    return dg.DagsterInstance.get()
