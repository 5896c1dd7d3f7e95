"""T5's relative positions: a learned bias per (bucket of key - query distance, head).

Nearby distances get a bucket each; farther ones share logarithmically wider buckets up to
``max_distance``, beyond which all fall into the last bucket, so there is no hard length limit.
The bucketing follows Mesh TensorFlow (and Hugging Face's ``T5Attention``) exactly, so imported
biases land in the buckets they were trained for.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def relative_position_bucket(relative_position: Tensor, bidirectional: bool, num_buckets: int,
                             max_distance: int) -> Tensor:
    """Bucket in [0, num_buckets) of each ``relative_position`` = key position - query position.

    Bidirectional (encoder): half the buckets for keys after the query, half for keys before.
    Causal (decoder): keys after the query (masked anyway) share bucket 0 with distance 0.
    """
    buckets = torch.zeros_like(relative_position)
    if bidirectional:
        num_buckets //= 2
        buckets = (relative_position > 0).long() * num_buckets
        distance = relative_position.abs()
    else:
        distance = (-relative_position).clamp(min=0)
    max_exact = num_buckets // 2
    # log(0) would be -inf; the clamp only touches distances that take the exact branch.
    scaled = (torch.log(distance.clamp(min=1).float() / max_exact)
              / math.log(max_distance / max_exact) * (num_buckets - max_exact))
    far = (max_exact + scaled.long()).clamp(max=num_buckets - 1)
    return buckets + torch.where(distance < max_exact, distance, far)


class RelativePositionBias(nn.Module):
    """(1, nh, Tq, Tk) additive attention bias from a (num_buckets, nh) table.

    One per stack, computed once per forward and shared by all its layers (T5 keeps the table in
    the first layer's self-attention; megatrain keeps it beside the blocks so each block stays a
    plain, checkpointable unit).
    """

    def __init__(self, n_heads: int, num_buckets: int, max_distance: int,
                 bidirectional: bool) -> None:
        super().__init__()
        self.num_buckets, self.max_distance = num_buckets, max_distance
        self.bidirectional = bidirectional
        self.weight = nn.Parameter(torch.empty(num_buckets, n_heads))

    def forward(self, Tq: int, Tk: int, query_offset: int = 0) -> Tensor:
        """``query_offset``: the queries sit at positions offset..offset + Tq - 1 (a decode step
        after cached ones)."""
        device = self.weight.device
        query = torch.arange(query_offset, query_offset + Tq, device=device)[:, None]
        key = torch.arange(Tk, device=device)[None, :]
        buckets = relative_position_bucket(key - query, self.bidirectional, self.num_buckets,
                                           self.max_distance)  # (Tq, Tk)
        return F.embedding(buckets, self.weight).permute(2, 0, 1).unsqueeze(0)  # (1, nh, Tq, Tk)

    def extra_repr(self) -> str:
        return (f"num_buckets={self.num_buckets}, max_distance={self.max_distance}, "
                f"bidirectional={self.bidirectional}")
