"""The shared-TLS-context clients (dagster_project/core/httpclient.py): one context per
process, and httpx's call shapes kept (client arguments to the client, the rest to the
request), against a real HTTP server on 127.0.0.1 (a thread: nothing is started)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from dagster_project.core import httpclient


class _Echo(BaseHTTPRequestHandler):
    def _answer(self) -> None:
        body = f"{self.command} {self.path}".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = do_DELETE = _answer

    def log_message(self, *args: object) -> None:  # quiet
        pass


@pytest.fixture
def echo() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Echo)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def _context_of(client: object) -> object:
    return client._transport._pool._ssl_context  # type: ignore[attr-defined]


def test_every_client_shares_one_tls_context_built_once() -> None:
    with httpclient.client() as first, httpclient.client(timeout=1.0) as second:
        assert _context_of(first) is _context_of(second) is httpclient.tls_context()
    # What httpx would build itself: certificates verified, host names checked.
    context = httpclient.tls_context()
    assert context.check_hostname and context.verify_mode.name == "CERT_REQUIRED"


@pytest.mark.parametrize(
    ("call", "method"),
    [(httpclient.get, "GET"), (httpclient.post, "POST"), (httpclient.delete, "DELETE")],
)
def test_one_shot_calls_take_httpx_arguments(echo: str, call, method: str) -> None:
    response = call(f"{echo}/v1/items", params={"q": "1"}, timeout=2.0, trust_env=False)
    assert (response.status_code, response.text) == (200, f"{method} /v1/items?q=1")


def test_an_unknown_argument_is_refused_like_httpx(echo: str) -> None:
    with pytest.raises(TypeError, match="bogus"):
        httpclient.get(f"{echo}/", bogus=True)
