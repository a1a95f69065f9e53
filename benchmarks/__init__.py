"""The benchmarks, a package: run each from the repository root as ``python -m benchmarks.NAME``
(docs/benchmarks.md lists them with the commands that give the published figures)."""
