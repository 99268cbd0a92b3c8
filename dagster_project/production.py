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
from dagster_project.core.ownership import process_alive, this_process
from dagster_project.core.reconcile import Reconciliation, reconcile
from dagster_project.jobs import PRODUCT_TAG

# Tags of a run executed in-process by the CLI: the process that executes it.
HOST_TAG, PID_TAG, PID_STARTED_TAG = "release/host", "release/pid", "release/pid_started"

__all__ = ["HOST_TAG", "PID_STARTED_TAG", "PID_TAG", "reconcile_product", "this_process"]


def reconcile_product(product: str, instance: dg.DagsterInstance) -> Reconciliation:
    # Runs whose process died are failed first, so their owners read as dead at once.
    dead_runs = fail_dead_runs(product, instance)
    result = reconcile(product, run_in_progress=run_in_progress(instance))
    result.failed_runs += dead_runs
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


def fail_dead_runs(product: str, instance: dg.DagsterInstance) -> list[str]:
    """Mark failed (and free the pool of) every in-progress run of the product whose executing
    process, recorded in its tags by the CLI, is gone. Runs launched by the daemon are watched
    by Dagster's run monitoring instead."""
    host = this_process()[0]
    dead = []
    runs = instance.get_runs(
        filters=dg.RunsFilter(tags={PRODUCT_TAG: product}, statuses=list(IN_PROGRESS_STATUSES))
    )
    for run in runs:
        tags = run.tags
        # A re-execution copies its parent's tags, but a daemon run worker executes it.
        if tags.get(HOST_TAG) != host or PID_TAG not in tags or "dagster/parent_run_id" in tags:
            continue
        alive = process_alive(int(tags[PID_TAG]), float(tags.get(PID_STARTED_TAG, "0")))
        if not alive and mark_run_failed(instance, run.run_id, "its process died"):
            dead.append(run.run_id)
    return dead
