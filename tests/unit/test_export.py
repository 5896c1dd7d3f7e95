"""megatrain-export: a real (ZeRO stage 0) checkpoint -> a directory transformers loads with the
same logits and tokens; ``load_hf_pretrained`` reads it back to the same weights."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from megatrain.cli.export import main
from megatrain.data.prepare.train_tokenizer import train_tokenizer
from megatrain.data.tokenizer import load_tokenizer
from megatrain.models import GPT, GPTConfig, Llama, LlamaConfig
from megatrain.models.registry import load_hf_pretrained
from tests.unit.checkpoints import write_stage0_checkpoint

transformers = pytest.importorskip("transformers")

CORPUS = Path(json.__file__).read_text()[:8000]  # a few KB of Python source
TEXT = 'def f(x):\n\treturn  {"a": x}  # héllo wörld 日本 🎉\n\n\nclass  B:  pass\n'
VOCAB = 512


@pytest.fixture(scope="module")
def tokenizer_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_tokenizer([CORPUS], tmp_path_factory.mktemp("tok") / "tokenizer.model", VOCAB)


def _models() -> dict[str, tuple[str, torch.nn.Module]]:
    dims = {"n_layers": 2, "d_model": 64, "n_heads": 4, "d_ff": 128, "vocab_size": VOCAB,
            "max_seq_len": 64}
    torch.manual_seed(0)
    return {
        "gpt2": ("gpt", GPT(GPTConfig(**dims))),
        "llama": ("llama", Llama(LlamaConfig(**dims, n_kv_heads=2))),
        "llama-tied": ("llama", Llama(LlamaConfig(**dims, n_kv_heads=1, tie_embeddings=True))),
    }


@torch.no_grad()
def _randomize(model: torch.nn.Module) -> None:
    for name, p in model.named_parameters():
        p.copy_(torch.randn_like(p) * 0.1 + (1.0 if "ln_" in name and "weight" in name else 0.0))


def test_exported_tokenizer_gives_megatrain_ids(tokenizer_path: Path, tmp_path: Path) -> None:
    family, model = _models()["llama"]
    write_stage0_checkpoint(tmp_path / "ckpt", family, model, tokenizer_path)
    assert main(["--checkpoint", str(tmp_path / "ckpt"), "--out", str(tmp_path / "hf")]) == 0
    ours = load_tokenizer(tokenizer_path)
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    ids = ours.encode(TEXT)
    assert 2 < len(ids) < len(TEXT.encode())  # merges happened, and byte fallback for 日本 🎉
    assert hf_tok.encode(TEXT, add_special_tokens=False) == ids
    assert hf_tok.decode(ids) == TEXT
    assert (hf_tok.eos_token_id, hf_tok.pad_token_id) == (ours.eos_id, ours.pad_id)
    assert (hf_tok.mask_token_id, hf_tok.cls_token_id, hf_tok.sep_token_id) == (
        ours.mask_id, ours.cls_id, ours.sep_id)
    assert hf_tok.convert_tokens_to_ids("<extra_id_0>") == ours.sentinel_ids[0]
    assert hf_tok.decode([ours.mask_id], skip_special_tokens=True) == ""
    assert (tmp_path / "hf" / "tokenizer.model").read_bytes() == tokenizer_path.read_bytes()
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert (config["eos_token_id"], config["bos_token_id"]) == (ours.eos_id, ours.bos_id)


def test_not_a_checkpoint_is_a_one_line_error(tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--checkpoint", str(tmp_path), "--out", str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "not a megatrain checkpoint" in err
    assert err.count("\n") == 1


def test_load_hf_pretrained_refuses_unknown_model_types(tmp_path: Path) -> None:
    from megatrain.errors import ConfigError

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mamba"}))
    with pytest.raises(ConfigError, match="model_type=mamba has no megatrain adapter; valid: "
                                          "gpt2, llama"):
        load_hf_pretrained(tmp_path)
