import pytest

from dagster_project.core import database


@pytest.mark.slow
def test_server_is_real_and_databases_are_created_once() -> None:
    name = database.ensure_database("scratch_db_test")
    assert database.ensure_database("scratch_db_test") == name  # idempotent
    with database.connection("scratch_db_test") as conn, conn.cursor() as cur:
        cur.execute("SELECT current_database(), version()")
        current, version = cur.fetchone()
    assert current == name
    assert version.startswith("PostgreSQL")
    database.drop_database("scratch_db_test")


@pytest.mark.slow
def test_display_url_hides_secrets() -> None:
    srv = database.server()
    url = srv.url.set(password="s3cret")
    shown = database.Server(url=url, embedded=srv.embedded).display_url("staging")
    assert "s3cret" not in shown
    assert "staging" in shown


@pytest.mark.slow
def test_sqlalchemy_url_uses_psycopg2() -> None:
    assert database.server().sqlalchemy_url("dagster").startswith("postgresql+psycopg2://")


@pytest.mark.slow
def test_unreachable_server_names_the_endpoint(monkeypatch) -> None:
    monkeypatch.setenv("RELEASE_DATABASE_URL", "postgresql://nobody@127.0.0.1:1/postgres")
    import pytest

    with pytest.raises(database.DatabaseUnavailable, match=r"127\.0\.0\.1:1"):
        database.connect("staging")
