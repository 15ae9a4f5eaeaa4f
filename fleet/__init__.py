"""Running a local fleet on one machine: broker, database and process launchers shared by the
demo (``make demo``), the test-suite and the benchmarks. Production deployments do not use it."""
