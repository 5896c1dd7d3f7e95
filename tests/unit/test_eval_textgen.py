"""megatrain-eval --task bleu|rouge: the saved generations scored by sacrebleu and rouge-score
called directly give the same numbers, on English and Chinese references; the ROUGE tokenizer
keeps Chinese (rouge-score's default scores it as empty); BLEU picks zh for Chinese."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from megatrain.cli.eval import main
from megatrain.errors import ConfigError
from megatrain.eval.scorers import UnicodeTokenizer, bleu, pick_bleu_tokenize, rouge
from tests.unit.eval_fixtures import tiny_checkpoint

sacrebleu = pytest.importorskip("sacrebleu")
rouge_scorer = pytest.importorskip("rouge_score.rouge_scorer")

ENGLISH = [("Translate: the cat", "the cat sat on the mat"),
           ("Translate: a dog", "a dog runs in the park"),
           ("Summarize: long text here", "short text")]
CHINESE = [("翻译：猫", "猫坐在垫子上"), ("翻译：狗", "狗在公园里跑"), ("总结：长文本", "短文本")]


def test_unicode_tokenizer_keeps_chinese_and_matches_the_default_on_ascii() -> None:
    tok = UnicodeTokenizer()
    assert tok.tokenize("我爱北京 Hello, World_2!") == ["我", "爱", "北", "京", "hello", "world",
                                                    "2"]
    from rouge_score import tokenize as default

    text = "The quick-brown fox (2 times), isn't it?"
    assert tok.tokenize(text) == default.tokenize(text, None)
    assert default.tokenize("我爱北京", None) == []  # why the default cannot be used


def test_scorers_on_fixed_strings() -> None:
    hyps, refs = ["the cat sat on a mat", "我爱北京"], ["the cat sat on the mat", "我爱上海"]
    numbers, info = rouge(hyps, refs)
    # rouge1 of the English pair: 5 of 6 unigrams shared both ways; Chinese: 2 of 4 characters.
    assert numbers["rouge1"] == pytest.approx((5 / 6 + 2 / 4) / 2)
    assert numbers["rouge2"] == pytest.approx((3 / 5 + 1 / 3) / 2)
    assert info["name"] == "rouge-score"
    assert pick_bleu_tokenize(["我爱北京天安门"]) == "zh"
    assert pick_bleu_tokenize(["the cat, 猫"]) == "13a"
    assert pick_bleu_tokenize(["我"], "intl") == "intl"
    score, info = bleu(["the cat sat on the mat"], ["the cat sat on the mat"])
    assert score["bleu"] == pytest.approx(100.0)
    assert "tok:13a" in info["signature"] and info["version"] == sacrebleu.__version__
    with pytest.raises(ConfigError, match="--bleu-tokenize xyz is not a sacrebleu tokenizer"):
        bleu(["a"], ["a"], "xyz")


@pytest.mark.parametrize("language", ["english", "chinese"])
@pytest.mark.parametrize("family", ["gpt", "t5"])
def test_scores_equal_the_scorers_on_the_saved_generations(
        language: str, family: str, tmp_path: Path) -> None:
    rows = ENGLISH if language == "english" else CHINESE
    data = tmp_path / "rows.jsonl"
    fields = ("prompt", "completion") if family == "gpt" else ("input", "target")
    data.write_text("".join(json.dumps(dict(zip(fields, r)), ensure_ascii=False) + "\n"
                            for r in rows))
    ckpt = tiny_checkpoint(tmp_path, family)
    results = {}
    for task in ("bleu", "rouge"):
        out = tmp_path / f"{task}.json"
        assert main(["--checkpoint", str(ckpt), "--task", task, "--data", str(data), "--out",
                     str(out), "--max-new-tokens", "8", "--batch-size", "2"]) == 0
        results[task] = json.loads(out.read_text())
        saved = [json.loads(line) for line in
                 (tmp_path / f"{task}.generations.jsonl").read_text().splitlines()]
        assert [s["reference"] for s in saved] == [r[1] for r in rows]
        if family == "gpt":  # prompted as SFT training rendered the prompt
            assert [s["prompt"] for s in saved] == [r[0] + "\n" for r in rows]
        results[task + "_generations"] = [s["generation"] for s in saved]
    hyps, refs = results["bleu_generations"], [r[1] for r in rows]
    assert hyps == results["rouge_generations"]  # greedy: the same text twice
    assert any(hyps)  # junk, but text
    expected_tok = "zh" if language == "chinese" else "13a"
    direct = sacrebleu.corpus_bleu(hyps, [refs], tokenize=expected_tok)
    assert results["bleu"]["metrics"]["bleu"] == pytest.approx(direct.score)
    assert f"tok:{expected_tok}" in results["bleu"]["scorer"]["signature"]
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL", "rougeLsum"],
                                      tokenizer=UnicodeTokenizer())
    scores = [scorer.score(r, h) for h, r in zip(hyps, refs)]
    for kind in ("rouge1", "rouge2", "rougeL", "rougeLsum"):
        mean = sum(s[kind].fmeasure for s in scores) / len(scores)
        assert results["rouge"]["metrics"][kind] == pytest.approx(mean)
    # Identical generations score 100 / 1 through the same path (the scorer is not vacuous).
    assert sacrebleu.corpus_bleu(refs, [refs], tokenize=expected_tok).score == pytest.approx(100)
    assert rouge(refs, refs)[0]["rouge1"] == pytest.approx(1.0)


@pytest.mark.parametrize(("module", "call"), [("sacrebleu", bleu), ("rouge_score.rouge_scorer",
                                                                   rouge)])
def test_a_missing_scorer_names_the_extra(module: str, call: object,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(__import__("sys").modules, module, None)  # import raises ImportError
    with pytest.raises(ConfigError, match=r'pip install "megatrain\[eval\]"'):
        call(["a"], ["a"])
