"""megatrain-export's tokenizer: whatever tokenizer a corpus was prepared with (a SentencePiece
``bpe``, ``unigram`` or ``char`` model, or a Hugging Face ``tokenizer.json``), ``AutoTokenizer``
loads the exported folder, encodes real text to megatrain's ids and has the same special-token
roles."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import pytest
import sentencepiece as spm
import torch
from sentencepiece import sentencepiece_model_pb2

from megatrain.cli.export import main as export_main
from megatrain.data.prepare.pipeline import prepare
from megatrain.data.prepare.sources import iter_documents
from megatrain.data.prepare.train_tokenizer import train_tokenizer
from megatrain.data.tokenizer import CONTROL_TOKENS, Tokenizer, load_tokenizer
from megatrain.data.tokenizer.convert_to_hf import save_hf_tokenizer
from megatrain.errors import ConfigError
from megatrain.models import GPT, GPTConfig
from tests.conftest import SHAKESPEARE, SHARED_DATA, SLICE_CHARS
from tests.unit.checkpoints import write_stage0_checkpoint

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

WIKITEXT = SHARED_DATA / "wikitext-2"
VOCAB = 1024
ROLES = ("unk_id", "bos_id", "eos_id", "pad_id", "cls_id", "sep_id", "mask_id", "sentinel_ids",
         "vocab_size")
# Text beyond the corpora: characters the tokenizers never saw (CJK, emoji, "\r", "<": byte
# fallback), whitespace runs and tabs, the metaspace character itself, byte pieces spelled out.
EXTRA = [
    "naïve café — 東京 🐍 ñandú Zürich, Ωμέγα ½ °C\n",
    "\tindented  with\ttabs   and  runs of     spaces   \n\n\n",
    "Windows line\r\nends\r\n",
    "spelled-out bytes: <0x41> <0x0A>x<0xE6><0x9D>y <0x41",
    "the metaspace \u2581 itself, \u2581\u2581 twice, and a trailing space ",
    "ﬁ ① Ｈ ẞ: not NFKC-normalized",
    "   ",
    "",
]

# Text that spells SentencePiece byte pieces, whole, run together, inside words, in other cases
# and half-written: all of it is plain text to SentencePiece.
BYTE_PIECE_LOOKALIKES = [
    "<0x41>", "x = '<0x0A>'  # <0xE6><0x9D>\n", "<<0x41>>", "<0x41><0x42><0x43>",
    "a<0x41>b", "\t<0x09> <0x20>\n<0x0A>", "<0xe6> <0xZZ> <0x100> <0x4> 0x41> <0x41",
    "\u2581<0x41>\u2581", "<0x00>", "print('<0xFF>')",
]


def _lines(path: Path) -> list[str]:
    """The non-blank lines of a shared data file, without wikitext's literal ``<unk>`` (which
    Hugging Face reads as the unk token) or ``<``: the models keep ``<`` unknown."""
    if not path.is_file():
        pytest.skip(f"shared test data not found at {path}")
    return [line + "\n" for line in path.read_text(encoding="utf-8").splitlines()
            if line.strip() and "<" not in line]


@pytest.fixture(scope="module")
def train_texts(shakespeare_text: str) -> list[str]:
    """What the tokenizers learn from: ~300 KB of Shakespeare and Wikipedia text (accents,
    dashes, Greek)."""
    return [shakespeare_text, *_lines(WIKITEXT / "valid.txt")]


@pytest.fixture(scope="module")
def held_out(shakespeare_text: str) -> list[str]:  # (that fixture skips without the data)
    """Real text none of the tokenizers saw: a few hundred lines, two multi-line documents, and
    ``EXTRA``."""
    shakespeare = SHAKESPEARE.read_text(encoding="utf-8")[SLICE_CHARS:].splitlines(keepends=True)
    wiki = _lines(WIKITEXT / "test.txt")
    unicode_lines = [line for line in wiki if any(ord(c) > 127 for c in line)]
    assert len(unicode_lines) > 20
    lines = shakespeare[:250] + wiki[:60] + unicode_lines
    return [*lines, "".join(shakespeare[300:400]), "".join(wiki[100:130]), *EXTRA]


@pytest.fixture(scope="module", params=["bpe", "unigram", "char"])
def sp_tokenizer(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
                 train_texts: list[str]) -> Tokenizer:
    """A tokenizer trained as ``megatrain-prepare --tokenizer-type TYPE`` trains it."""
    folder = tmp_path_factory.mktemp(request.param)
    return load_tokenizer(train_tokenizer(train_texts, folder / "tokenizer.model", VOCAB,
                                          model_type=request.param, threads=2))


def _export(path: Path, out: Path) -> object:
    out.mkdir(parents=True, exist_ok=True)
    save_hf_tokenizer(path, out)
    return transformers.AutoTokenizer.from_pretrained(out)


def _assert_same_ids(hf: object, ours: Tokenizer, texts: list[str]) -> None:
    for text in texts:
        expected = ours.encode(text)
        assert hf.encode(text, add_special_tokens=False) == expected, f"text {text!r}"
        assert hf.decode(expected, skip_special_tokens=True) == ours.decode(expected)


def _roles(tok: Tokenizer) -> dict[str, object]:
    return {role: getattr(tok, role) for role in ROLES}


def test_exported_sentencepiece_tokenizer_gives_megatrain_ids(
    sp_tokenizer: Tokenizer, held_out: list[str], tmp_path: Path
) -> None:
    ours = sp_tokenizer
    hf = _export(ours.path, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "tokenizer.json", "tokenizer.model", "tokenizer_config.json"]
    _assert_same_ids(hf, ours, held_out)
    assert hf.batch_decode([ours.encode(t) for t in held_out[:3]]) == held_out[:3]

    # The texts exercise what they should: newlines, byte fallback (also for "<", so that
    # "<0x41>" spelled out in EXTRA is text around an unknown character), learned pieces.
    pieces = {ours._sp.id_to_piece(i) for text in held_out for i in ours.encode(text)}
    assert "\n" in pieces and {"<0xE6>", "<0xF0>", "<0x0D>"} <= pieces
    assert ours.encode("<") == [ours._sp.piece_to_id("<0x3C>")]
    longest = max(len(p) for p in pieces if not p.startswith("<0x"))
    assert longest == 1 if _model_type(ours) == "char" else longest > 3


def _model_type(tok: Tokenizer) -> str:
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(tok.path.read_bytes())
    return {1: "unigram", 2: "bpe", 4: "char"}[proto.trainer_spec.model_type]


def test_exported_sentencepiece_tokenizer_keeps_the_special_token_roles(
    sp_tokenizer: Tokenizer, tmp_path: Path
) -> None:
    ours = sp_tokenizer
    hf = _export(ours.path, tmp_path)
    assert (hf.unk_token_id, hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (0, 1, 2, 3)
    assert (hf.cls_token, hf.sep_token, hf.mask_token) == ("[CLS]", "[SEP]", "[MASK]")
    assert (hf.cls_token_id, hf.sep_token_id, hf.mask_token_id) == (ours.cls_id, ours.sep_id,
                                                                    ours.mask_id)
    assert len(ours.sentinel_ids) == 100
    assert hf.convert_ids_to_tokens(ours.sentinel_ids) == list(CONTROL_TOKENS[3:])
    assert set(ours.sentinel_ids) | {0, 1, 2, 3, ours.cls_id} <= set(hf.all_special_ids)
    ids = [ours.bos_id, ours.mask_id, *ours.encode("To be"), *ours.sentinel_ids[:2], ours.eos_id]
    assert hf.decode(ids, skip_special_tokens=True) == "To be"
    # megatrain reads the exported tokenizer.json (and its tokenizer_config.json) alike.
    assert _roles(load_tokenizer(tmp_path / "tokenizer.json")) == _roles(ours)


@pytest.mark.parametrize("model_type", ["bpe", "unigram", "char"])
def test_byte_pieces_spelled_out_in_code_stay_text(model_type: str, tmp_path: Path) -> None:
    """A code tokenizer knows every character of ``<0x41>``: the text is those characters, as in
    SentencePiece, not the byte piece (a Unigram matches any piece it holds)."""
    texts = [doc.text for _, doc in zip(range(60), iter_documents("stdlib"))]
    ours = load_tokenizer(train_tokenizer(texts, tmp_path / "tok" / "tokenizer.model", VOCAB,
                                          model_type=model_type, max_sentences=5_000))
    assert all(not ours._sp.id_to_piece(i).startswith("<0x") for i in ours.encode("<0x41>"))
    hf = _export(ours.path, tmp_path / "hf")
    _assert_same_ids(hf, ours, [*BYTE_PIECE_LOOKALIKES, *texts[:5]])


# --- a corpus prepared with a Hugging Face tokenizer.json -------------------------------------


def _byte_level_bpe(train: list[str], folder: Path) -> None:
    """GPT-2 style: byte-level BPE, one <|endoftext|>, no tokenizer_config.json."""
    bpe = tokenizers.Tokenizer(tokenizers.models.BPE())
    bpe.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = tokenizers.decoders.ByteLevel()
    bpe.train_from_iterator(train, tokenizers.trainers.BpeTrainer(
        vocab_size=800, special_tokens=["<|endoftext|>"],
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet()))
    bpe.save(str(folder / "tokenizer.json"))


def _t5_unigram(train: list[str], folder: Path) -> None:
    """T5 style: NFKC, metaspace, unigram, sentinels, "</s>" appended by the post-processor,
    roles in a tokenizer_config.json that names T5's own tokenizer class."""
    sentinels = [f"<extra_id_{i}>" for i in range(100)]
    uni = tokenizers.Tokenizer(tokenizers.models.Unigram())
    uni.normalizer = tokenizers.normalizers.NFKC()
    uni.pre_tokenizer = tokenizers.pre_tokenizers.Metaspace()
    uni.decoder = tokenizers.decoders.Metaspace()
    uni.train_from_iterator(train, tokenizers.trainers.UnigramTrainer(
        vocab_size=900, special_tokens=["<pad>", "</s>", "<unk>", *sentinels], unk_token="<unk>"))
    uni.post_processor = tokenizers.processors.TemplateProcessing(
        single="$A </s>", special_tokens=[("</s>", 1)])
    uni.save(str(folder / "tokenizer.json"))
    config = {"tokenizer_class": "T5Tokenizer", "eos_token": "</s>", "unk_token": "<unk>",
              "pad_token": "<pad>", "extra_ids": 100, "additional_special_tokens": sentinels,
              "model_max_length": 512}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))


@pytest.fixture(scope="module", params=["byte-level-bpe", "t5-unigram"])
def hf_prepared(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
                train_texts: list[str], corpus_dir: Path) -> Path:
    """The folder of a corpus prepared with ``--tokenizer given/tokenizer.json``."""
    given = tmp_path_factory.mktemp("given")
    lines = [line for text in train_texts for line in text.splitlines()]
    {"byte-level-bpe": _byte_level_bpe, "t5-unigram": _t5_unigram}[request.param](lines, given)
    out = tmp_path_factory.mktemp("prepared")
    manifest = prepare(str(corpus_dir), out, tokenizer=str(given / "tokenizer.json"), workers=1,
                       progress=False)
    assert manifest.tokenizer_path == out / "tokenizer.json"
    return out


def test_a_tokenizer_json_corpus_exports_that_tokenizer(
    hf_prepared: Path, held_out: list[str], tmp_path: Path
) -> None:
    ours = load_tokenizer(hf_prepared)
    assert ours.eos_id >= 0
    hf = _export(hf_prepared / "tokenizer.json", tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tokenizer.json",
                                                          "tokenizer_config.json"]
    _assert_same_ids(hf, ours, held_out)
    assert _roles(load_tokenizer(tmp_path / "tokenizer.json")) == _roles(ours)
    assert (hf.eos_token_id, hf.bos_token_id) == (ours.eos_id, ours.bos_id if ours.bos_id >= 0
                                                  else None)
    # The tokenizer as it was: its post-processor still appends T5's "</s>".
    original = tokenizers.Tokenizer.from_file(str(hf_prepared / "tokenizer.json"))
    assert hf.encode("To be, or not") == original.encode("To be, or not").ids
    if ours.sentinel_ids:
        assert hf.convert_ids_to_tokens(ours.sentinel_ids) == list(CONTROL_TOKENS[3:])
        assert hf.pad_token_id == ours.pad_id == 0 and hf.model_max_length == 512


# --- through megatrain-export -----------------------------------------------------------------


@pytest.mark.parametrize("kind", ["unigram", "char", "tokenizer.json"])
def test_megatrain_export_writes_the_tokenizer_of_the_checkpoint(
    kind: str, train_texts: list[str], held_out: list[str], tmp_path: Path
) -> None:
    """A checkpoint holds its tokenizer as ``tokenizer.model`` whatever it is (a tokenizer.json
    too); the export writes the matching Hugging Face files and the model config's token ids."""
    if kind == "tokenizer.json":
        (tmp_path / "given").mkdir()
        _byte_level_bpe([line for text in train_texts for line in text.splitlines()],
                        tmp_path / "given")
        tokenizer = tmp_path / "given" / "tokenizer.json"
    else:
        tokenizer = train_tokenizer(train_texts, tmp_path / "tok" / "tokenizer.model", 512,
                                    model_type=kind, threads=2)
    ours = load_tokenizer(tokenizer)
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layers=1, d_model=32, n_heads=2, d_ff=64, vocab_size=ours.vocab_size,
                          max_seq_len=32))
    write_stage0_checkpoint(tmp_path / "run" / "checkpoints" / "step_7", "gpt", model, tokenizer)
    out = tmp_path / "hf"
    assert export_main(["--checkpoint", str(tmp_path / "run"), "--out", str(out)]) == 0

    names = {p.name for p in out.iterdir()}
    assert {"tokenizer.json", "tokenizer_config.json"} <= names
    assert ("tokenizer.model" in names) == (kind != "tokenizer.json")  # a real SentencePiece one
    hf = transformers.AutoTokenizer.from_pretrained(out)
    _assert_same_ids(hf, ours, held_out)
    config = json.loads((out / "config.json").read_text())
    assert (config["eos_token_id"], hf.eos_token_id) == (ours.eos_id, ours.eos_id)


# --- what does not convert ----------------------------------------------------------------------


def _spm_model(path: Path, texts: list[str], **options: object) -> Path:
    proto = io.BytesIO()
    spm.SentencePieceTrainer.Train(sentence_iterator=iter(texts), model_writer=proto,
                                   vocab_size=300, minloglevel=2, **options)
    path.write_bytes(proto.getvalue())
    return path


def test_sentencepiece_models_that_would_give_other_ids_are_config_errors(
    train_texts: list[str], tmp_path: Path
) -> None:
    lines = train_texts[0].splitlines()[:3000]
    dummy = _spm_model(tmp_path / "dummy.model", lines, model_type="unigram")  # the defaults
    with pytest.raises(ConfigError, match="add_dummy_prefix, remove_extra_whitespaces"):
        save_hf_tokenizer(dummy, tmp_path)
    word = _spm_model(tmp_path / "word.model", lines, model_type="word", add_dummy_prefix=False,
                      remove_extra_whitespaces=False)
    with pytest.raises(ConfigError, match="word model does not convert"):
        save_hf_tokenizer(word, tmp_path)
    assert not list(tmp_path.glob("tokenizer*"))


def test_export_next_to_the_model_itself(sp_tokenizer: Tokenizer, tmp_path: Path) -> None:
    """Writing into the folder that holds ``tokenizer.model`` keeps it (no copy onto itself)."""
    model = shutil.copyfile(sp_tokenizer.path, tmp_path / "tokenizer.model")
    save_hf_tokenizer(model, tmp_path)
    assert model.read_bytes() == sp_tokenizer.path.read_bytes()
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert hf.encode("Wherefore art thou", add_special_tokens=False) == \
        sp_tokenizer.encode("Wherefore art thou")
