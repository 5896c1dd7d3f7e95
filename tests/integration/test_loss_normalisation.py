"""A step's loss is the sum of its token losses over the labelled tokens of the whole step, so
splitting the same rows into more micro-batches, or over more ranks, changes nothing.

Documents of very different lengths with ``data.pack_whole_docs=true`` pad rows (label -100)
unevenly, and SFT rows label only their completions, so micro-batches hold different numbers of
labelled tokens: a mean of per-micro-batch means would weigh their tokens differently (both
tests fail with it)."""

from __future__ import annotations

from pathlib import Path

import pytest

from megatrain.training.checkpoint import load_model_weights
from tests.integration.helpers import losses, train

pytestmark = pytest.mark.integration
STEPS = 20
COMMON = ("data.seq_len=128", f"trainer.max_steps={STEPS}", "trainer.log_every=1",
          "trainer.eval_every=1000", f"trainer.save_every={STEPS}")


def _run(root: Path, name: str, data: Path, *overrides: str, nproc: int = 1) -> Path:
    run = root / name
    train(run, data, *COMMON, *overrides, nproc=nproc)
    return run


def _assert_same_run(a: Path, b: Path) -> None:
    la, lb = losses(a), losses(b)
    assert sorted(la) == list(range(1, STEPS + 1)) and sorted(lb) == sorted(la)
    for step in la:
        assert lb[step] == pytest.approx(la[step], rel=1e-5), step
    wa = load_model_weights(a / "checkpoints" / f"step_{STEPS}")
    wb = load_model_weights(b / "checkpoints" / f"step_{STEPS}")
    # Over the whole model: a parameter whose gradient is zero in exact arithmetic (the key bias
    # under softmax) moves by Adam-normalised rounding noise, whatever the normalisation.
    gap = sum(float((wb[k] - w).square().sum()) for k, w in wa.items()) ** 0.5
    size = sum(float(w.square().sum()) for w in wa.values()) ** 0.5
    print(f"weights: relative gap {gap / size:.2e}")
    assert gap / size < 1e-5


def _assert_steps_do_not_depend_on_the_split(root: Path, data: Path, rows: int,
                                             *common: str) -> None:
    """``rows`` per step as 1 micro-batch or 4 (grad accumulation), and as 2 ranks of half or 1
    rank whose 2 loader workers take turns reading the 2 ranks' shares: the same steps."""
    one = _run(root, "ga1", data, *common, f"trainer.micro_batch_size={rows}")
    four = _run(root, "ga4", data, *common, f"trainer.micro_batch_size={rows // 4}",
                "trainer.grad_accum_steps=4")
    _assert_same_run(one, four)
    half = f"trainer.micro_batch_size={rows // 2}"
    ranks = _run(root, "2ranks", data, *common, half, "data.num_workers=1", nproc=2)
    workers = _run(root, "1rank-2workers", data, *common, half, "trainer.grad_accum_steps=2",
                   "data.num_workers=2")
    _assert_same_run(ranks, workers)


def test_more_micro_batches_or_ranks_give_the_same_steps(tmp_path: Path,
                                                          uneven_docs: Path) -> None:
    _assert_steps_do_not_depend_on_the_split(tmp_path, uneven_docs, 4,
                                             "data.pack_whole_docs=true", "optim.lr=3e-3")


def test_sft_steps_do_not_depend_on_how_rows_are_split(tmp_path: Path, sft_dir: Path,
                                                       trained_gpt: Path) -> None:
    """Packed SFT rows (completions labelled only): GA4 x MB2 = GA1 x MB8, 2 ranks = 1 rank."""
    _assert_steps_do_not_depend_on_the_split(tmp_path, sft_dir, 8,
                                             f"model.init_from={trained_gpt}", "optim.lr=1e-3")
