"""Gate on staging, before anything is deployed there: the VCL generated from the product
spec compiles (`varnishd -C`), for both environments and every routing shape (no release, one
track, stable and canary split). A text this varnishd compiled before is not compiled again
(RELEASE_HOME/cache/vcl). A VCL that does not compile never ships; the failure names
the line. Without varnishd installed the gate fails if an environment runs Varnish (naming
the Debian package) and is not applicable otherwise."""

import dagster as dg

from assets.common import stage_input, stage_key, table
from dagster_project.core.contracts import ArtifactRecord
from dagster_project.core.spec import ProductSpec

ENVIRONMENTS = ("staging", "production")


def edge_vcl_check(
    spec: ProductSpec, partitions_def: dg.PartitionsDefinition
) -> dg.AssetChecksDefinition:
    @dg.asset_check(
        asset=stage_key(spec, "schema_migration_check"),
        name="edge_vcl",
        blocking=True,
        partitions_def=partitions_def,
        additional_ins={"build": stage_input(spec, "build")},
        description="The VCL generated from the spec compiles with varnishd -C (line named).",
    )
    def edge_vcl(build: ArtifactRecord) -> dg.AssetCheckResult:
        from dagster_project.core.platform import edges, varnish
        from dagster_project.core.settings import release_home

        on_varnish = [env for env in ENVIRONMENTS if edges.edge_kind(spec, env) == "varnish"]
        result = varnish.vcl_gate(spec, on_varnish, cache_dir=release_home() / "cache" / "vcl")
        columns = [
            "vcl",
            "compiles",
            "cached",
            "line",
            "source_line",
            "message",
            "seconds",
            "lines",
        ]
        return dg.AssetCheckResult(
            passed=result.passed,
            description=f"{build.version}: {result.description}",
            metadata={
                "verdict": result.verdict,
                "compiled": table(result.compiled, columns),
                "varnish_environments": ", ".join(on_varnish) or "(none)",
            },
        )

    return edge_vcl
