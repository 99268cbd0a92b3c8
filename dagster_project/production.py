"""Production safety from the wiring side: the reconciler with the Dagster instance at hand.

`reconcile_product` runs the core reconciler (`core/reconcile.py`) with the instance's view
of which runs are in progress, then finishes in Dagster what a dead owner left: its run is
marked failed (a killed CLI run would otherwise stay STARTED forever) and its pool slots are
given back. Called by the reconcile sensor, by `deploy` before and after its run, and by the
stages that touch an environment (through `core.reconcile` directly).
"""

from __future__ import annotations

import dagster as dg

from assets.common import IN_PROGRESS_STATUSES, run_in_progress
from dagster_project.core.reconcile import Reconciliation, reconcile


def reconcile_product(product: str, instance: dg.DagsterInstance) -> Reconciliation:
    result = reconcile(product, run_in_progress=run_in_progress(instance))
    for take_over in result.take_overs:
        mark_run_failed(
            instance,
            take_over.owner_run_id,
            f"the run's owner of {take_over.env} was dead ({take_over.why}); reconciled: "
            + (
                f"production change recorded as {take_over.outcome}"
                if take_over.outcome
                else "released"
            ),
        )
    return result


def mark_run_failed(instance: dg.DagsterInstance, run_id: str, why: str) -> bool:
    """Mark a run whose process died as failed and free its pool slots; False if not needed."""
    run = instance.get_run_by_id(run_id)
    if run is None or run.status not in IN_PROGRESS_STATUSES:
        return False
    instance.report_run_failed(run, message=why)
    instance.event_log_storage.free_concurrency_slots_for_run(run_id)
    return True
