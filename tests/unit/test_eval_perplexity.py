"""megatrain-eval --task perplexity: per document, sliding window, equal to the loss transformers
computes on the exported model over the same windows (Hugging Face's fixed-length recipe), for
GPT-2 and Llama; bits per byte from the documents' UTF-8 length."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from megatrain.cli.eval import main
from megatrain.data.tokenizer import load_tokenizer
from megatrain.eval.lm import windows
from megatrain.hf_export import export
from tests.unit.eval_fixtures import DOCS, tiny_checkpoint

transformers = pytest.importorskip("transformers")


def test_windows_score_every_token_once() -> None:
    for n, max_len, stride in [(5, 8, 4), (30, 8, 3), (31, 8, 7), (9, 8, 1)]:
        scored = [t for b, e, f in windows(n, max_len, stride) for t in range(f, e)]
        assert scored == list(range(1, n))
        assert all(e - b <= max_len and f > b for b, e, f in windows(n, max_len, stride))
        assert all(f - b >= min(max_len - stride, f) for b, e, f in windows(n, max_len, stride))


def _hf_nats(model: torch.nn.Module, ids: list[int], max_len: int, stride: int) -> tuple[float, int]:
    """Hugging Face's "perplexity of fixed-length models" loop, summing nats instead of
    averaging (so documents add up)."""
    seq = torch.tensor([ids])
    nats, count, prev_end = 0.0, 0, 0
    for begin in range(0, seq.size(1), stride):
        end = min(begin + max_len, seq.size(1))
        trg_len = end - prev_end
        input_ids = seq[:, begin:end]
        target_ids = input_ids.clone()
        target_ids[:, :-trg_len] = -100
        with torch.no_grad():
            loss = model(input_ids, labels=target_ids).loss
        valid = int((target_ids[:, 1:] != -100).sum())
        nats, count = nats + float(loss) * valid, count + valid
        prev_end = end
        if end == seq.size(1):
            break
    return nats, count


@pytest.mark.parametrize("family", ["gpt", "llama"])
def test_perplexity_equals_transformers_on_the_export(family: str, tmp_path: Path) -> None:
    ckpt = tiny_checkpoint(tmp_path, family)
    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in DOCS))
    out = tmp_path / "ppl.json"
    assert main(["--checkpoint", str(ckpt), "--task", "perplexity", "--data", str(data),
                 "--out", str(out), "--stride", "12", "--batch-size", "3"]) == 0
    result = json.loads(out.read_text())
    hf = transformers.AutoModelForCausalLM.from_pretrained(export(ckpt, tmp_path / "hf")).eval()
    tok = load_tokenizer(ckpt)
    nats, count, longest = 0.0, 0, 0
    for text in DOCS:
        ids = [tok.eos_id, *tok.encode(text), tok.eos_id]
        longest = max(longest, len(ids))
        doc_nats, doc_count = _hf_nats(hf, ids, 32, 12)
        nats, count = nats + doc_nats, count + doc_count
    assert longest > 2 * 32  # the long documents take several windows
    m = result["metrics"]
    assert m["tokens"] == count
    assert m["loss"] == pytest.approx(nats / count, rel=1e-4)
    assert m["perplexity"] == pytest.approx(math.exp(nats / count), rel=1e-4)
    nbytes = sum(len(t.encode()) for t in DOCS)
    assert m["bytes"] == nbytes
    assert m["bits_per_byte"] == pytest.approx(nats / math.log(2) / nbytes, rel=1e-4)
    assert result["checkpoint"] == str(ckpt) and len(result["data"]["sha256"]) == 64
    assert result["checkpoint_path"] == str(ckpt)
    assert result["settings"]["stride"] == 12
    # The hf: folder gives the same numbers through megatrain's model.
    assert main(["--checkpoint", f"hf:{tmp_path / 'hf'}", "--task", "perplexity", "--data",
                 str(data), "--out", str(tmp_path / "hf.json"), "--stride", "12"]) == 0
    assert json.loads((tmp_path / "hf.json").read_text())["metrics"]["loss"] == pytest.approx(
        m["loss"], rel=1e-5)


def test_a_text_file_is_one_document(tmp_path: Path) -> None:
    ckpt = tiny_checkpoint(tmp_path, "gpt")
    (tmp_path / "valid.txt").write_text("\n\n".join(DOCS))
    assert main(["--checkpoint", str(ckpt.parent), "--task", "perplexity", "--data",
                 str(tmp_path / "valid.txt"), "--out", str(tmp_path / "r.json")]) == 0
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["checkpoint_path"] == str(ckpt)  # the folder's latest checkpoint
    m = result["metrics"]
    assert m["documents"] == 1 and m["bytes"] == len("\n\n".join(DOCS).encode())
