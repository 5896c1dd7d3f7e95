"""megatrain-eval's other tasks against transformers on the export: T5's target loss = the loss
of T5ForConditionalGeneration with labels; a BERT classifier's accuracy and macro-F1 = those of
BertForSequenceClassification's predictions (scikit-learn's F1); BERT's masked-LM numbers do not
depend on the batch size. Bad input ends with one line and a non-zero exit."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from megatrain.cli.eval import main
from megatrain.data.tokenizer import load_tokenizer
from megatrain.eval.classify import accuracy_f1
from megatrain.hf_export import export
from tests.unit.eval_fixtures import DOCS, tiny_checkpoint

transformers = pytest.importorskip("transformers")

PAIRS = [("the cat sat", "le chat"), ("a dog runs in the park", "un chien court"),
         ("我爱北京", "I love Beijing"), ("x", "y z w")]
CLS_ROWS = [{"text": "good movie", "label": "pos"}, {"text": "bad film, awful", "label": "neg"},
            {"text_a": "it was", "text_b": "fine", "label": "pos"},
            {"text": "我爱北京", "label": "neg"}, {"text": "so so " * 30, "label": "pos"}]


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return path


def _run(*argv: str) -> int:
    return main(list(argv))


def test_target_loss_equals_transformers_t5(tmp_path: Path) -> None:
    ckpt = tiny_checkpoint(tmp_path, "t5")
    data = _jsonl(tmp_path / "s2s.jsonl", [{"input": a, "target": b} for a, b in PAIRS])
    out = tmp_path / "t5.json"
    assert _run("--checkpoint", str(ckpt), "--task", "target_loss", "--data", str(data),
                "--out", str(out), "--batch-size", "3") == 0
    metrics = json.loads(out.read_text())["metrics"]
    hf = transformers.T5ForConditionalGeneration.from_pretrained(export(ckpt, tmp_path / "hf"))
    tok = load_tokenizer(ckpt)
    nats, count = 0.0, 0
    for source, target in PAIRS:
        labels = torch.tensor([tok.encode(target) + [tok.eos_id]])
        with torch.no_grad():
            loss = hf.eval()(input_ids=torch.tensor([tok.encode(source) + [tok.eos_id]]),
                             labels=labels).loss
        nats, count = nats + float(loss) * labels.numel(), count + labels.numel()
    assert metrics["target_tokens"] == count
    assert metrics["loss"] == pytest.approx(nats / count, rel=1e-4)


def test_accuracy_and_macro_f1_equal_transformers_classifier(tmp_path: Path) -> None:
    sklearn_metrics = pytest.importorskip("sklearn.metrics")
    ckpt = tiny_checkpoint(tmp_path, "bert", num_labels=2, labels=["neg", "pos"], seed=3)
    data = _jsonl(tmp_path / "cls.jsonl", CLS_ROWS)
    out = tmp_path / "acc.json"
    assert _run("--checkpoint", str(ckpt), "--task", "accuracy", "--data", str(data),
                "--out", str(out), "--batch-size", "2") == 0
    result = json.loads(out.read_text())
    hf_dir = export(ckpt, tmp_path / "hf")
    hf = transformers.BertForSequenceClassification.from_pretrained(hf_dir).eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(hf_dir)
    max_len = hf.config.max_position_embeddings
    gold, pred = [], []
    for row in CLS_ROWS:  # [CLS] a [SEP] (b [SEP]): megatrain's tokenizers add no specials
        a, *b = [hf_tok.encode(row[k], add_special_tokens=False)
                 for k in ("text", "text_a", "text_b") if k in row]
        a = a[: max_len - 2 - sum(len(x) + 1 for x in b)]  # only the long single text is cut
        ids = [hf_tok.cls_token_id, *a, hf_tok.sep_token_id]
        types = [0] * len(ids) + [1] * sum(len(x) + 1 for x in b)
        ids += [t for x in b for t in [*x, hf_tok.sep_token_id]]
        with torch.no_grad():
            logits = hf(input_ids=torch.tensor([ids]), token_type_ids=torch.tensor([types]))
        pred.append(int(logits.logits.argmax(-1)))
        gold.append(hf.config.label2id[row["label"]])
    assert result["metrics"]["accuracy"] == pytest.approx(sklearn_metrics.accuracy_score(gold,
                                                                                           pred))
    assert result["metrics"]["macro_f1"] == pytest.approx(
        sklearn_metrics.f1_score(gold, pred, average="macro"))
    assert result["scorer"]["labels"] == ["neg", "pos"]
    # The hf: folder names its classes through config.json's id2label.
    assert _run("--checkpoint", f"hf:{hf_dir}", "--task", "accuracy", "--data", str(data),
                "--out", str(tmp_path / "hf.json")) == 0
    assert json.loads((tmp_path / "hf.json").read_text())["metrics"] == result["metrics"]


def test_macro_f1_is_sklearns() -> None:
    sklearn_metrics = pytest.importorskip("sklearn.metrics")
    gold, pred = [0, 0, 1, 2, 2, 2, 1], [0, 1, 1, 2, 0, 2, 3]
    assert accuracy_f1(gold, pred)["macro_f1"] == pytest.approx(
        sklearn_metrics.f1_score(gold, pred, average="macro"))


def test_mlm_does_not_depend_on_the_batch_size(tmp_path: Path) -> None:
    ckpt = tiny_checkpoint(tmp_path, "bert")
    data = _jsonl(tmp_path / "docs.jsonl", [{"text": t} for t in DOCS])
    metrics = []
    for batch in ("1", "5"):
        out = tmp_path / f"mlm{batch}.json"
        assert _run("--checkpoint", str(ckpt), "--task", "mlm", "--data", str(data), "--out",
                    str(out), "--batch-size", batch) == 0
        metrics.append(json.loads(out.read_text())["metrics"])
    assert metrics[0]["masked_tokens"] > 10 and 0 <= metrics[0]["accuracy"] <= 1
    assert metrics[0] == pytest.approx(metrics[1], rel=1e-5)
    out = tmp_path / "seed.json"
    assert _run("--checkpoint", str(ckpt), "--task", "mlm", "--data", str(data), "--out",
                str(out), "--seed", "1") == 0
    assert json.loads(out.read_text())["metrics"]["loss"] != metrics[0]["loss"]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ckpts")
    return {"gpt": tiny_checkpoint(root, "gpt"), "bert": tiny_checkpoint(root, "bert")}


@pytest.mark.parametrize(("family", "args", "message"), [
    ("gpt", ["--task", "perplexity", "--data", "{tmp}/missing.txt"], "does not exist"),
    ("gpt", ["--task", "bleu", "--data", "{tmp}/nofield.jsonl"], "nofield.jsonl:2: no 'target'"),
    ("gpt", ["--task", "perplexity", "--data", "{tmp}/notext.jsonl"],
     "notext.jsonl:1: no 'text'"),
    ("gpt", ["--task", "wer", "--data", "{tmp}/rows.jsonl"], "--task wer is not a task"),
    ("bert", ["--task", "bleu", "--data", "{tmp}/rows.jsonl"],
     "needs a model that generates text"),
    ("bert", ["--task", "accuracy", "--data", "{tmp}/rows.jsonl"], "its tasks: mlm"),
    ("gpt", ["--task", "mlm", "--data", "{tmp}/rows.jsonl"], "needs a bert model"),
    ("gpt", ["--task", "perplexity", "--data", "{tmp}/rows.jsonl", "--stride", "40"],
     "--stride 40 must be in [1, 31]"),
    ("gpt", ["--task", "lm-eval:"], "no task named"),  # the lm-eval route reaches run_harness
    ("gpt", ["--task", "perplexity"], "--task perplexity needs --data"),
])
def test_bad_input_is_one_line_and_a_non_zero_exit(
        checkpoints: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str],
        family: str, args: list[str], message: str) -> None:
    _jsonl(tmp_path / "rows.jsonl", [{"input": "a", "target": "b", "text": "a b"}])
    _jsonl(tmp_path / "nofield.jsonl", [{"input": "a", "target": "b"}, {"input": "c"}])
    _jsonl(tmp_path / "notext.jsonl", [{"content": "a"}])
    argv = [a.replace("{tmp}", str(tmp_path)) for a in args]
    capsys.readouterr()
    assert _run("--checkpoint", str(checkpoints[family]), *argv,
                "--out", str(tmp_path / "r.json")) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("megatrain-eval: ") and "\n" not in err and message in err, err
