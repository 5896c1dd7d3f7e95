"""Metric sinks: the console (progress bar + log lines), ``metrics.jsonl`` and Weights & Biases.

Only rank 0 builds sinks; every sink takes one row (a flat dict with ``step``) per log step.
"""

from megatrain.logging.sinks import MetricSinks, build_sinks, setup_console_logging

__all__ = ["MetricSinks", "build_sinks", "setup_console_logging"]
