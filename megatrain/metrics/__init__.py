"""What a run measures and where it goes: throughput and MFU (``throughput.py``), and the sinks
(``sinks.py``): the console (progress bar + log lines), ``metrics.jsonl`` and Weights & Biases.

Only rank 0 builds sinks; every sink takes one row (a flat dict with ``step``) per log step.
"""

from megatrain.metrics.sinks import MetricSinks, ResumePoint, build_sinks, setup_console_logging

__all__ = ["MetricSinks", "ResumePoint", "build_sinks", "setup_console_logging"]
