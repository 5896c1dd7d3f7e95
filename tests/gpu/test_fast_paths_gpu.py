"""The GPU fast paths on a CUDA GPU: cuDNN attention gives flash's numbers (and really runs),
compiled blocks train like eager ones, fp8 trains close to bf16, and training steps between log
steps make no host sync (tests/unit/test_gpu_fast_paths.py checks the CPU side)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatrain.models.common.attention import (
    cudnn_pays,
    eager_attention,
    make_attention_fn,
    resolve_attn_impl,
)
from megatrain.models.gpt2 import GPT, GPTConfig
from megatrain.models.llama import Llama, LlamaConfig
from megatrain.training.transforms import apply_transforms

CUDA = torch.device("cuda")
REPO = Path(__file__).resolve().parents[2]


def _hopper() -> bool:
    return cudnn_pays(torch.cuda.get_device_capability(), torch.bfloat16, bias=False)


def _qkv(hs: int, T: int = 512, B: int = 2, nh: int = 8) -> list[torch.Tensor]:
    g = torch.Generator(device="cuda").manual_seed(0)
    return [torch.randn(B, nh, T, hs, generator=g, device=CUDA, dtype=torch.bfloat16,
                        requires_grad=True) for _ in range(3)]


def _fwd_bwd(impl: str, qkv: list[torch.Tensor], causal: bool) -> list[torch.Tensor]:
    for t in qkv:
        t.grad = None
    out = make_attention_fn(impl)(*qkv, causal, 0.0)
    out.backward(torch.ones_like(out))
    return [out.detach().float()] + [t.grad.float() for t in qkv]


def _kernel_names(impl: str, qkv: list[torch.Tensor]) -> str:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        _fwd_bwd(impl, qkv, True)
        torch.cuda.synchronize()
    return " ".join(e.key.lower() for e in prof.key_averages())


@pytest.mark.skipif(not torch.backends.cudnn.is_available(), reason="no cuDNN")
@pytest.mark.parametrize("hs", [64, 128])
@pytest.mark.parametrize("causal", [True, False])
def test_cudnn_matches_flash_forward_and_backward(hs: int, causal: bool) -> None:
    qkv = _qkv(hs)
    ref = _fwd_bwd("sdpa", qkv, causal)  # SDPA pinned to FlashAttention
    got = _fwd_bwd("cudnn", qkv, causal)
    exact = eager_attention(*(t.detach().float() for t in qkv), causal)
    torch.testing.assert_close(got[0], exact, atol=2e-2, rtol=2e-2)
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, ref, strict=True):
        torch.testing.assert_close(a, b, atol=3e-2, rtol=3e-2, msg=name)


@pytest.mark.skipif(not torch.backends.cudnn.is_available(), reason="no cuDNN")
def test_cudnn_kernel_really_runs_on_hopper() -> None:
    if not _hopper():
        pytest.skip("cuDNN attention is preferred from compute capability 9.0")
    names = _kernel_names("cudnn", _qkv(64))
    assert "cudnn" in names or "fmha" in names or "sm90" in names, names[:400]
    assert "pytorch_flash" not in names, names[:400]  # SDPA's own FlashAttention-2 kernel


def test_auto_picks_cudnn_on_hopper_without_flash_attn() -> None:
    impl = resolve_attn_impl("auto", CUDA, torch.bfloat16)
    if impl == "flash_attn":
        pytest.skip("the flash_attn package is installed: auto prefers it")
    assert impl == ("cudnn" if _hopper() else "sdpa")


def test_cudnn_never_falls_back_to_math() -> None:
    q, k, v = (t.detach() for t in _qkv(512, T=128))  # beyond cuDNN's and flash's head sizes
    with pytest.raises(RuntimeError):
        make_attention_fn("cudnn")(q, k, v, True, 0.0)


def _gpt() -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(n_layers=4, d_model=256, n_heads=4, d_ff=1024, vocab_size=512,
                         max_seq_len=256), device=CUDA, dtype=torch.bfloat16)


def _train(model: torch.nn.Module, steps: int, vocab: int, T: int = 256) -> list[float]:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    g = torch.Generator(device="cuda").manual_seed(1)
    batches = [torch.randint(0, vocab, (8, T), device=CUDA, generator=g) for _ in range(4)]
    losses = []
    for step in range(steps):
        ids = batches[step % len(batches)]  # repeated: the loss must fall
        logits = model(ids[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1),
                                                 ids[:, 1:].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def test_compiled_blocks_train_like_eager() -> None:
    torch._dynamo.reset()
    eager = _train(_gpt(), 8, 512)
    compiled_model = apply_transforms(_gpt(), activation_checkpointing=False, compile=True)
    compiled = _train(compiled_model, 8, 512)
    assert compiled[0] == pytest.approx(eager[0], abs=2e-2)
    assert compiled[-1] == pytest.approx(eager[-1], abs=5e-2)
    assert compiled[-1] < compiled[0] - 0.5
    torch._dynamo.reset()


def test_fp8_trains_close_to_bf16() -> None:
    pytest.importorskip("torchao.float8")
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("fp8 needs compute capability 8.9")

    def llama() -> Llama:
        torch.manual_seed(0)
        return Llama(LlamaConfig(n_layers=4, d_model=512, n_heads=8, n_kv_heads=8, d_ff=1536,
                                 vocab_size=1024, max_seq_len=256), device=CUDA,
                     dtype=torch.bfloat16)

    bf16 = _train(llama(), 20, 1024)
    model = apply_transforms(llama(), activation_checkpointing=False, compile=True, fp8=True)
    from torchao.float8.float8_linear import Float8Linear

    assert sum(isinstance(m, Float8Linear) for m in model.modules()) == 4 * 4  # qkv, proj, mlp
    fp8 = _train(model, 20, 1024)
    assert all(torch.isfinite(torch.tensor(fp8)))
    assert fp8[-1] == pytest.approx(bf16[-1], abs=0.15), (fp8, bf16)
    assert fp8[-1] < fp8[0] - 1.0


def test_training_steps_make_no_host_sync(tmp_path: Path) -> None:
    """The real trainer (DeepSpeed, bf16, compiled blocks) between log steps, with the non-finite
    guard off (its one documented sync per step): no synchronising CUDA call at all."""
    out = tmp_path / "probe.json"
    args = ["data=stdlib", "model=gpt2-tiny", "data.seq_len=256", "trainer.micro_batch_size=8",
            "trainer.skip_nonfinite=false", "trainer.log_every=1000", "trainer.eval_every=1000",
            "trainer.save_every=1000", "logger.wandb.mode=disabled", "logger.progress=false",
            f"run.dir={tmp_path / 'run'}"]
    result = subprocess.run([sys.executable, "-m", "tests.sync_probe", str(out), *args],
                            cwd=REPO, env=dict(os.environ, PYTHONUNBUFFERED="1"),
                            capture_output=True, text=True, timeout=420, check=False)
    assert result.returncode == 0, result.stderr[-4000:]
    found = json.loads(out.read_text())
    assert found["device"].startswith("cuda")
    assert found["reads"] == [], found
    assert found["cuda_syncs"] == 0, found["sync_messages"]
