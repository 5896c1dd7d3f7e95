"""FP8 training of the transformer blocks' linear layers (``trainer.fp8``), through torchao.

Hopper and newer GPUs (compute capability >= 8.9) multiply fp8 matrices at twice the bf16 rate.
torchao's ``convert_to_float8_training`` swaps chosen ``nn.Linear`` modules for ``Float8Linear``:
the weights stay in their training dtype (so optimizer, checkpoints and export are unchanged;
parameter names too), and each matmul casts its inputs, weights and output gradients to fp8 with
dynamic per-tensor scales. Only the blocks' linears whose both dimensions divide by 16 (what the
fp8 matmul needs) are converted: the embeddings, the LM / task heads and the final norm stay in
bf16, where fp8 costs accuracy for little speed. Off by default; refused on a CPU and on a GPU
below compute capability 8.9, and where torchao is missing (``pip install megatrain[fp8]``).
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from megatrain.errors import ConfigError

log = logging.getLogger("megatrain")
FP8_MIN_CAPABILITY = (8, 9)  # Ada / Hopper: fp8 tensor cores
FP8_DIM_MULTIPLE = 16


def fp8_problem(device: torch.device | str, capability: tuple[int, int] | None = None) -> str | None:
    """Why fp8 training cannot run on ``device``, or None when it can. ``capability``: the GPU's
    compute capability (read from the device when None)."""
    device = torch.device(device)
    if device.type != "cuda":
        return f"needs a CUDA GPU with compute capability >= 8.9 (the run is on {device.type})"
    major, minor = capability or torch.cuda.get_device_capability(device)
    if (major, minor) < FP8_MIN_CAPABILITY:
        return f"needs compute capability >= 8.9 (Ada, Hopper); this GPU has {major}.{minor}"
    return None


def fp8_linear_names(model: nn.Module) -> list[str]:
    """The qualified names of the linears fp8 converts: inside ``model.blocks``, both dimensions
    divisible by 16. Heads and embeddings are outside the blocks and stay as they are."""
    in_blocks = {id(m) for block in model.blocks for m in block.modules()}
    return [name for name, m in model.named_modules()
            if isinstance(m, nn.Linear) and id(m) in in_blocks
            and m.in_features % FP8_DIM_MULTIPLE == 0 and m.out_features % FP8_DIM_MULTIPLE == 0]


def _convert() -> object:
    try:
        from torchao.float8 import convert_to_float8_training
    except ImportError as err:
        raise ConfigError(f"trainer.fp8=true needs torchao (pip install megatrain[fp8]): {err}"
                          ) from err
    return convert_to_float8_training


def apply_fp8(model: nn.Module, device: torch.device | str) -> list[str]:
    """Convert the blocks' eligible linears to torchao's Float8Linear in place; their names."""
    problem = fp8_problem(device)
    if problem is not None:
        raise ConfigError(f"trainer.fp8=true {problem}; set trainer.fp8=false")
    convert = _convert()
    names = set(fp8_linear_names(model))
    convert(model, module_filter_fn=lambda _module, fqn: fqn in names)
    log.info("trainer.fp8: %d of %d linear layers train in fp8 (torchao Float8Linear, dynamic "
             "per-tensor scales); heads and embeddings stay %s", len(names),
             sum(isinstance(m, nn.Linear) for m in model.modules()),
             next(model.parameters()).dtype)
    return sorted(names)
