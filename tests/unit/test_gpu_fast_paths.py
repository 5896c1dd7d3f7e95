"""The GPU fast paths, as far as a CPU can check them: which SDPA kernels a call may use (never
the math kernel), when ``auto`` picks cuDNN attention, ``trainer.compile``'s rule and its parity
with eager, which linears ``trainer.fp8`` converts and where it is refused. tests/gpu runs the
kernels themselves."""

from __future__ import annotations

import logging

import pytest
import torch
from torch.nn.attention import SDPBackend

from megatrain.config.schema import TrainerConfig
from megatrain.errors import ConfigError
from megatrain.models.common import attention
from megatrain.models.common.attention import (
    cudnn_pays,
    eager_attention,
    make_attention_fn,
    resolve_attn_impl,
    sdpa_kernels,
)
from megatrain.models.gpt2 import GPT, GPTConfig
from megatrain.models.llama import Llama, LlamaConfig
from megatrain.training.fp8 import apply_fp8, fp8_linear_names, fp8_problem
from megatrain.training.transforms import apply_transforms, resolve_compile

CUDA = torch.device("cuda")

# --- SDPA kernels -----------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("masked", [True, False])
@pytest.mark.parametrize("cudnn", [True, False])
def test_sdpa_never_lists_the_math_kernel(dtype: torch.dtype, masked: bool, cudnn: bool) -> None:
    kernels = sdpa_kernels(dtype, masked, cudnn)
    assert kernels and SDPBackend.MATH not in kernels


def test_cudnn_comes_first_then_flash_for_plain_half_attention() -> None:
    assert sdpa_kernels(torch.bfloat16, masked=False, cudnn=True) == [
        SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION]
    assert sdpa_kernels(torch.bfloat16, masked=False, cudnn=False) == [SDPBackend.FLASH_ATTENTION]
    # fp32 and masks: cuDNN's fused kernel takes neither, so cudnn changes nothing there
    assert sdpa_kernels(torch.float32, False, True) == sdpa_kernels(torch.float32, False, False)
    assert sdpa_kernels(torch.bfloat16, True, True) == [SDPBackend.EFFICIENT_ATTENTION]


@pytest.mark.parametrize(("capability", "dtype", "bias", "pays"), [
    ((9, 0), torch.bfloat16, False, True),   # H100 / H200
    ((10, 0), torch.float16, False, True),   # Blackwell
    ((8, 0), torch.bfloat16, False, False),  # A100: FlashAttention-2 is at home there
    ((8, 9), torch.bfloat16, False, False),
    ((9, 0), torch.float32, False, False),
    ((9, 0), torch.bfloat16, True, False),   # T5's bias
])
def test_the_cudnn_rule(capability: tuple[int, int], dtype: torch.dtype, bias: bool,
                        pays: bool) -> None:
    assert cudnn_pays(capability, dtype, bias) is pays


@pytest.fixture
def fake_gpu(monkeypatch: pytest.MonkeyPatch):
    """A CUDA GPU of a chosen compute capability, without the flash_attn package."""
    def install(capability: tuple[int, int]) -> None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
        monkeypatch.setattr(torch.backends.cudnn, "is_available", lambda: True)
        monkeypatch.setattr(attention, "_flash_attn_module", lambda: "flash_attn not installed")
    return install


def test_auto_picks_cudnn_on_hopper_and_logs_it(fake_gpu, caplog) -> None:
    fake_gpu((9, 0))
    with caplog.at_level(logging.INFO, logger="megatrain.models.common.attention"):
        assert resolve_attn_impl("auto", CUDA, torch.bfloat16) == "cudnn"
    assert "attention backend: cudnn (SDPA with cuDNN attention first, then FlashAttention: " \
           "compute capability 9.0 >= 9.0" in caplog.text


@pytest.mark.parametrize(("capability", "dtype", "bias", "expected"), [
    ((8, 0), torch.bfloat16, False, "sdpa"),
    ((9, 0), torch.float32, False, "sdpa"),
    ((9, 0), torch.bfloat16, True, "flex"),
])
def test_auto_keeps_flash_elsewhere(fake_gpu, capability: tuple[int, int], dtype: torch.dtype,
                                    bias: bool, expected: str) -> None:
    fake_gpu(capability)
    assert resolve_attn_impl("auto", CUDA, dtype, bias=bias) == expected


@pytest.mark.parametrize(("device", "dtype", "bias", "message"), [
    ("cpu", torch.bfloat16, False, "attn_impl=cudnn: needs a CUDA GPU"),
    ("cuda", torch.float32, False, "attn_impl=cudnn: needs fp16 or bf16"),
    ("cuda", torch.bfloat16, True, "attn_impl=cudnn: cannot add an attention bias"),
])
def test_cudnn_refusals(fake_gpu, device: str, dtype: torch.dtype, bias: bool,
                        message: str) -> None:
    fake_gpu((9, 0))
    with pytest.raises(ConfigError, match=message):
        resolve_attn_impl("cudnn", device, dtype, bias=bias)


def test_cudnn_is_a_model_attn_impl() -> None:
    from megatrain.config.schema import ModelConfig
    from megatrain.models.registry import resolve_model_config

    cfg = resolve_model_config(ModelConfig(family="gpt", size="gpt2-tiny", attn_impl="cudnn"),
                               vocab_size=256)
    assert cfg.attn_impl == "cudnn"


def test_cudnn_name_runs_sdpa_on_cpu() -> None:
    """On a CPU ``attn_impl=cudnn`` is plain SDPA (no cuDNN kernel runs): the name maps to an
    attention that matches eager's. The cuDNN kernel itself: tests/gpu."""
    q, k, v = (torch.randn(2, 4, 16, 8, generator=torch.Generator().manual_seed(i))
               for i in range(3))
    out = make_attention_fn("cudnn")(q, k, v, True, 0.0)
    torch.testing.assert_close(out, eager_attention(q, k, v, True), atol=1e-5, rtol=1e-5)


# --- compile ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("setting", "device", "zero", "on"), [
    ("auto", "cpu", 0, False), ("auto", "cuda", 0, True), ("auto", "cuda", 2, True),
    ("auto", "cuda", 3, False), ("on", "cpu", 0, True), ("off", "cuda", 0, False),
    ("True", "cpu", 0, True), ("False", "cuda", 0, False), (True, "cpu", 0, True),
])
def test_the_compile_rule(setting: str, device: str, zero: int, on: bool) -> None:
    assert resolve_compile(setting, torch.device(device), zero) is on


def test_compile_default_is_auto_and_bad_values_stop() -> None:
    assert TrainerConfig().compile == "auto" and TrainerConfig().fp8 is False
    with pytest.raises(ConfigError, match="trainer.compile='blocks' is not one of auto, on, off"):
        resolve_compile("blocks", torch.device("cpu"))


def _tiny_gpt() -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(n_layers=1, d_model=32, n_heads=2, d_ff=64, vocab_size=64,
                         max_seq_len=16), device="cpu", dtype=torch.float32)


def _loss_and_grads(model: torch.nn.Module, ids: torch.Tensor) -> tuple[torch.Tensor, dict]:
    logits = model(ids)
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids.flatten())
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def test_compiled_blocks_match_eager() -> None:
    """Inductor's CPU code for a 1-layer GPT: the same loss and gradients as eager."""
    torch._dynamo.reset()
    eager, compiled = _tiny_gpt(), _tiny_gpt()
    apply_transforms(compiled, activation_checkpointing=False, compile=True)
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1))
    loss, grads = _loss_and_grads(eager, ids)
    closs, cgrads = _loss_and_grads(compiled, ids)
    torch.testing.assert_close(closs, loss, atol=1e-5, rtol=1e-5)
    assert cgrads.keys() == grads.keys()
    for name in grads:
        torch.testing.assert_close(cgrads[name], grads[name], atol=1e-5, rtol=1e-4, msg=name)
    torch._dynamo.reset()


# --- fp8 --------------------------------------------------------------------------------------


@pytest.mark.parametrize(("device", "capability", "problem"), [
    ("cpu", None, "needs a CUDA GPU with compute capability >= 8.9 (the run is on cpu)"),
    ("cuda", (8, 0), "needs compute capability >= 8.9 (Ada, Hopper); this GPU has 8.0"),
    ("cuda", (8, 9), None), ("cuda", (9, 0), None),
])
def test_fp8_needs_ada_or_hopper(device: str, capability: tuple[int, int] | None,
                                 problem: str | None) -> None:
    assert fp8_problem(device, capability) == problem


def test_fp8_converts_the_blocks_linears_not_the_head() -> None:
    model = Llama(LlamaConfig(n_layers=2, d_model=64, n_heads=4, n_kv_heads=2, d_ff=168,
                              vocab_size=96, max_seq_len=32), device="cpu", dtype=torch.float32)
    names = fp8_linear_names(model)
    linears = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert names and set(names) < linears
    assert all(n.startswith("blocks.") for n in names)
    assert not any("head" in n for n in names)  # the LM head stays in bf16
    for name in names:
        m = model.get_submodule(name)
        assert m.in_features % 16 == 0 and m.out_features % 16 == 0
    left_in_blocks = {n for n in linears - set(names) if n.startswith("blocks.")}
    assert left_in_blocks  # the MLP's linears: d_ff 168 is not a multiple of 16
    for name in left_in_blocks:
        m = model.get_submodule(name)
        assert m.in_features % 16 or m.out_features % 16


def test_fp8_skips_dimensions_that_do_not_divide_by_16() -> None:
    model = GPT(GPTConfig(n_layers=1, d_model=40, n_heads=2, d_ff=80, vocab_size=64,
                          max_seq_len=16), device="cpu", dtype=torch.float32)
    assert fp8_linear_names(model) == []  # d_model 40: every block linear has a 40 side


def test_fp8_is_refused_on_a_cpu_in_one_line() -> None:
    with pytest.raises(ConfigError, match=r"^trainer.fp8=true needs a CUDA GPU .*"
                                          r"set trainer.fp8=false$"):
        apply_transforms(_tiny_gpt(), activation_checkpointing=False, compile=False, fp8=True)


def test_fp8_swaps_exactly_the_chosen_linears(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("torchao.float8")
    from torchao.float8.float8_linear import Float8Linear

    from megatrain.training import fp8

    monkeypatch.setattr(fp8, "fp8_problem", lambda device: None)  # conversion only: no GPU
    model = _tiny_gpt()
    before = dict(model.named_parameters())
    converted = apply_fp8(model, "cpu")
    assert converted == sorted(fp8_linear_names(_tiny_gpt()))
    swapped = sorted(n for n, m in model.named_modules() if isinstance(m, Float8Linear))
    assert swapped == converted
    assert dict(model.named_parameters()).keys() == before.keys()  # checkpoints load as before
