"""trainer.eval_generate: a bad task, family, file or field is a one-line ConfigError before
anything is built; the task run on an in-memory model gives megatrain-eval's generations and
sacrebleu's score, in lockstep too (what ranks of a ZeRO-3 run do). The run itself (metrics.jsonl,
the W&B table, keep_best): tests/integration/test_eval_generate.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from megatrain.config.schema import Config, EvalGenerateConfig
from megatrain.errors import ConfigError
from megatrain.eval.during_training import GenerationEval
from megatrain.eval.inputs import read_pairs
from megatrain.eval.model import load_eval_model
from megatrain.eval.textgen import answer, prompt_text
from megatrain.models.generation import default_encode, generate_ids
from megatrain.training.run import check_eval_generate
from tests.unit.eval_fixtures import tiny_checkpoint

sacrebleu = pytest.importorskip("sacrebleu")
pytest.importorskip("rouge_score")

ROWS = [{"prompt": "The quick brown", "completion": "fox jumps over the lazy dog"},
        {"prompt": "def add(a, b):", "completion": "    return a + b"},
        {"prompt": "Short", "completion": "one."},
        {"prompt": "我爱北京", "completion": "天安门"},
        {"prompt": "print(add(2,", "completion": "3))"}]


def _rows_file(tmp_path: Path, rows: list[dict] = ROWS, name: str = "rows.jsonl") -> Path:
    path = tmp_path / name
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows),
                    encoding="utf-8")
    return path


def _config(family: str = "gpt", **keys: object) -> Config:
    cfg = Config()
    cfg.model.family = family
    for key, value in keys.items():
        setattr(cfg.trainer.eval_generate, key, value)
    return cfg


def test_off_by_default() -> None:
    assert Config().trainer.eval_generate.task is None
    check_eval_generate(Config())
    assert GenerationEval.build(EvalGenerateConfig(), "bert") is None


@pytest.mark.parametrize(("family", "keys", "message"), [
    ("gpt", {"task": "accuracy"},
     "trainer.eval_generate.task=accuracy is not a generation task; valid: bleu, rouge"),
    ("bert", {"task": "bleu"},
     "trainer.eval_generate.task=bleu: model.family=bert does not generate text"),
    ("gpt", {"task": "rouge"}, "trainer.eval_generate.data: set the JSONL of"),
    ("gpt", {"task": "rouge", "data": "MISSING"},
     "trainer.eval_generate.data=.*missing.jsonl is not a file"),
    ("gpt", {"task": "rouge", "data": "FOLDER"},
     "trainer.eval_generate.data=.*/test_what[^/]* is not a file"),
    ("gpt", {"task": "bleu", "data": "NOFIELD"},
     "trainer.eval_generate: .*nofield.jsonl:2: no 'completion' string field"),
    ("gpt", {"task": "bleu", "data": "ROWS", "bleu_tokenize": "xyz"},
     "trainer.eval_generate: --bleu-tokenize xyz is not a sacrebleu tokenizer"),
])
def test_what_cannot_run_is_a_one_line_config_error(tmp_path: Path, family: str, keys: dict,
                                                    message: str) -> None:
    files = {"MISSING": tmp_path / "missing.jsonl", "FOLDER": tmp_path,
             "ROWS": _rows_file(tmp_path),
             "NOFIELD": _rows_file(tmp_path, [ROWS[0], {"prompt": "x"}], "nofield.jsonl")}
    if "data" in keys:
        keys = keys | {"data": str(files[keys["data"]])}
    with pytest.raises(ConfigError, match=message) as err:
        check_eval_generate(_config(family, **keys))
    assert "\n" not in str(err.value)


def test_the_metric_names_are_what_keep_best_can_pick(tmp_path: Path) -> None:
    data = str(_rows_file(tmp_path))
    assert GenerationEval.build(EvalGenerateConfig(task="bleu", data=data), "gpt"
                                ).metric_names == ["eval_bleu"]
    assert GenerationEval.build(EvalGenerateConfig(task="rouge", data=data), "llama"
                                ).metric_names == ["eval_rouge1", "eval_rouge2", "eval_rougeL",
                                                   "eval_rougeLsum"]


@pytest.mark.parametrize("family", ["gpt", "t5"])
def test_the_task_on_a_live_model_is_megatrain_evals_in_lockstep_too(tmp_path: Path,
                                                                     family: str) -> None:
    """The first max_examples rows, batched, greedy: the generations megatrain-eval's code makes
    for those rows, and eval_bleu is sacrebleu on them. Lockstep (every batch runs all steps)
    writes the same text; the table holds the first table_rows answers on the main rank only.
    The decoder is made to end a row (EOS) after the token it writes first for the longest
    prompt (alone in its batch): without lockstep that batch stops early, in lockstep it runs
    all steps."""
    loaded = load_eval_model(str(tiny_checkpoint(tmp_path, family)))
    model = loaded.model.train()  # as the trainer holds it
    if family == "gpt":
        prompts = [prompt_text(p, sft) for p, _, sft in read_pairs(_rows_file(tmp_path), 4)]
        longest = max(prompts, key=len)
        encode, eos = default_encode(model, loaded.tokenizer), loaded.tokenizer.eos_id
        trigger = generate_ids(model, [encode(longest)], 1)[0][0]

        def force_eos(_module: object, args: tuple, _kwargs: dict, logits: torch.Tensor) -> None:
            ended = (args[0][:, -1] == trigger)[:, None]
            logits[..., eos] = torch.where(ended, 1e4, logits[..., eos])

        model.register_forward_hook(force_eos, with_kwargs=True)
    first = answer(model, loaded.tokenizer, read_pairs(_rows_file(tmp_path), 4),
                   max_new_tokens=12, batch_size=3)
    assert model.training  # put back in training mode
    # references that hold the answers (a random model's share nothing with real text), scored
    # by characters (its answers are one or two "words" long, without a 4-gram of words): the
    # scores compared below are numbers, not zeros
    refs = [f"{gen} {row['completion']}" for gen, row in zip(first.generations, ROWS)]
    data = _rows_file(tmp_path, [r | {"completion": c} for r, c in zip(ROWS, refs)] + ROWS[4:],
                      "scored.jsonl")
    cfg = EvalGenerateConfig(task="bleu", data=str(data), max_examples=4, max_new_tokens=12,
                             batch_size=3, table_rows=2, bleu_tokenize="char")
    gen_eval = GenerationEval.build(cfg, family)
    assert len(gen_eval.rows) == 4
    expected = answer(model, loaded.tokenizer, read_pairs(data, 4), max_new_tokens=12,
                      batch_size=3)
    assert expected.generations == first.generations and expected.references == refs[:4]
    direct = sacrebleu.corpus_bleu(expected.generations, [refs[:4]], tokenize="char").score
    assert 0 < direct < 100
    calls, counts = [], {}
    hook = model.register_forward_hook(lambda *_: calls.append(1))  # decoders: one per step
    for lockstep in (False, True):
        calls.clear()
        numbers, table = gen_eval.run(model, loaded.tokenizer, main=True, lockstep=lockstep)
        assert numbers == {"eval_bleu": pytest.approx(direct, abs=1e-9)}
        assert table == expected.rows(2)
        counts[lockstep] = len(calls)
    hook.remove()
    if family == "gpt":  # in lockstep each of the 2 batches runs all 12 steps; without, the
        # longest prompt's batch ends after its first token (EOS forced after it)
        assert counts[False] <= 12 + 2 < counts[True] == 2 * 12
    numbers, table = gen_eval.run(model, loaded.tokenizer, main=False, lockstep=True)
    assert numbers == {} and table == []  # alone, nothing is broadcast to a non-main rank
