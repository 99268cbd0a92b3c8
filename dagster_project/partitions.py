"""One dynamic partition per release of a product; key = the release version."""

import dagster as dg

from dagster_project.core.settings import validate_release_key


def releases_partitions_name(product_id: str) -> str:
    return "releases_" + product_id.replace("-", "_")


def releases_partitions(product_id: str) -> dg.DynamicPartitionsDefinition:
    return dg.DynamicPartitionsDefinition(name=releases_partitions_name(product_id))


def register_release(instance: dg.DagsterInstance, product_id: str, version: str) -> bool:
    """Add the release partition (validated); True if it was new."""
    validate_release_key(version)
    name = releases_partitions_name(product_id)
    if instance.has_dynamic_partition(name, version):
        return False
    instance.add_dynamic_partitions(name, [version])
    return True
