"""lm-evaluation-harness on megatrain models: the native adapter and lm-eval's HFLM on the
Hugging Face export give the same numbers on local tasks (multiple choice, rolling
log-likelihood, generate_until), for tiny random GPT-2 and Llama checkpoints in fp32."""

from __future__ import annotations

import json
import math
import os
import re
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

pytest.importorskip("lm_eval")
pytest.importorskip("accelerate")  # HFLM

from megatrain.cli.eval import main as eval_main
from megatrain.errors import ConfigError
from megatrain.eval.lm_harness import adapter_class, crop, offline, run_harness
from tests.unit.eval_fixtures import DOCS, tiny_checkpoint

TASKS = ["tiny_mc", "tiny_roll", "tiny_gen"]
WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
TOL = 1e-4


def _mc_rows() -> list[dict]:
    """20 questions with 4 choices; every fourth has a long preamble (the context is cropped
    to the model's 32 tokens, the continuation kept)."""
    rows = []
    for i in range(20):
        preamble = "Read this first: the quick brown fox jumps over the lazy dog. " * 2 \
            if i % 4 == 0 else ""
        choices = [WORDS[(i + k) % 10] for k in range(4)]
        rows.append({"question": f"{preamble}What comes after {WORDS[i % 10]}?",
                     "choices": choices, "gold": (i * 7) % 4})
    return rows


def _write_task(folder: Path, name: str, rows: list[dict], spec: str) -> None:
    data = folder / f"{name}.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / f"{name}.yaml").write_text(
        f"task: {name}\ndataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n  cache_dir: {folder / 'cache'}\n"
        f"test_split: test\n{spec}")


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("lm_eval_tasks")
    _write_task(folder, "tiny_mc", _mc_rows(),
                'output_type: multiple_choice\ndoc_to_text: "Question: {{question}}\\nAnswer:"\n'
                "doc_to_choice: choices\ndoc_to_target: gold\n"
                "metric_list:\n  - metric: acc\n  - metric: acc_norm\n")
    _write_task(folder, "tiny_roll", [{"text": d} for d in DOCS],
                "output_type: loglikelihood_rolling\ndoc_to_text: ''\n"
                "doc_to_target: '{{text}}'\n"
                "metric_list:\n  - metric: word_perplexity\n  - metric: byte_perplexity\n"
                "  - metric: bits_per_byte\n")
    prompts = [" ".join(WORDS[i:i + 3 + i % 4]) for i in range(6)] + ["def add(a, b):"]
    _write_task(folder, "tiny_gen", [{"prompt": p, "answer": "x"} for p in prompts],
                "output_type: generate_until\ndoc_to_text: '{{prompt}}'\n"
                "doc_to_target: '{{answer}}'\n"
                "generation_kwargs:\n  until: ['\\n\\n']\n  max_gen_toks: 8\n"
                "  do_sample: false\n"
                "metric_list:\n  - metric: exact_match\n")
    return folder


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, task_dir: Path) -> dict:
    """(family, backend) -> run_harness's result with samples, both families, both backends."""
    root = tmp_path_factory.mktemp("lm_eval_ckpts")
    out = {}
    for family in ("gpt", "llama"):
        ckpt = str(tiny_checkpoint(root, family, seed=3))
        for backend in ("native", "hf"):
            out[family, backend] = run_harness(ckpt, TASKS, backend=backend,
                                               include_path=task_dir, batch_size=4,
                                               device="cpu", log_samples=True)
    return out


def _responses(result: dict, task: str) -> list:
    """Per document, what the model answered (lm-eval's filtered responses), by doc id."""
    return [s["filtered_resps"] for s in sorted(result["samples"][task],
                                                 key=lambda s: s["doc_id"])]


@pytest.mark.parametrize("family", ["gpt", "llama"])
def test_multiple_choice_same_accuracy_and_loglikelihoods(runs: dict, family: str) -> None:
    native, hf = runs[family, "native"], runs[family, "hf"]
    for metric in ("acc,none", "acc_norm,none"):
        assert native["metrics"]["tiny_mc"][metric] == hf["metrics"]["tiny_mc"][metric]
    ours, theirs = _responses(native, "tiny_mc"), _responses(hf, "tiny_mc")
    assert len(ours) == 20 and all(len(doc) == 4 for doc in ours)
    for doc_ours, doc_theirs in zip(ours, theirs, strict=True):
        for (ll, greedy), (ll_hf, greedy_hf) in zip(doc_ours, doc_theirs, strict=True):
            assert ll == pytest.approx(float(ll_hf), abs=TOL)
            assert ll < 0
            assert bool(greedy) == bool(greedy_hf)


@pytest.mark.parametrize("family", ["gpt", "llama"])
def test_rolling_loglikelihood_matches_hf(runs: dict, family: str) -> None:
    native, hf = runs[family, "native"], runs[family, "hf"]
    for doc_ours, doc_theirs in zip(_responses(native, "tiny_roll"), _responses(hf, "tiny_roll"),
                                    strict=True):
        assert float(doc_ours[0]) == pytest.approx(float(doc_theirs[0]), abs=TOL)
    for metric in ("word_perplexity,none", "byte_perplexity,none", "bits_per_byte,none"):
        ours, theirs = native["metrics"]["tiny_roll"][metric], hf["metrics"]["tiny_roll"][metric]
        assert math.isfinite(ours) and ours == pytest.approx(theirs, rel=TOL)


def _decodes_alike(ours: str, theirs: str) -> bool:
    """The same text from the same ids, SentencePiece's decoding (ours) against Hugging Face's:
    a run of byte tokens that is not valid UTF-8 becomes one U+FFFD per token in Hugging
    Face's, where SentencePiece keeps the run's valid bytes (at least one U+FFFD, at most one
    character per byte). Everything else must be equal."""
    parts = re.split("(\ufffd+)", theirs)
    pattern = "".join(f".{{1,{len(p)}}}" if p.startswith("\ufffd") else re.escape(p)
                      for p in parts)
    return re.fullmatch(pattern, ours, flags=re.DOTALL) is not None


def test_decodes_alike() -> None:
    assert _decodes_alike("ab", "ab") and not _decodes_alike("ab", "ac")
    assert _decodes_alike(".\ufffd\ufffdx", "\ufffd\ufffd\ufffdx")
    assert not _decodes_alike("..\ufffd\ufffdx", "\ufffd\ufffd\ufffdx")  # 4 chars from 3 bytes
    assert not _decodes_alike("y", "\ufffdx")


@pytest.mark.parametrize("family", ["gpt", "llama"])
def test_generate_until_greedy_same_text(runs: dict, family: str) -> None:
    ours = _responses(runs[family, "native"], "tiny_gen")
    theirs = _responses(runs[family, "hf"], "tiny_gen")
    assert len(ours) == len(theirs) == 7
    for doc_ours, doc_theirs in zip(ours, theirs, strict=True):
        assert _decodes_alike(doc_ours[0], doc_theirs[0]), (doc_ours, doc_theirs)
    assert sum(doc[0] == doc_hf[0] != "" for doc, doc_hf in zip(ours, theirs, strict=True)) >= 2


def test_result_says_what_ran(runs: dict, task_dir: Path) -> None:
    result = runs["gpt", "native"]
    assert result["task"] == "lm-eval:tiny_mc,tiny_roll,tiny_gen"
    assert result["scorer"]["name"] == "lm-evaluation-harness" and result["scorer"]["version"]
    data = result["data"]["tiny_mc"]
    assert list(data) == [str(task_dir / "tiny_mc.jsonl")] and len(data[str(task_dir /
                                                                         "tiny_mc.jsonl")]) == 64
    json.dumps({k: v for k, v in result.items() if k != "samples"}, default=str)


def test_crop_keeps_the_continuation() -> None:
    assert crop([1, 2, 3], [4, 5], 10) == [1, 2, 3, 4]
    assert crop([1, 2, 3, 4, 5], [6, 7], 4) == [3, 4, 5, 6]


def test_an_empty_context_is_bos_else_eos() -> None:
    """megatrain tokenizers mark a missing role -1 (not None): then EOS, as HFLM does."""
    cls = adapter_class()
    lm = cls.__new__(cls)
    for bos, expected in ((-1, 2), (1, 1)):
        lm.tok = SimpleNamespace(bos_id=bos, eos_id=2)
        assert lm.prefix_token_id == expected


def test_offline_only_while_the_harness_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants as hub

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "0")
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", False)
    with offline():
        assert os.environ["HF_HUB_OFFLINE"] == os.environ["HF_DATASETS_OFFLINE"] == "1"
        assert hub.HF_HUB_OFFLINE is True
    assert "HF_HUB_OFFLINE" not in os.environ and os.environ["HF_DATASETS_OFFLINE"] == "0"
    assert hub.HF_HUB_OFFLINE is False


def test_megatrain_eval_route(tmp_path: Path, task_dir: Path) -> None:
    ckpt = tiny_checkpoint(tmp_path, "gpt")
    out = tmp_path / "results.json"
    assert eval_main(["--checkpoint", str(ckpt), "--task", "lm-eval:tiny_mc", "--include-path",
                      str(task_dir), "--max-examples", "5", "--out", str(out),
                      "--device", "cpu"]) == 0
    result = json.loads(out.read_text())
    assert result["backend"] == "native" and result["settings"]["limit"] == 5
    assert 0 <= result["metrics"]["tiny_mc"]["acc,none"] <= 1


def test_bad_input(tmp_path: Path, task_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    gpt = str(tiny_checkpoint(tmp_path, "gpt"))
    with pytest.raises(ConfigError, match="lm-eval task nope not found in .*tiny_mc"):
        run_harness(gpt, ["nope"], include_path=task_dir, device="cpu")
    with pytest.raises(ConfigError, match="is not a folder"):
        run_harness(gpt, ["tiny_mc"], include_path=tmp_path / "missing", device="cpu")
    with pytest.raises(ConfigError, match="backend"):
        run_harness(gpt, ["tiny_mc"], backend="vllm", include_path=task_dir)
    bert = str(tiny_checkpoint(tmp_path, "bert"))
    for backend in ("native", "hf"):
        with pytest.raises(ConfigError, match="runs gpt, llama.* is a bert model"):
            run_harness(bert, ["tiny_mc"], backend=backend, include_path=task_dir,
                        device="cpu")
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # as if not installed
    with pytest.raises(ConfigError, match=r"megatrain\[lmeval\]"):
        run_harness(gpt, ["tiny_mc"], include_path=task_dir)
