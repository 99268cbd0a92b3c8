"""The guardrail token: verified against the spec's fingerprint, masked everywhere but the
audit trail. The token itself is never stored by this module."""

from __future__ import annotations

import hashlib
import hmac

TOKEN_ENV_VAR = "GUARDRAIL_TOKEN"


class ApprovalRefused(PermissionError):
    """The guardrail token is missing or wrong. The message names the variable, never a value."""


def fingerprint(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def mask(token: str | None) -> str:
    """Keep the first four and last two characters (`tpt-*****ce`): enough to tell tokens apart."""
    if not token:
        return "(none)"
    if len(token) < 8:
        return "*****"
    return f"{token[:4]}*****{token[-2:]}"


def verify(token: str | None, expected_sha256: str, env_var: str = TOKEN_ENV_VAR) -> str:
    """Return the token if its SHA-256 matches `expected_sha256` (constant-time compare)."""
    if not token:
        raise ApprovalRefused(
            f"approval refused: the environment variable {env_var} is not set; "
            "production changes require the guardrail token"
        )
    if not hmac.compare_digest(fingerprint(token), expected_sha256):
        raise ApprovalRefused(
            f"approval refused: the token in {env_var} does not match the product's "
            "guardrail fingerprint"
        )
    return token


def scrub(text: str, token: str | None) -> str:
    """Replace any occurrence of the token in `text` with its masked form."""
    return text.replace(token, mask(token)) if token else text
