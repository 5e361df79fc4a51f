"""Benchmark harness: tasks, metrics, runner, report."""

from . import tasks  # noqa: F401  (registers the tasks)
