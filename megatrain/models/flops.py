"""Training FLOPs per token and model FLOPs utilisation (MFU).

MFU = achieved model FLOP/s ÷ the hardware's peak. It counts the FLOPs the model needs, not what
was executed: activation recomputation does not raise it.
"""

from __future__ import annotations

import torch

# Dense bf16 tensor-core peak in TFLOP/s (no sparsity), matched against the device name in order.
_PEAK_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
    ("H200", 989.0),
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),  # SXM
    ("A100", 312.0),
)


def palm_flops_per_token(n_params: int, n_layers: int, d_model: int, seq_len: int) -> float:
    """6·N + 12·L·d·T (PaLM, appendix B).

    6·N is the forward (2·N) plus backward (4·N) matmuls; 12·L·d·T is attention's scores and
    weighted sum, which no parameter accounts for. N excludes position embeddings (a lookup, not
    a matmul) but includes a tied token embedding once: the output projection is a real matmul.
    """
    return 6.0 * n_params + 12.0 * n_layers * d_model * seq_len


def mfu(tokens_per_s: float, flops_per_token: float, peak_flops: float) -> float:
    """Model FLOPs utilisation in [0, 1]; ``tokens_per_s`` and ``peak_flops`` (FLOP/s) must
    cover the same devices (both per GPU, or both for the whole job)."""
    return tokens_per_s * flops_per_token / peak_flops


def peak_tflops_for(device: torch.device | str) -> float | None:
    """Dense bf16 peak TFLOP/s of a known GPU; None on CPU or an unknown GPU (no MFU then)."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(device)
    for key, tflops in _PEAK_BF16_TFLOPS:
        if key in name:
            return tflops
    return None
