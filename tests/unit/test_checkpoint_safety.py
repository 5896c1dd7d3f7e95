"""Checkpoints are loaded as data only: one whose pickles would call a function (``os.system``)
is refused before anything unpickles it, even with a manifest rewritten to match, while the
checkpoints the trainer and DeepSpeed really write (every ZeRO stage, their universal form)
verify and load."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import pytest
import torch
from torch import nn

from megatrain.cli.export import main as export_main
from megatrain.config import Config
from megatrain.data.prepare.train_tokenizer import train_tokenizer
from megatrain.models import GPT, GPTConfig
from megatrain.training import safe_load
from megatrain.training.checkpoint import (
    UNIVERSAL,
    CheckpointError,
    find_checkpoint,
    load_checkpoint,
    load_model_weights,
    rng_state,
    save_checkpoint,
    universal_checkpoint,
    verify_checkpoint,
    write_manifest,
)
from megatrain.training.engine import initialize_engine
from megatrain.training.pretrained import load_pretrained
from tests.unit.checkpoints import write_stage0_checkpoint

SYSTEM = f"{os.system.__module__}.system"  # how a pickle names os.system (posix.system)


class _Payload:
    """Unpickles as ``os.system("touch <marker>")``: code that a checkpoint must never run."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _plant(ckpt: Path, name: str, marker: Path) -> None:
    """Replace ``ckpt/name`` with a pickle that runs the payload when loaded, and rewrite the
    manifest to match it, as whoever forged the checkpoint would."""
    torch.save({"module": {}, "payload": _Payload(marker)}, ckpt / name)
    write_manifest(ckpt)


def test_the_payload_runs_code_when_unpickled_unchecked(tmp_path: Path) -> None:
    """The control: the planted file does run code under ``weights_only=False`` (how DeepSpeed
    loads its files), so the tests that find no marker below mean something."""
    marker = tmp_path / "ran"
    _plant(tmp_path, "x.pt", marker)
    torch.load(tmp_path / "x.pt", weights_only=False)
    assert marker.exists()


# --- a ZeRO-0 checkpoint as model.init_from, export and generate read it ---------------------


@pytest.fixture(scope="module")
def tokenizer_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    corpus = Path(json.__file__).read_text()[:8000]
    return train_tokenizer([corpus], tmp_path_factory.mktemp("tok") / "tokenizer.model", 512)


def _stage0(run: Path, step: int, tokenizer: Path) -> Path:
    """A genuine ZeRO-0 checkpoint of a tiny GPT with its ``rank0.pt``, verified."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layers=1, d_model=16, n_heads=2, d_ff=32, vocab_size=512,
                          max_seq_len=16))
    ckpt = write_stage0_checkpoint(run / "checkpoints" / f"step_{step}", "gpt", model, tokenizer)
    torch.save({"rng": rng_state(), "stream": {"consumed": 3}}, ckpt / "rank0.pt")
    write_manifest(ckpt)
    assert verify_checkpoint(ckpt) is None
    return ckpt


@pytest.mark.parametrize("name", ["rank0.pt", "mp_rank_00_model_states.pt"])
def test_a_checkpoint_that_would_run_code_is_refused_everywhere(
        tmp_path: Path, tokenizer_path: Path, caplog: pytest.LogCaptureFixture,
        capsys: pytest.CaptureFixture[str], name: str) -> None:
    """Our own per-rank file and DeepSpeed's model file: verify names the file and the global;
    resume (explicit or auto), ``model.init_from`` and export refuse it; nothing runs."""
    run, marker = tmp_path / "run", tmp_path / "ran"
    _stage0(run, 5, tokenizer_path)
    ckpt = _stage0(run, 10, tokenizer_path)
    _plant(ckpt, name, marker)

    problem = verify_checkpoint(ckpt)
    assert problem == (f"{name} would run code when loaded (it references {SYSTEM}, which is not "
                       "allowed): megatrain loads checkpoints as data only")
    with pytest.raises(CheckpointError, match=f"step_10 is corrupt: {name} would run code"):
        find_checkpoint(run, str(ckpt))
    with caplog.at_level("WARNING", logger="megatrain"):
        assert find_checkpoint(run, "auto") == run / "checkpoints" / "step_5"
    assert f"step_10 is not usable ({name} would run code" in caplog.text
    with pytest.raises(CheckpointError, match=f"{name} would run code"):
        load_pretrained(str(ckpt))  # model.init_from=<ckpt>
    assert export_main(["--checkpoint", str(ckpt), "--out", str(tmp_path / "hf")]) != 0
    assert f"{name} would run code" in capsys.readouterr().err
    assert not marker.exists()


def test_the_data_only_load_refuses_code_itself(tmp_path: Path) -> None:
    """``safe_load.load`` (our own files: rank<R>.pt, universal optimizer state) refuses a
    payload even where nothing verified the checkpoint first."""
    marker = tmp_path / "ran"
    _plant(tmp_path, "rank0.pt", marker)
    with pytest.raises(pickle.UnpicklingError, match=SYSTEM):
        safe_load.load(tmp_path / "rank0.pt")
    assert not marker.exists()


def test_a_file_that_is_not_a_torch_zip_is_refused(tmp_path: Path) -> None:
    """The legacy (non-zip) torch format cannot be mapped: refused rather than left to
    DeepSpeed's unchecked load."""
    torch.save({"w": torch.ones(2)}, tmp_path / "old.pt", _use_new_zipfile_serialization=False)
    assert safe_load.check_pickles(tmp_path) == ("old.pt is not a zip file as torch.save writes "
                                                 "it, so it cannot be loaded as data only: "
                                                 "megatrain refuses it")


def test_an_fp16_loss_scaler_loads_as_data(tmp_path: Path) -> None:
    """fp16 (GPUs only) keeps DeepSpeed's dynamic loss scaler in its ZeRO optimizer files; it
    loads as data like the static one the CPU runs write."""
    from deepspeed.runtime.fp16.loss_scaler import CreateLossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum

    args = {"init_scale": 2.0**16, "scale_window": 1000, "min_scale": 1.0, "delayed_shift": 2,
            "consecutive_hysteresis": False}
    scaler = CreateLossScaler(torch.half, 0, True, args)
    name = "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    torch.save({"loss_scaler": scaler, "zero_stage": ZeroStageEnum.gradients}, tmp_path / name)
    assert safe_load.check_pickles(tmp_path) is None
    loaded = safe_load.load(tmp_path / name)["loss_scaler"]
    assert type(loaded) is type(scaler) and vars(loaded) == vars(scaler)


# --- real DeepSpeed checkpoints, written in this process on one rank (conftest's one_rank) ----


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 32), nn.LayerNorm(32), nn.GELU(), nn.Linear(32, 8))


def _engine(stage: int, precision: str, load_universal: bool = False):
    cfg = Config()
    cfg.deepspeed.zero_stage, cfg.trainer.micro_batch_size = stage, 4
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return initialize_engine(_model(), cfg, precision, 1, device, load_universal)[0]


def _step(engine, seed: int) -> float:
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(seed))
    loss = engine(x.to(engine.device, next(engine.module.parameters()).dtype)).float().square()
    engine.backward(loss.mean())
    engine.step()
    return loss.mean().item()


class _Tokenizer:
    """What ``save_checkpoint`` asks of a tokenizer."""

    def save(self, folder: Path) -> None:
        (folder / "tokenizer.model").write_bytes(b"not read here")


def _save(engine, root: Path, stage: int, precision: str) -> Path:
    """One step, then a checkpoint as the trainer writes it (our rank state included)."""
    _step(engine, 1)
    meta = {"world_size": 1, "zero_stage": stage, "precision": precision}
    state = {"rng": rng_state(), "stream": {"consumed": 4}, "progress": {"step": 1}}
    return save_checkpoint(engine, root, 1, 0, state, meta, _Tokenizer(), keep_last=2)


@pytest.mark.parametrize("stage, precision", [(0, "fp32"), (1, "fp32"), (2, "fp32"),
                                              (3, "fp32"), (2, "bf16")])
def test_a_genuine_checkpoint_verifies_and_resumes_exactly(
        tmp_path: Path, one_rank: None, stage: int, precision: str) -> None:
    """A checkpoint as the trainer writes it verifies (its pickles need nothing beyond the
    allowlist) and restores DeepSpeed's state and ours exactly; so does its universal form
    (ZeRO 1-3), which elastic resume writes into the checkpoint folder; its weights load."""
    engine = _engine(stage, precision)
    ckpt = _save(engine, tmp_path / "checkpoints", stage, precision)
    assert verify_checkpoint(ckpt) is None
    want = [_step(engine, 2), _step(engine, 3)]

    for layout in ["same", UNIVERSAL] if stage > 0 else ["same"]:
        if layout == UNIVERSAL:
            universal_checkpoint(ckpt, rank=0)
            assert any((ckpt / UNIVERSAL).rglob("*.pt"))
            assert verify_checkpoint(ckpt) is None  # universal/ is checked too
        resumed = _engine(stage, precision, load_universal=layout == UNIVERSAL)
        state = load_checkpoint(resumed, ckpt, 0, layout)
        assert state["stream"] == {"consumed": 4} and len(state["rng"]["numpy"][1]) == 624
        got = [_step(resumed, 2), _step(resumed, 3)]
        # the universal form re-flattens the ZeRO-3 optimizer state: equal up to rounding
        assert got == (want if layout == "same" else pytest.approx(want, rel=1e-5)), layout

    weights = load_model_weights(ckpt)
    assert {k: v.shape for k, v in weights.items()} == \
        {k: v.shape for k, v in _model().state_dict().items()}


def test_a_zero_checkpoint_that_would_run_code_is_refused(tmp_path: Path, one_rank: None) -> None:
    """DeepSpeed's ZeRO optimizer file (read by zero_to_fp32 for init_from, export and generate,
    and by the engine on resume), and a file planted in ``universal/`` (which the manifest does
    not cover: elastic resume writes it later), also through a symlinked folder."""
    marker = tmp_path / "ran"
    ckpt = _save(_engine(2, "fp32"), tmp_path / "checkpoints", 2, "fp32")
    optim = "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    genuine = (ckpt / optim).read_bytes()
    _plant(ckpt, optim, marker)
    with pytest.raises(CheckpointError, match=f"{optim} would run code .* {SYSTEM}"):
        load_model_weights(ckpt)
    (ckpt / optim).write_bytes(genuine)
    write_manifest(ckpt)
    assert verify_checkpoint(ckpt) is None

    universal_checkpoint(ckpt, rank=0)
    assert verify_checkpoint(ckpt) is None
    step = next((ckpt / UNIVERSAL / "zero").glob("*/step.pt"))
    torch.save(_Payload(marker), step)
    assert f"{step.relative_to(ckpt)} would run code" in verify_checkpoint(ckpt)

    elsewhere = tmp_path / "elsewhere"
    (ckpt / UNIVERSAL).rename(elsewhere)
    (ckpt / UNIVERSAL).symlink_to(elsewhere, target_is_directory=True)
    assert f"{UNIVERSAL}/zero/" in verify_checkpoint(ckpt)
    assert not marker.exists()
