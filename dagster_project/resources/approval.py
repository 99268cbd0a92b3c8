"""Approval of production changes: the guardrail token from the environment.

The token is read through `dagster.EnvVar` when an approval is asked for, never stored in run
config, tags or metadata. A missing variable is a refusal naming the variable (not a config
error), so the pipeline can say what is missing and leave production untouched.
"""

from __future__ import annotations

from dataclasses import dataclass

import dagster as dg

from dagster_project.core import guardrail
from dagster_project.core.spec import ProductSpec


@dataclass(frozen=True)
class Approval:
    approver: str
    token: str  # only ever handed to the audit trail

    def __repr__(self) -> str:  # keep the token out of logs and tracebacks
        return f"Approval(approver={self.approver!r}, token={guardrail.mask(self.token)!r})"


class ApprovalResource(dg.ConfigurableResource):
    token_env_var: str = guardrail.TOKEN_ENV_VAR

    def presented_token(self) -> str | None:
        return dg.EnvVar(self.token_env_var).get_value() or None

    def approve(self, spec: ProductSpec) -> Approval:
        """Verify the presented token against the spec's fingerprint; raises ApprovalRefused."""
        from dagster_project.core.identity import approver_identity

        token = guardrail.verify(
            self.presented_token(), spec.guardrail.token_sha256, self.token_env_var
        )
        return Approval(approver=approver_identity(), token=token)
