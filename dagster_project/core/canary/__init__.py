"""Canary analysis: judge (statistics), metric sources, load generator, step loop, snapshots.

Plain Python (no Dagster). Heavy libraries (scipy, matplotlib) load inside the functions that
use them.
"""
