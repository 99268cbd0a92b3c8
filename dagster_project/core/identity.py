"""Who is making a production change: the approver identity recorded in the audit trail.

Precedence (first one set wins):

1. `RELEASE_ACTOR`      - an explicit CI identity set by the pipeline's caller -> `ci:<value>`
                          (a value that already names its kind, e.g. `svc:deploybot`, is kept)
2. CI-provided users    - `GITHUB_ACTOR` -> `ci:github:<login>`,
                          `GITLAB_USER_LOGIN` -> `ci:gitlab:<login>`
3. the OS user          - `getpass.getuser()` -> `user:<name>` (`uid:<n>` if the uid has no name)
"""

from __future__ import annotations

import getpass
import os
import re
from dataclasses import dataclass

ENV_RELEASE_ACTOR = "RELEASE_ACTOR"

# CI systems that expose the login of whoever triggered the job, in precedence order.
CI_ACTOR_VARIABLES: tuple[tuple[str, str], ...] = (
    ("GITHUB_ACTOR", "github"),
    ("GITLAB_USER_LOGIN", "gitlab"),
)

# Identities end up in audit payloads and CLI tables: printable, one line, bounded.
_IDENTITY_RE = re.compile(r"^[^\x00-\x1f\x7f]{1,200}$")


@dataclass(frozen=True)
class Identity:
    value: str  # e.g. `ci:alice`, `ci:github:alice`, `user:root`
    source: str  # where it came from: an environment variable name, or `os-user`


def resolve_identity() -> Identity:
    """The approver identity and where it came from (see the module doc for the precedence)."""
    actor = _from_env(ENV_RELEASE_ACTOR)
    if actor:
        value = actor if ":" in actor else f"ci:{actor}"
        return Identity(value=value, source=ENV_RELEASE_ACTOR)
    for variable, system in CI_ACTOR_VARIABLES:
        login = _from_env(variable)
        if login:
            return Identity(value=f"ci:{system}:{login}", source=variable)
    try:
        return Identity(value=f"user:{getpass.getuser()}", source="os-user")
    except (OSError, KeyError):  # no LOGNAME/USER and no passwd entry (bare containers)
        return Identity(value=f"uid:{os.getuid()}", source="os-user")


def approver_identity() -> str:
    """`RELEASE_ACTOR`, else the CI's user variable, else the OS user, e.g. `ci:alice`."""
    return resolve_identity().value


def _from_env(variable: str) -> str | None:
    raw = os.environ.get(variable, "").strip()
    if not raw:
        return None
    if not _IDENTITY_RE.match(raw):
        raise ValueError(
            f"environment variable {variable} is not a usable identity: it must be one line "
            "of 1-200 printable characters"
        )
    return raw
