"""The pipeline's short-lived httpx clients, all with one TLS context per process.

httpx builds a new TLS context for every `Client` (loading the CA bundle: ~40 ms of CPU here),
and `httpx.get` / `httpx.post` make a `Client` per call. The canary's metric scrapes, the
readiness polls and the health probes call that often: about 4 s of CPU per release went to
contexts that plain-HTTP loopback calls never use. Every client made here shares one context,
built on first use the way httpx builds its default (certifi's bundle). Proxies and
SSL_CERT_FILE / SSL_CERT_DIR from the environment are ignored (`trust_env=False`; the metric
scrapes used to honour them): every URL the pipeline calls is its own platform's on
127.0.0.1, over plain HTTP.

Plain Python: no dagster import (the core never imports it).
"""

from __future__ import annotations

import functools
import ssl
from typing import Any

import httpx


@functools.cache
def tls_context() -> ssl.SSLContext:
    import certifi

    return ssl.create_default_context(cafile=certifi.where())


def client(**kwargs: Any) -> httpx.Client:
    """`httpx.Client(**kwargs)` with the shared TLS context and `trust_env=False`."""
    kwargs.setdefault("verify", tls_context())
    kwargs.setdefault("trust_env", False)
    return httpx.Client(**kwargs)


CLIENT_ARGUMENTS = ("timeout", "trust_env", "verify", "proxy")


def request(method: str, url: str, **kwargs: Any) -> httpx.Response:
    """One request on a short-lived client, as `httpx.request` but without a context per call
    (the client takes CLIENT_ARGUMENTS, the request everything else)."""
    settings = {name: kwargs.pop(name) for name in CLIENT_ARGUMENTS if name in kwargs}
    settings.setdefault("timeout", 5.0)  # httpx's default
    with client(**settings) as once:
        return once.request(method, url, **kwargs)


def get(url: str, **kwargs: Any) -> httpx.Response:
    return request("GET", url, **kwargs)


def post(url: str, **kwargs: Any) -> httpx.Response:
    return request("POST", url, **kwargs)


def delete(url: str, **kwargs: Any) -> httpx.Response:
    return request("DELETE", url, **kwargs)
