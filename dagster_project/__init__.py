"""The release pipeline's code location: wiring (definitions, sensors, schedules, cli),
resources binding the core to Dagster, and the plain-Python core in `core/`."""
