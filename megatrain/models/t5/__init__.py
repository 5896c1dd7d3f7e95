"""T5 v1.1 (``model.family=t5``): encoder–decoders with relative position biases."""

from megatrain.models.t5.model import (
    T5,
    T5Config,
    build_t5,
    span_target_ratio,
    t5_flops_per_token,
)
from megatrain.models.t5.positions import RelativePositionBias, relative_position_bucket

__all__ = [
    "T5",
    "RelativePositionBias",
    "T5Config",
    "build_t5",
    "relative_position_bucket",
    "span_target_ratio",
    "t5_flops_per_token",
]
