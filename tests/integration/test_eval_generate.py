"""trainer.eval_generate in a real (offline W&B) run: each eval row carries eval_rouge1/2/L/Lsum
equal to rouge-score on what megatrain-eval's code generates for the same rows from the checkpoint
saved at that step; keep_best can pick one; each eval's first answers are a W&B table at the
eval's step, read back from the run's ``.wandb`` transaction log. (ROUGE, not BLEU: after a few
steps the answers share words with the references but no 4-gram, so BLEU is 0 whatever it is
computed on; eval_bleu against sacrebleu: tests/unit/test_eval_during_training.py.)"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.integration.helpers import env_for_tests, metrics, train
from tests.launch.helpers import wandb_records

pytestmark = pytest.mark.integration
rouge_scorer = pytest.importorskip("rouge_score.rouge_scorer")
ROUGE = ["rouge1", "rouge2", "rougeL", "rougeLsum"]


def _rows(shakespeare_text: str, start: Path, path: Path) -> Path:
    """The first words of a long line as the input; as the target, what the model the run
    starts from answers, then the rest of the line: a tiny model's answers share no word with
    Shakespeare's, and the run's scores are to be compared as numbers, not as zeros."""
    from megatrain.eval.model import load_eval_model
    from megatrain.eval.textgen import answer

    lines = [line.split() for line in shakespeare_text.splitlines() if len(line) > 40][:5]
    rows = [(" ".join(words[:4]), "", False) for words in lines]
    loaded = load_eval_model(str(start))
    before = answer(loaded.model, loaded.tokenizer, rows, max_new_tokens=10, batch_size=2)
    path.write_text("".join(json.dumps({"input": prompt, "target": f"{gen} {' '.join(words[4:])}"})
                            + "\n" for (prompt, _, _), gen, words
                            in zip(rows, before.generations, lines)), encoding="utf-8")
    return path


def test_eval_rows_carry_rouge_of_the_saved_model_and_wandb_the_samples(
        tmp_path: Path, prepared_dir: Path, shakespeare_text: str, trained_gpt: Path) -> None:
    from megatrain.eval.inputs import read_pairs
    from megatrain.eval.model import load_eval_model
    from megatrain.eval.textgen import answer

    data = _rows(shakespeare_text, trained_gpt, tmp_path / "rows.jsonl")
    run_dir = tmp_path / "run"
    env = env_for_tests() | {"WANDB_DATA_DIR": str(tmp_path / "wandb-data")}
    train(run_dir, prepared_dir, f"model.init_from={trained_gpt}", "trainer.max_steps=4",
          "trainer.eval_every=2", "trainer.save_every=2", "trainer.eval_steps=1",
          "optim.lr=1e-5", "schedule.warmup_steps=1",
          "trainer.eval_generate.task=rouge", f"trainer.eval_generate.data={data}",
          "trainer.eval_generate.max_examples=5", "trainer.eval_generate.max_new_tokens=10",
          "trainer.eval_generate.batch_size=2", "trainer.eval_generate.table_rows=2",
          "trainer.keep_best=eval_rouge1", "logger.wandb.mode=offline", env=env)

    evals = {r["step"]: r for r in metrics(run_dir) if "eval_loss" in r}
    assert sorted(evals) == [2, 4]
    rows = read_pairs(data, 5)
    scorer = rouge_scorer.RougeScorer(ROUGE)  # its own tokenizer: the rows are ASCII
    answers = {}
    for step in evals:
        loaded = load_eval_model(str(run_dir / "checkpoints" / f"step_{step}"))
        answers[step] = answer(loaded.model, loaded.tokenizer, rows, max_new_tokens=10,
                               batch_size=2)
        scores = [scorer.score(ref, gen) for (_, ref, _), gen
                  in zip(rows, answers[step].generations, strict=True)]
        for kind in ROUGE:
            direct = sum(s[kind].fmeasure for s in scores) / len(scores)
            assert evals[step][f"eval_{kind}"] == pytest.approx(direct, abs=1e-12), (step, kind)
    assert evals[4]["eval_rouge1"] > 0  # a comparison of numbers, not of zeros
    best = json.loads((run_dir / "checkpoints" / "best.json").read_text())
    assert best["metric"] == "eval_rouge1"
    assert best["value"] == max(r["eval_rouge1"] for r in evals.values())

    (folder,) = (run_dir / "wandb").glob("offline-run-*")
    tables = {r.history.step.num: item for r in wandb_records(next(folder.glob("run-*.wandb")))
              if r.WhichOneof("record_type") == "history"
              for item in r.history.item if list(item.nested_key[:2]) == ["eval_samples", "path"]}
    assert sorted(tables) == [2, 4]  # at the eval's own step
    for step, item in tables.items():
        table = json.loads((folder / "files" / json.loads(item.value_json)).read_text())
        assert table["columns"] == ["step", "prompt", "reference", "generation"]
        assert table["data"] == [[step, *row.values()] for row in answers[step].rows(2)]


def test_zero3_ranks_generate_together(tmp_path: Path, prepared_dir: Path,
                                       shakespeare_text: str, trained_gpt: Path) -> None:
    """2 ranks under ZeRO-3 (every forward gathers weights collectively): the run ends, and the
    eval row is megatrain-eval's score of the checkpoint saved at that step."""
    from megatrain.eval.inputs import read_pairs
    from megatrain.eval.model import load_eval_model
    from megatrain.eval.textgen import answer

    data = _rows(shakespeare_text, trained_gpt, tmp_path / "rows.jsonl")
    run_dir = tmp_path / "run"
    train(run_dir, prepared_dir, f"model.init_from={trained_gpt}", "trainer.max_steps=2",
          "trainer.eval_every=2", "trainer.eval_steps=1", "optim.lr=1e-5",
          "schedule.warmup_steps=1", "deepspeed.zero_stage=3", "trainer.collective_timeout_s=60",
          "trainer.eval_generate.task=rouge", f"trainer.eval_generate.data={data}",
          "trainer.eval_generate.max_examples=3", "trainer.eval_generate.max_new_tokens=6",
          "trainer.eval_generate.batch_size=2", nproc=2)
    (row,) = [r for r in metrics(run_dir) if "eval_loss" in r]
    rows = read_pairs(data, 3)
    loaded = load_eval_model(str(run_dir / "checkpoints" / "step_2"))
    scores, _ = answer(loaded.model, loaded.tokenizer, rows, max_new_tokens=6,
                       batch_size=2).score("rouge")
    assert row["eval_rouge1"] == pytest.approx(scores["rouge1"], abs=1e-12)
