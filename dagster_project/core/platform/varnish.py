"""Varnish as the edge of an environment: VCL generated from the product spec and the route
table, compiled with `varnishd -C`, loaded into the running varnishd without a restart.

What the VCL does (the same contract as the embedded edge, edge.py):

- Traffic is split between the `stable` and `canary` backends by the route table's weights
  (`std.random` against the canary's share), chosen in `vcl_recv`. A weight change is a new
  VCL: `vcl.load` + `vcl.use` through varnishadm, which keeps the cache (objects do not belong
  to a VCL).
- The cache key is the URL; the track is a `Vary` dimension (`X-Edge-Track`, never shown to
  clients), so a canary answer never fills the stable cache, and a purge by URL removes every
  track's copy. Unlike the embedded edge the key does not contain the release: after a
  promotion the stable objects of the previous release stay until their TTL runs out or they
  are purged, as on a real CDN; that is what the selective purge after a promotion is for.
- A spec endpoint's 200 is cached as the origin's `Cache-Control` says (the TTL of its class
  when the origin sends none), with the class's grace; its
  surrogate keys (spec plus origin's `Surrogate-Key`) are indexed by the xkey vmod. Anything
  else is cached only as the origin's `Cache-Control` allows, never heuristically (no
  `Cache-Control` -> `no-store`; `default_ttl` is 0). A request with `Authorization` is
  passed to the origin, never cached.
- Responses carry `Age`, `X-Cache: HIT|MISS`, `X-Release`, `X-Track`, `Surrogate-Key`.
- `POST /_edge/purge` and the `PURGE` method are answered only for loopback clients
  presenting the environment's purge key in `X-Purge-Key` (403 otherwise): by surrogate key
  (`X-Purge-Surrogate-Key`, xkey) or by URL (`X-Purge-URL`, or the `PURGE` request's own URL;
  every track's copy, `purge.hard()`); the answer is `{"purged": <objects removed>}`.
- `GET /_edge/health` answers `{"status": "ok", ...}` with the routes generation.

varnishd runs under supervisord in the foreground (`-F`) with its working directory
`$RELEASE_HOME/varnish/<product>-<env>` (`-n`), the admin CLI on 127.0.0.1 with a secret
file, and `-f` the last VCL written, so a restart by supervisord serves the current routes.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import secrets
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dagster_project.core.platform import processes
from dagster_project.core.platform.errors import PlatformError
from dagster_project.core.spec import ProductSpec

VARNISHD = "varnishd"
VARNISHADM = "varnishadm"
DEBIAN_PACKAGES = ("varnish", "varnish-modules")
# The vmods the VCL imports; xkey comes from varnish-modules.
VMODS = ("std", "xkey", "purge")
STORAGE = "malloc,128m"
ADMIN_TIMEOUT_SECONDS = 30.0
COMPILE_TIMEOUT_SECONDS = 60.0
# The purge key written into the VCLs the edge_vcl gate compiles (the same length as a real
# one, `secrets.token_urlsafe(32)`); never a key any edge accepts.
GATE_PLACEHOLDER_KEY = "vcl-gate-placeholder-" + "0" * 22
# Values interpolated into VCL strings and regexes: never a quote, brace or backslash.
_SAFE_VALUE = re.compile(r"^[A-Za-z0-9 ._:/+=@-]*$")
_SAFE_PATH = re.compile(r"^/[A-Za-z0-9/._-]*$")
_SAFE_KEY = re.compile(r"^[A-Za-z0-9._:@-]+$")
_VCL_ERROR_LINE = re.compile(r"\('(?P<file>[^']*)' Line (?P<line>\d+) Pos (?P<pos>\d+)\)")


class VclError(PlatformError):
    """The VCL could not be generated, compiled or loaded; the message names why and where."""


def binaries_missing() -> list[str]:
    """Which of varnishd / varnishadm / the xkey vmod are not installed (empty: all are)."""
    missing = [b for b in (VARNISHD, VARNISHADM) if shutil.which(b) is None]
    if not missing and not _vmod_installed("xkey"):
        missing.append("the xkey vmod")
    return missing


def install_hint() -> str:
    return f"install the Debian packages {' and '.join(DEBIAN_PACKAGES)} (apt-get install " + (
        " ".join(DEBIAN_PACKAGES) + ")"
    )


def _vmod_installed(name: str) -> bool:
    for root in ("/usr/lib/x86_64-linux-gnu/varnish/vmods", "/usr/lib/varnish/vmods"):
        if Path(root, f"libvmod_{name}.so").is_file():
            return True
    # Other layouts: ask pkg-config-free, by globbing the usual prefixes.
    return any(Path("/usr").glob(f"lib*/**/varnish/vmods/libvmod_{name}.so"))


# -- the VCL -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Backend:
    track: str
    host: str
    port: int
    version: str
    weight: int


def backends_from_routes(routes: Mapping[str, Any]) -> list[Backend]:
    """The route table (`PlatformState.routes`) as backends with their weights."""
    weights = {str(k): int(v) for k, v in dict(routes.get("weights") or {}).items()}
    found = []
    for track, upstream in sorted(dict(routes.get("upstreams") or {}).items()):
        url = str(upstream["url"])
        match = re.fullmatch(r"http://(127\.0\.0\.1|localhost):(\d+)/?", url)
        if match is None:
            raise VclError(f"route of {track}: upstream {url!r} is not http://127.0.0.1:<port>")
        found.append(
            Backend(
                track=track,
                host="127.0.0.1",
                port=int(match[2]),
                version=str(upstream["version"]),
                weight=weights.get(track, 0),
            )
        )
    return found


def _literal(value: str, what: str) -> str:
    if not _SAFE_VALUE.fullmatch(value):
        raise VclError(
            f"{what} {value[:80]!r} cannot go into VCL: only letters, digits, space and "
            "._:/+=@- are allowed"
        )
    return f'"{value}"'


def _json(*parts: tuple[str, str]) -> str:
    """A VCL string expression: literal pieces (JSON text, written as VCL strings that cannot
    end early: a long string `{"..."}` never holds a `}`) joined with VCL expressions."""
    out: list[str] = []
    for kind, text in parts:
        if kind == "expr":
            out.append(text)
            continue
        for chunk in re.split(r"(\})", text):
            if not chunk:
                continue
            out.append(f'"{chunk}"' if '"' not in chunk else '{"' + chunk + '"}')
    return " + ".join(out) or '""'


def _grace(spec: ProductSpec, ttl_class: str) -> int:
    grace = spec.platform.edge_grace_seconds.get(ttl_class)  # type: ignore[call-overload]
    return int(grace) if grace is not None else 0


def render_vcl(spec: ProductSpec, env: str, routes: Mapping[str, Any], purge_key: str) -> str:
    """The environment's VCL for this route table. Raises VclError for a value that cannot be
    written into VCL (the message names the spec field)."""
    backends = backends_from_routes(routes)
    generation = int(routes.get("generation") or 0)
    key = _literal(purge_key, "the purge key")
    serving = [b for b in backends if b.weight > 0]
    lines = [
        "vcl 4.1;",
        f"# Generated by dagster_project.core.platform.varnish for {spec.product}/{env},",
        f"# routes generation {generation}. Do not edit: the platform rewrites it.",
        "",
        "import std;",
        "import xkey;",
        "import purge;",
        "",
    ]
    for b in serving:
        lines += [
            f"backend b_{b.track} {{",
            f'    .host = "{b.host}";',
            f'    .port = "{b.port}";',
            "    .connect_timeout = 2s;",
            "    .first_byte_timeout = 10s;",
            "    .between_bytes_timeout = 10s;",
            "}",
        ]
    if not serving:
        lines.append("backend b_none none;")
    lines += [
        "",
        "acl edge_admin {",
        '    "127.0.0.1";',
        '    "::1";',
        "}",
        "",
        "sub vcl_recv {",
        "    # Never trust what a client says about the edge's own decisions.",
        "    unset req.http.X-Edge-Track;",
        "    unset req.http.X-Edge-Purge;",
        "    unset req.http.X-Edge-Purged;",
        '    if (req.url == "/_edge/health" && req.method == "GET") {',
        '        return (synth(200, "health"));',
        "    }",
        '    if (req.method == "PURGE" || req.url ~ "^/_edge/") {',
        f"        if (client.ip !~ edge_admin || req.http.X-Purge-Key != {key}) {{",
        '            return (synth(403, "refused"));',
        "        }",
        '        if (req.url ~ "^/_edge/purge" && req.method != "POST") {',
        '            return (synth(405, "POST only"));',
        "        }",
        "        if (req.http.X-Purge-Surrogate-Key) {",
        "            set req.http.X-Edge-Purged = xkey.purge(req.http.X-Purge-Surrogate-Key);",
        '            return (synth(200, "purged"));',
        "        }",
        '        if (req.method == "PURGE" && !req.http.X-Purge-URL) {',
        "            set req.http.X-Purge-URL = req.url;",
        "        }",
        '        if (req.http.X-Purge-URL ~ "^/") {',
        "            set req.url = req.http.X-Purge-URL;",
        '            set req.http.X-Edge-Purge = "url";',
        '            set req.http.X-Edge-Track = "stable";',
        '            set req.method = "GET";',
        "            return (hash);",
        "        }",
        '        if (req.url ~ "^/_edge/routes") {',
        '            return (synth(501, "routes"));',
        "        }",
        '        return (synth(400, "bad purge"));',
        "    }",
    ]
    if serving:
        stable = next((b for b in serving if b.track == "stable"), None)
        canary = next((b for b in serving if b.track == "canary"), None)
        if stable and canary:
            share = canary.weight * 100.0 / (canary.weight + stable.weight)
            lines += [
                f"    if (std.random(0, 100) < {share:.3f}) {{",
                "        set req.backend_hint = b_canary;",
                '        set req.http.X-Edge-Track = "canary";',
                "    } else {",
                "        set req.backend_hint = b_stable;",
                '        set req.http.X-Edge-Track = "stable";',
                "    }",
            ]
        else:
            only = stable or canary
            assert only is not None
            lines += [
                f"    set req.backend_hint = b_{only.track};",
                f'    set req.http.X-Edge-Track = "{only.track}";',
            ]
    else:
        lines.append('    return (synth(503, "no upstream"));')
    lines += [
        '    if (req.method != "GET" && req.method != "HEAD") {',
        "        return (pass);",
        "    }",
        "    if (req.http.Authorization) {",
        "        # Per-user answers are never shared.",
        "        return (pass);",
        "    }",
        "    return (hash);",
        "}",
        "",
        "sub vcl_hash {",
        "    hash_data(req.url);",
        "    return (lookup);",
        "}",
        "",
        "sub vcl_hit {",
        "    if (req.http.X-Edge-Purge) {",
        "        set req.http.X-Edge-Purged = purge.hard();",
        '        return (synth(200, "purged"));',
        "    }",
        "}",
        "",
        "sub vcl_miss {",
        "    if (req.http.X-Edge-Purge) {",
        "        set req.http.X-Edge-Purged = purge.hard();",
        '        return (synth(200, "purged"));',
        "    }",
        "}",
        "",
        "sub vcl_backend_response {",
        "    # The track is a variant of the URL's object; clients never see it.",
        "    if (beresp.http.Vary) {",
        '        set beresp.http.Vary = beresp.http.Vary + ", X-Edge-Track";',
        "    } else {",
        '        set beresp.http.Vary = "X-Edge-Track";',
        "    }",
        "    if (!beresp.http.X-Track) {",
        "        set beresp.http.X-Track = bereq.http.X-Edge-Track;",
        "    }",
    ]
    for b in serving:
        lines += [
            f'    if (!beresp.http.X-Release && bereq.http.X-Edge-Track == "{b.track}") {{',
            f"        set beresp.http.X-Release = {_literal(b.version, 'release version')};",
            "    }",
        ]
    lines += _endpoint_rules(spec)
    lines += [
        "    if (!beresp.http.Cache-Control) {",
        "        # Never cached heuristically: what the origin does not allow is not stored.",
        '        set beresp.http.Cache-Control = "no-store";',
        "    }",
        '    if (beresp.http.Cache-Control ~ "(no-store|no-cache|private)") {',
        "        set beresp.uncacheable = true;",
        "        set beresp.ttl = 0s;",
        "        return (deliver);",
        "    }",
        "}",
        "",
        "sub vcl_backend_error {",
        '    set beresp.http.Content-Type = "application/json";',
        "    set beresp.http.X-Track = bereq.http.X-Edge-Track;",
        '    set beresp.http.Cache-Control = "no-store";',
        "    set beresp.uncacheable = true;",
        "    set beresp.ttl = 0s;",
        "    synthetic("
        + _json(
            ("lit", f'{{"error": "no healthy upstream for {env}: the '),
            ("expr", "bereq.http.X-Edge-Track"),
            ("lit", f' API failed", "env": "{env}"}}'),
        )
        + ");",
        "    return (deliver);",
        "}",
        "",
        "sub vcl_deliver {",
        "    if (obj.hits > 0) {",
        '        set resp.http.X-Cache = "HIT";',
        "    } else {",
        '        set resp.http.X-Cache = "MISS";',
        "    }",
        '    set resp.http.Vary = regsub(resp.http.Vary, "(^|,\\s*)X-Edge-Track$", "");',
        '    if (resp.http.Vary == "") {',
        "        unset resp.http.Vary;",
        "    }",
        "    unset resp.http.xkey;",
        "    unset resp.http.Via;",
        "}",
        "",
        "sub vcl_synth {",
        '    set resp.http.Content-Type = "application/json";',
        '    set resp.http.Cache-Control = "no-store";',
        '    if (resp.reason == "health") {',
        "        synthetic("
        + _json(
            (
                "lit",
                f'{{"status": "ok", "edge": "varnish", "product": "{spec.product}", '
                f'"env": "{env}", "generation": {generation}}}',
            )
        )
        + ");",
        '    } elsif (resp.reason == "purged") {',
        "        synthetic("
        + _json(("lit", '{"purged": '), ("expr", "req.http.X-Edge-Purged"), ("lit", "}"))
        + ");",
        '    } elsif (resp.reason == "refused") {',
        "        synthetic("
        + _json(
            (
                "lit",
                '{"error": "refused: only loopback clients with the environment\'s '
                'X-Purge-Key may do this"}',
            )
        )
        + ");",
        '    } elsif (resp.reason == "routes") {',
        "        synthetic("
        + _json(
            (
                "lit",
                '{"error": "this edge is Varnish: its routes are loaded as VCL through '
                'varnishadm by the platform"}',
            )
        )
        + ");",
        '    } elsif (resp.reason == "no upstream") {',
        "        synthetic("
        + _json(
            (
                "lit",
                f'{{"error": "no healthy upstream for {env}: no release is serving '
                f'(weights > 0 with a running API)", "env": "{env}"}}',
            )
        )
        + ");",
        "    } else {",
        "        synthetic("
        + _json(("lit", '{"error": "'), ("expr", "resp.reason"), ("lit", '"}'))
        + ");",
        "    }",
        "    return (deliver);",
        "}",
        "",
    ]
    return "\n".join(lines)


def _endpoint_rules(spec: ProductSpec) -> list[str]:
    """TTL, grace and surrogate keys per spec endpoint: exact path, else the longest endpoint
    that is a directory prefix (as the embedded edge matches)."""
    endpoints = sorted(spec.endpoints, key=lambda e: len(e.path.rstrip("/") or "/"), reverse=True)
    lines: list[str] = []
    keyword = "if"
    for index, endpoint in enumerate(endpoints):
        path = endpoint.path.rstrip("/") or "/"
        pattern = "^" + re.escape(path).replace("\\/", "/") + "(/[^?]*)?(\\?.*)?$"
        if not _SAFE_PATH.fullmatch(path):
            raise VclError(f"endpoints[{index}].path: {path[:80]!r} cannot go into VCL")
        for key in endpoint.surrogate_keys:
            if not _SAFE_KEY.fullmatch(key):
                raise VclError(
                    f"endpoints[{index}].surrogate_keys: {key[:80]!r} cannot be a surrogate key "
                    "(letters, digits and ._:@- only)"
                )
        ttl = spec.ttl_classes[endpoint.ttl_class]
        grace = _grace(spec, endpoint.ttl_class)
        lines += [
            f'    {keyword} (beresp.status == 200 && bereq.url ~ "{pattern}") {{',
            f"        # {endpoint.path}: {endpoint.ttl_class} (TTL {ttl}s, grace {grace}s)",
            "        # The origin's Cache-Control decides; the class TTL only when it sends none.",
            "        if (!beresp.http.Cache-Control) {",
            f'            set beresp.http.Cache-Control = "public, s-maxage={ttl}";',
            f"            set beresp.ttl = {ttl}s;",
            "        }",
            '        if (beresp.http.Cache-Control ~ "(no-store|no-cache|private)") {',
            "            set beresp.uncacheable = true;",
            "            set beresp.ttl = 0s;",
            "            return (deliver);",
            "        }",
            f"        set beresp.grace = {grace}s;",
        ]
        for key in endpoint.surrogate_keys:  # the spec's keys, each once, after the origin's
            word = "(^|\\s)" + re.escape(key) + "(\\s|$)"
            lines += [
                f'        if (beresp.http.Surrogate-Key !~ "{word}") {{',
                "            set beresp.http.Surrogate-Key = "
                f'regsub(beresp.http.Surrogate-Key + " {key}", "^ ", "");',
                "        }",
            ]
        lines += [
            "        if (beresp.http.Surrogate-Key) {",
            "            set beresp.http.xkey = beresp.http.Surrogate-Key;",
            "        }",
        ]
        lines += ["        return (deliver);", "    }"]
        keyword = "elsif"
    return lines


# -- compiling -------------------------------------------------------------------------------


@dataclass(frozen=True)
class CompileResult:
    ok: bool
    seconds: float
    line: int | None = None
    column: int | None = None
    message: str = ""
    source_line: str = ""
    cached: bool = False  # the same text compiled before by the same varnishd and C compiler

    def describe(self, name: str = "the VCL") -> str:
        if self.cached:
            return f"{name} compiles (varnishd -C: the same text compiled before by this varnishd)"
        if self.ok:
            return f"{name} compiles (varnishd -C, {self.seconds:.2f}s)"
        where = f" line {self.line}" + (f" column {self.column}" if self.column else "")
        shown = f": `{self.source_line.strip()}`" if self.source_line.strip() else ""
        where = where if self.line else " (no line given)"
        return f"{name} does not compile at{where}{shown}: {self.message}"


def compile_vcl(vcl: str) -> CompileResult:
    """Compile `vcl` with `varnishd -C` (VCL to C, then the C compiler), in a scratch working
    directory. VclError when varnishd is not installed."""
    if shutil.which(VARNISHD) is None:
        raise VclError(f"{VARNISHD} not found on PATH: {install_hint()}")
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="vcl-") as scratch:
        path = Path(scratch) / "edge.vcl"
        path.write_text(vcl)
        done = subprocess.run(
            [VARNISHD, "-C", "-j", "none", "-n", str(Path(scratch) / "n"), "-f", str(path)],
            capture_output=True,
            text=True,
            timeout=COMPILE_TIMEOUT_SECONDS,
            check=False,
        )
    seconds = time.monotonic() - started
    if done.returncode == 0:
        return CompileResult(ok=True, seconds=seconds)
    return _compile_failure(done.stderr or done.stdout, vcl, seconds)


def compile_vcl_once(vcl: str, cache_dir: Path) -> CompileResult:
    """`compile_vcl`, remembering passes in `cache_dir`: the compiler's verdict on a text is
    the same every time, and each compile costs the C compiler ~0.4 s of CPU (four per
    release). Keyed by the text and by the varnishd and C compiler binaries (path, size,
    mtime), so an upgrade of either compiles again. Failures are never remembered: each
    one is compiled afresh, its line and message from this compiler."""
    identity = _compiler_identity()
    digest = hashlib.sha256(f"{identity}\n{vcl}".encode()).hexdigest()
    marker = cache_dir / f"{digest}.ok"
    if marker.is_file():
        return CompileResult(ok=True, seconds=0.0, cached=True)
    result = compile_vcl(vcl)
    if result.ok:
        _write_private(marker, f"{identity}\n")  # atomic: a reader sees it whole or not
    return result


def _compiler_identity() -> str:
    found = []
    for name in (VARNISHD, "cc", "gcc"):
        path = shutil.which(name)
        if path is None:
            continue
        stat = Path(path).resolve().stat()
        found.append(f"{name}={Path(path).resolve()}:{stat.st_size}:{stat.st_mtime_ns}")
    return " ".join(found)


def _compile_failure(output: str, vcl: str, seconds: float) -> CompileResult:
    text = "\n".join(
        line
        for line in output.splitlines()
        if line.strip() and not line.startswith("Could not delete")
    )
    match = _VCL_ERROR_LINE.search(text)
    line = int(match["line"]) if match else None
    column = int(match["pos"]) if match else None
    source = vcl.splitlines()[line - 1] if line and line <= len(vcl.splitlines()) else ""
    reason = text.split("\n")[0:2]
    message = " ".join(r.strip() for r in reason if r.strip() != "Message from VCC-compiler:")
    return CompileResult(
        ok=False,
        seconds=seconds,
        line=line,
        column=column,
        message=message or text[:300] or "varnishd -C failed without a message",
        source_line=source,
    )


# -- the running varnishd ------------------------------------------------------------------


@dataclass(frozen=True)
class VarnishInstance:
    """The files and addresses of one environment's varnishd."""

    workdir: Path
    port: int

    @property
    def vcl_path(self) -> Path:
        return self.workdir / "edge.vcl"

    @property
    def secret_path(self) -> Path:
        return self.workdir / "secret"

    @property
    def admin_port_path(self) -> Path:
        return self.workdir / "admin_port"

    @property
    def name_dir(self) -> Path:
        return self.workdir / "n"

    def prepare(self) -> int:
        """The working directory, the admin secret and port (kept across restarts). Returns
        the admin port."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        if not self.secret_path.is_file():
            _write_private(self.secret_path, secrets.token_hex(32) + "\n")
        if self.admin_port_path.is_file():
            return int(self.admin_port_path.read_text().strip())
        from dagster_project.core.platform.processes import free_port

        port = free_port()
        _write_private(self.admin_port_path, f"{port}\n")
        return port

    def argv(self) -> list[str]:
        admin = self.prepare()
        return [
            shutil.which(VARNISHD) or VARNISHD,
            "-F",
            "-j",
            "none",
            "-n",
            str(self.name_dir),
            "-a",
            f"127.0.0.1:{self.port}",
            "-T",
            f"127.0.0.1:{admin}",
            "-S",
            str(self.secret_path),
            "-f",
            str(self.vcl_path),
            "-s",
            STORAGE,
            "-p",
            "default_ttl=0",
            "-p",
            "default_grace=0",
            "-p",
            "thread_pool_min=10",
            "-p",
            "thread_pools=1",
        ]

    def write_vcl(self, vcl: str) -> None:
        """The VCL a (re)start loads (`-f`), replaced atomically."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        _write_private(self.vcl_path, vcl)

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Serialises VCL loads of this varnishd across processes."""
        with processes.file_lock(self.workdir):
            yield

    def admin(self, *command: str, timeout: float = ADMIN_TIMEOUT_SECONDS) -> str:
        """One varnishadm command; VclError with varnishd's answer on failure."""
        admin_port = self.prepare()
        done = subprocess.run(
            [
                VARNISHADM,
                "-T",
                f"127.0.0.1:{admin_port}",
                "-S",
                str(self.secret_path),
                "-t",
                str(int(timeout)),
                *command,
            ],
            capture_output=True,
            text=True,
            timeout=timeout + 5,
            check=False,
        )
        if done.returncode != 0:
            answer = (done.stdout + done.stderr).strip()
            raise VclError(f"varnishadm {command[0]} failed (exit {done.returncode}): {answer}")
        return done.stdout

    def load(self, vcl: str, generation: int) -> dict[str, Any]:
        """Load the VCL of routes generation `generation` into the running varnishd under a
        new name, make it active, discard the VCLs it replaced (the cache survives), and
        only then make it what a restart loads (`-f`). A table older than the active one is
        not applied (a slow caller never undoes a newer push). Returns timings."""
        started = time.monotonic()
        name = f"g{generation}_{int(time.time() * 1000)}_{secrets.token_hex(2)}"
        with self.lock():
            active = _generation_of(self.active_vcl())
            if active is not None and generation < active:
                return {"applied": False, "vcl": self.active_vcl(), "active_generation": active}
            self.workdir.mkdir(parents=True, exist_ok=True)
            candidate = self.workdir / "edge.next.vcl"
            _write_private(candidate, vcl)
            try:
                self.admin("vcl.load", name, str(candidate))
            except VclError as exc:
                raise VclError(f"VCL {candidate} was not loaded: {exc}") from None
            loaded = time.monotonic()
            self.admin("vcl.use", name)
            used = time.monotonic()
            os.replace(candidate, self.vcl_path)
            for other in self.vcl_names():
                if other != name:
                    with contextlib.suppress(VclError):  # still busy: discarded when cold
                        self.admin("vcl.discard", other)
        return {
            "applied": True,
            "vcl": name,
            "load_seconds": round(loaded - started, 4),
            "use_seconds": round(used - loaded, 4),
        }

    def vcl_names(self) -> list[str]:
        names = []
        for line in self.admin("vcl.list").splitlines():
            parts = line.split()
            if len(parts) >= 4 and parts[0] in ("active", "available", "discarded"):
                names.append(parts[-1])
        return names

    def active_vcl(self) -> str | None:
        for line in self.admin("vcl.list").splitlines():
            parts = line.split()
            if parts and parts[0] == "active":
                return parts[-1]
        return None

    def remove_files(self) -> None:
        shutil.rmtree(self.workdir, ignore_errors=True)


def _generation_of(vcl_name: str | None) -> int | None:
    """The routes generation a loaded VCL's name carries (`g<generation>_...`)."""
    match = re.match(r"^g(\d+)_", vcl_name or "")
    return int(match[1]) if match else None


def _write_private(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(3)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
    os.replace(tmp, path)


# -- the gate --------------------------------------------------------------------------------


@dataclass(frozen=True)
class VclGateResult:
    """What the `edge_vcl` gate found: every VCL the release can run with compiled, or the
    first that did not (its line), or why it was not judged."""

    passed: bool
    verdict: str  # pass | fail | not_applicable
    description: str
    compiled: list[dict[str, Any]]


def representative_routes() -> list[dict[str, Any]]:
    """Route tables covering every branch the generated VCL has: no release, one track, and
    stable and canary split."""
    upstream = {"url": "http://127.0.0.1:9", "version": "0.0.0", "artifact_sha": "0" * 64}
    return [
        {"generation": 1, "weights": {"stable": 100, "canary": 0}, "upstreams": {}},
        {
            "generation": 2,
            "weights": {"stable": 100, "canary": 0},
            "upstreams": {"stable": upstream},
        },
        {
            "generation": 3,
            "weights": {"stable": 95, "canary": 5},
            "upstreams": {"stable": upstream, "canary": {**upstream, "url": "http://127.0.0.1:10"}},
        },
    ]


def vcl_gate(
    spec: ProductSpec, varnish_envs: list[str], cache_dir: Path | None = None
) -> VclGateResult:
    """Compile (`varnishd -C`) the VCL generated from `spec` for each environment and each
    representative route table. Without varnishd: a failure if an environment runs Varnish
    (naming the package), else not applicable (no VCL ships). With `cache_dir`, a text that
    compiled before is not compiled again (`compile_vcl_once`)."""
    if binaries_missing():
        if varnish_envs:
            return VclGateResult(
                False,
                "fail",
                f"{', '.join(varnish_envs)} run(s) Varnish but {', '.join(binaries_missing())} "
                f"is not installed: {install_hint()}",
                [],
            )
        return VclGateResult(
            True,
            "not_applicable",
            "no environment runs Varnish and varnishd is not installed: no VCL ships",
            [],
        )
    from concurrent.futures import ThreadPoolExecutor

    # Never the environment's own key; fixed, so the same spec gives the same texts.
    placeholder_key = GATE_PLACEHOLDER_KEY
    # Every routing shape for staging; production's VCL differs only in its name.
    wanted = [("staging", r) for r in representative_routes()]
    wanted.append(("production", representative_routes()[-1]))
    vcls: list[tuple[str, str]] = []
    for env, routes in wanted:
        name = f"{env} VCL, routes {sorted(routes['upstreams']) or 'none'}"
        try:
            vcls.append((name, render_vcl(spec, env, routes, placeholder_key)))
        except VclError as exc:
            return VclGateResult(False, "fail", f"{name} cannot be generated: {exc}", [])

    def compile_one(vcl: str) -> CompileResult:
        return compile_vcl(vcl) if cache_dir is None else compile_vcl_once(vcl, cache_dir)

    with ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(compile_one, [vcl for _, vcl in vcls]))
    compiled = [
        {
            "vcl": name,
            "compiles": result.ok,
            "line": result.line,
            "source_line": result.source_line.strip(),
            "message": result.message,
            "seconds": round(result.seconds, 3),
            "cached": result.cached,
            "lines": len(vcl.splitlines()),
        }
        for (name, vcl), result in zip(vcls, results, strict=True)
    ]
    for (name, _), result in zip(vcls, results, strict=True):
        if not result.ok:
            return VclGateResult(False, "fail", result.describe(name), compiled)
    return VclGateResult(
        True,
        "pass",
        f"{len(compiled)} generated VCLs compile with varnishd -C"
        + (f" (Varnish runs in {', '.join(varnish_envs)})" if varnish_envs else ""),
        compiled,
    )
