"""The tokenizer is lossless on code (indentation, tabs, newlines, unicode) and has fixed special ids."""

from __future__ import annotations

import math
import sysconfig
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from megatrain.data.prepare.sources import iter_documents
from megatrain.data.prepare.train_tokenizer import train_tokenizer
from megatrain.data.stream.targets import IGNORE
from megatrain.data.tokenizer import Tokenizer, load_tokenizer
from megatrain.errors import ConfigError, DataError
from megatrain.training.losses import eval_metric_names, eval_metrics, label_bytes

STDLIB = Path(sysconfig.get_paths()["stdlib"])
CODE = (
    "import os\n\n\n"
    "class Walker:\n"
    '    """Docstring with  two spaces."""\n\n'
    "    def walk(self, top):\n"
    "\tif top:  # a tab, then trailing spaces   \n"
    "\t\treturn [x  for x in os.listdir(top)]\n"
    "        \n"
    "  odd_indent = 'naïve café — 東京 🐍'\r\n"
    "\n\n\n"
    "    \t mixed = {1: 2}\n"
)


@pytest.fixture(scope="module")
def code_tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    """A 1024-piece model trained on a sample of stdlib source lines."""
    texts = (doc.text for _, doc in zip(range(150), iter_documents("stdlib")))
    model = tmp_path_factory.mktemp("code_tok") / "tokenizer.model"
    path = train_tokenizer(texts, model, 1024, threads=2, max_sentences=20_000)
    assert path == model and not model.with_suffix(".vocab").exists()
    return load_tokenizer(model)


def test_code_round_trips_exactly(code_tokenizer: Tokenizer) -> None:
    ids = code_tokenizer.encode(CODE)
    assert code_tokenizer.decode(ids) == CODE
    assert code_tokenizer.decode(code_tokenizer.encode("  leading spaces")) == "  leading spaces"


@pytest.mark.parametrize("module", ["json/decoder.py", "textwrap.py", "tabnanny.py"])
def test_real_source_files_round_trip(code_tokenizer: Tokenizer, module: str) -> None:
    text = (STDLIB / module).read_text(encoding="utf-8")
    ids = code_tokenizer.encode(text)
    assert code_tokenizer.decode(ids) == text
    assert len(ids) < len(text) / 2  # it learned merges, not just bytes


def test_newline_is_one_token_and_indentation_is_merged(code_tokenizer: Tokenizer) -> None:
    (newline,) = code_tokenizer.encode("\n")
    assert code_tokenizer._sp.id_to_piece(newline) == "\n"  # a real piece, not the byte <0x0A>
    assert len(code_tokenizer.encode("\n\n")) == 2
    assert len(code_tokenizer.encode("        return")) <= 3


@given(st.text(alphabet=st.characters(codec="utf-8"), max_size=200))
@settings(max_examples=200, deadline=None)
def test_any_text_round_trips(code_tokenizer: Tokenizer, text: str) -> None:
    assert code_tokenizer.decode(code_tokenizer.encode(text)) == text


def spelled_bytes(tok: Tokenizer, text: str) -> int:
    """The bytes ``byte_lengths`` counts for ``text``'s tokens (plus an EOS: none)."""
    return int(tok.byte_lengths()[[*tok.encode(text), tok.eos_id]].sum())


@pytest.mark.parametrize("text", [CODE, "naïve café — 東京 🐍\n", "\t\x00\x7f  x"])
def test_byte_lengths_add_up_to_the_texts_bytes(code_tokenizer: Tokenizer, text: str) -> None:
    assert spelled_bytes(code_tokenizer, text) == len(text.encode())


def test_special_ids_and_no_implicit_bos_eos(code_tokenizer: Tokenizer) -> None:
    tok = code_tokenizer
    assert (tok.unk_id, tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 2, 3)
    assert tok.vocab_size == 1024
    ids = tok.encode("x = 1\n")
    assert ids and not {tok.bos_id, tok.eos_id, tok.pad_id} & set(ids)
    assert tok.encode_batch(["a\n", "b  c"]) == [tok.encode("a\n"), tok.encode("b  c")]


def test_eval_bpb_is_the_labelled_nats_over_the_bytes_they_spell(
    code_tokenizer: Tokenizer
) -> None:
    """The trainer's eval_bpb: label -100 (here a masked prefix) spells nothing."""
    prefix, text = code_tokenizer.encode("import os\n"), code_tokenizer.encode(CODE)
    labels = torch.tensor([[IGNORE] * len(prefix) + text + [code_tokenizer.eos_id]])
    table = torch.from_numpy(code_tokenizer.byte_lengths())
    nats = 123.0
    sums = {"loss": nats, "count": float(len(text) + 1),
            "bytes": float(label_bytes(labels, table))}
    assert sums["bytes"] == len(CODE.encode())
    metrics = eval_metrics(sums)
    assert metrics["eval_bpb"] == pytest.approx(nats / math.log(2) / len(CODE.encode()))
    assert "eval_bpb" not in eval_metrics({"loss": nats, "count": 5.0})  # no bytes: not text
    assert "eval_bpb" in eval_metric_names("clm", False)
    assert "eval_bpb" not in eval_metric_names("mlm", False)


def test_load_missing_or_invalid_model_raises_data_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        load_tokenizer(tmp_path / "nope.model")
    bogus = tmp_path / "bogus.model"
    bogus.write_bytes(b"not a model")
    with pytest.raises(DataError, match="not a SentencePiece model"):
        load_tokenizer(bogus)


def test_train_rejects_empty_corpus_and_tiny_vocab(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no text"):
        train_tokenizer(["", "  \n"], tmp_path / "t.model", 512)
    with pytest.raises(ConfigError, match="vocab_size"):
        train_tokenizer(["some text"], tmp_path / "t.model", 100)
    with pytest.raises(ConfigError, match="cannot train a 403-piece"):  # 364 reserved + 64 chars
        train_tokenizer(["".join(map(chr, range(0x4E00, 0x4E40)))], tmp_path / "t.model", 403)


def test_control_tokens_are_reserved_and_never_encoded(code_tokenizer: Tokenizer) -> None:
    tok = code_tokenizer
    specials = [tok.cls_id, tok.sep_id, tok.mask_id, *tok.sentinel_ids]
    assert len(tok.sentinel_ids) == 100 and min(specials) > tok.pad_id
    assert len(set(specials)) == len(specials)
    text = "[MASK] <extra_id_0> [CLS]"
    assert not set(tok.encode(text)) & set(specials)  # text that spells them stays text
    assert tok.decode(tok.encode(text)) == text
    assert tok.decode([tok.mask_id, *tok.sentinel_ids[:3]]) == ""


# --- unigram and char models, Hugging Face tokenizer.json -------------------------------------


@pytest.fixture(scope="module")
def stdlib_lines() -> list[str]:
    return [doc.text for _, doc in zip(range(60), iter_documents("stdlib"))]


@pytest.mark.parametrize("model_type", ["unigram", "char"])
def test_unigram_and_char_models_round_trip_and_keep_the_control_tokens(
    stdlib_lines: list[str], tmp_path: Path, model_type: str
) -> None:
    model = train_tokenizer(stdlib_lines, tmp_path / "t.model", 1024, model_type=model_type,
                            max_sentences=5_000)
    tok = load_tokenizer(model)
    for text in (CODE, "naïve café — 東京 🐍\n\tx  = 1\n", (STDLIB / "textwrap.py").read_text()):
        assert tok.decode(tok.encode(text)) == text
    assert (tok.unk_id, tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 2, 3)
    assert len(tok.sentinel_ids) == 100 and min(tok.cls_id, tok.sep_id, tok.mask_id) > 3
    pieces = [tok._sp.id_to_piece(i) for i in tok.encode((STDLIB / "textwrap.py").read_text())]
    multi_char = [p for p in pieces if len(p) > 1 and not p.startswith("<0x")]  # not a byte
    assert not multi_char if model_type == "char" else max(map(len, multi_char)) > 3


def test_unknown_tokenizer_type_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="bpe, unigram, char"):
        train_tokenizer(["text"], tmp_path / "t.model", 1024, model_type="wordpiece")


def test_the_sample_size_bounds_what_the_tokenizer_sees(tmp_path: Path) -> None:
    lines = [f"word{i} " * 3 for i in range(4000)]
    small = load_tokenizer(train_tokenizer(lines, tmp_path / "s.model", 2048, max_sentences=20))
    large = load_tokenizer(train_tokenizer(lines, tmp_path / "l.model", 2048, max_sentences=4000))
    assert small.vocab_size < large.vocab_size == 2048  # 20 lines hold too few merges


def test_tokenizer_json_loads_through_the_same_interface(
    code_tokenizer: Tokenizer, tmp_path: Path
) -> None:
    pytest.importorskip("transformers")
    from megatrain.data.tokenizer.convert_to_hf import save_hf_tokenizer
    from megatrain.data.tokenizer.hf_tokenizer import HFTokenizer

    save_hf_tokenizer(code_tokenizer.path, tmp_path)
    hf = load_tokenizer(tmp_path / "tokenizer.json")
    assert isinstance(hf, HFTokenizer)
    ids = ("unk_id", "bos_id", "eos_id", "pad_id", "cls_id", "sep_id", "mask_id", "sentinel_ids",
           "vocab_size")
    assert {a: getattr(hf, a) for a in ids} == {a: getattr(code_tokenizer, a) for a in ids}
    text = (STDLIB / "json" / "decoder.py").read_text()
    assert hf.encode(text) == code_tokenizer.encode(text)
    assert hf.encode_batch([text, CODE]) == code_tokenizer.encode_batch([text, CODE])
    assert hf.decode(hf.encode(CODE)) == CODE
    assert hf.decode([hf.mask_id, *hf.sentinel_ids[:2]]) == ""
    assert (hf.byte_lengths() == code_tokenizer.byte_lengths()).all()


def test_a_byte_level_tokenizer_json_under_any_name(tmp_path: Path) -> None:
    tokenizers = pytest.importorskip("tokenizers")
    bpe = tokenizers.Tokenizer(tokenizers.models.BPE())
    bpe.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|endoftext|>"],
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(),
    )
    bpe.train_from_iterator([CODE] * 20, trainer)
    bpe.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer.json").rename(tmp_path / "copy.model")  # content decides, not name
    tok = load_tokenizer(tmp_path / "copy.model")
    assert tok.eos_id == tok.bos_id == 0 and tok.unk_id == tok.pad_id == tok.mask_id == -1
    assert tok.sentinel_ids == [] and tok.vocab_size == bpe.get_vocab_size()
    for text in (CODE, "naïve café — 東京 🐍"):
        assert tok.decode(tok.encode(text)) == text
        assert spelled_bytes(tok, text) == len(text.encode())


def test_a_folder_or_a_bad_tokenizer_json(tmp_path: Path, code_tokenizer: Tokenizer) -> None:
    with pytest.raises(DataError, match="neither tokenizer.model nor tokenizer.json"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text('{"not": "a tokenizer"}')
    with pytest.raises(DataError, match="not a Hugging Face tokenizer.json"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.model").write_bytes(code_tokenizer.path.read_bytes())
    assert load_tokenizer(tmp_path).path.name == "tokenizer.model"  # preferred when both exist
