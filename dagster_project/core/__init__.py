"""Plain modules with no Dagster import: settings, database, product spec, local platform,
registry, migration tooling, canary judge, audit chain. Tested on their own."""
