"""megatrain-prepare --format sft|cls|seq2seq: each format end to end (JSONL and Parquet), decoded
back and checked against the tokenizer's own encoding of the documented rendering; the chat
template against transformers' apply_chat_template; bad input as one line naming file:line."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from megatrain.cli.prepare import main
from megatrain.data.manifest import Manifest
from megatrain.data.prepare.pipeline import prepare
from megatrain.data.prepare.train_tokenizer import train_tokenizer
from megatrain.data.prepare.verify import verify
from megatrain.data.tar import npy_tokens, tar_samples
from megatrain.data.tokenizer import Tokenizer, load_tokenizer
from megatrain.errors import ConfigError, DataError

tokenizers = pytest.importorskip("tokenizers")

ALPACA = ("Below is an instruction that describes a task. Write a response that appropriately "
          "completes the request.\n\n### Instruction:\n{}\n\n### Response:\n")
CHATML = (
    "{{ bos_token }}{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' }}"
    "{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] + '<|im_end|>' }}"
    "{% endgeneration %}{% else %}{{ m['content'] + '<|im_end|>' }}{% endif %}{{ '\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
SFT_ROWS = [
    {"prompt": "Add 2 and 3.", "completion": "5"},
    {"messages": [{"role": "system", "content": "Be brief."},
                  {"role": "user", "content": "Hi there"},
                  {"role": "assistant", "content": "Hello!"},
                  {"role": "user", "content": "Loop?"},
                  {"role": "assistant", "content": "for i in range(3):\n    print(i)"}]},
    {"prompt": "naïve café — 東京", "completion": "  tabs\tand  spaces\n", "extra": 1},
    {"prompt": "Say it.", "completion": "Said."},
]
TEXTS = [json.dumps(r, ensure_ascii=False) for r in SFT_ROWS] + [
    "the quick brown fox jumps over the lazy dog", "a stunning film", "a dull plot",
    "Translate: good morning", "guten Morgen", "is it good? yes it is",
]


def write_jsonl(path: Path, rows: list, blank_after: int | None = None) -> Path:
    lines = [r if isinstance(r, str) else json.dumps(r, ensure_ascii=False) for r in rows]
    if blank_after is not None:
        lines.insert(blank_after, "")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def write_parquet(path: Path, rows: list[dict]) -> Path:
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def samples(manifest: Manifest) -> dict[int, dict]:
    """Row index → {member: bytes, "split": ...} of every sample (keys end in the row index)."""
    out = {}
    for split, shards in manifest.splits.items():
        for shard in shards:
            found, stop = tar_samples(shard.path.read_bytes())
            assert stop is None
            for key, parts in found:
                out[int(key.rsplit("-", 1)[1])] = {k: bytes(v) for k, v in parts.items()} | {
                    "split": split}
    return out


def tokens(sample: dict, member: str = "tokens.npy") -> list[int]:
    return npy_tokens(memoryview(sample[member])).tolist()


def expected(tok: Tokenizer, pieces: list[tuple[str, int]]) -> tuple[list[int], list[int]]:
    """Ids and mask of pieces tokenized one by one (the documented rule)."""
    ids, mask = [], []
    for text, turn in pieces:
        piece = tok.encode(text)
        ids += piece
        mask += [turn] * len(piece)
    return ids, mask


def all_ok(root: Path) -> bool:
    return all(check.ok for check in verify(root))


@pytest.fixture(scope="module")
def spm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """megatrain's own SentencePiece model (it has [CLS] and [SEP])."""
    return train_tokenizer(TEXTS * 3, tmp_path_factory.mktemp("spm") / "tokenizer.model", 450)


@pytest.fixture(scope="module")
def chatml(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A byte-level BPE tokenizer.json with a ChatML chat_template in tokenizer_config.json."""
    folder = tmp_path_factory.mktemp("chatml")
    bpe = tokenizers.Tokenizer(tokenizers.models.BPE())
    bpe.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = tokenizers.decoders.ByteLevel()
    bpe.train_from_iterator(TEXTS * 3, tokenizers.trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<s>", "</s>", "<pad>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet()))
    bpe.save(str(folder / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>",
              "eos_token": "</s>", "pad_token": "<pad>", "chat_template": CHATML}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder / "tokenizer.json"


@pytest.fixture(scope="module")
def words(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A word-level tokenizer.json that drops whitespace: no chat_template, no [CLS]/[SEP]."""
    folder = tmp_path_factory.mktemp("words")
    vocab = {w: i for i, w in enumerate(
        ["<unk>", "</s>", "Say", "it", ".", "Said", "###", "Instruction", ":", "Response"])}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.add_special_tokens(["</s>"])
    tok.save(str(folder / "tokenizer.json"))
    return folder / "tokenizer.json"


def run(source: Path, out: Path, **options) -> Manifest:
    return prepare(str(source), out, **{"workers": 1, "eval_fraction": 0.0, "progress": False,
                                        **options})


# --- sft ---------------------------------------------------------------------------------------


def plain_pieces(row: dict) -> list[tuple[str, int]]:
    """docs/data.md's plain rendering, written out independently of templates.py."""
    if "messages" not in row:
        return [(row["prompt"] + "\n", 0), (row["completion"], 1)]
    pieces, turn = [], 0
    for m in row["messages"]:
        turn += m["role"] == "assistant"
        pieces += [(m["role"] + ": ", 0),
                   (m["content"] + "\n", turn if m["role"] == "assistant" else 0)]
    return pieces


def test_sft_plain_jsonl_trains_a_tokenizer_and_marks_each_assistant_turn(tmp_path: Path) -> None:
    source = write_jsonl(tmp_path / "sft.jsonl", SFT_ROWS, blank_after=2)
    manifest = run(source, tmp_path / "o", format="sft", vocab_size=450, eval_fraction=0.4)
    assert manifest.task == {"format": "sft", "template": "plain", "dropped": 0}
    assert Manifest.load(tmp_path / "o").task == manifest.task
    tok = load_tokenizer(manifest.tokenizer_path)
    found = samples(manifest)
    assert {s["split"] for s in found.values()} == {"train", "eval"}  # split by row
    assert sorted(found) == list(range(len(SFT_ROWS)))
    for i, row in enumerate(SFT_ROWS):
        ids, mask = expected(tok, plain_pieces(row))
        assert tokens(found[i]) == ids and tok.eos_id not in ids
        assert np.load(io.BytesIO(found[i]["mask.npy"])).tolist() == mask
        assert json.loads(found[i]["json"])["source"] == "sft.jsonl"
    assert max(np.load(io.BytesIO(found[1]["mask.npy"]))) == 2  # the second assistant turn
    assert all_ok(tmp_path / "o")


def test_sft_alpaca_parquet_drops_a_row_with_no_target_tokens(tmp_path: Path, words: Path) -> None:
    rows = [{"prompt": "Say it.", "completion": "Said."},
            {"prompt": "Say it.", "completion": "   "},  # whitespace: no tokens with this one
            {"prompt": "Say it.", "completion": "Said ."}]
    source = write_parquet(tmp_path / "sft.parquet", rows)
    manifest = run(source, tmp_path / "o", format="sft", tokenizer=str(words), template="alpaca")
    assert manifest.task == {"format": "sft", "template": "alpaca", "dropped": 1}
    assert manifest.stats["documents"] == 2
    tok = load_tokenizer(manifest.tokenizer_path)
    found = samples(manifest)
    assert sorted(found) == [0, 2]
    for i in (0, 2):
        ids, mask = expected(tok, [(ALPACA.format(rows[i]["prompt"]), 0),
                                   (rows[i]["completion"], 1)])
        assert tokens(found[i]) == ids
        assert np.load(io.BytesIO(found[i]["mask.npy"])).tolist() == mask
    assert all_ok(tmp_path / "o")


def reference_chat_pieces(hf: object, messages: list[dict]) -> list[tuple[str, int]]:
    """The conversation rendered by transformers, cut where each assistant message starts (the
    prefix rendered with the generation prompt) and ends (the prefix through it)."""
    def render(msgs: list[dict], generation_prompt: bool) -> str:
        return hf.apply_chat_template(msgs, tokenize=False,
                                      add_generation_prompt=generation_prompt)

    full, cut, turn, pieces = render(messages, False), 0, 0, []
    for k, message in enumerate(messages):
        if message["role"] == "assistant":
            turn += 1
            start, end = len(render(messages[:k], True)), len(render(messages[: k + 1], False))
            pieces += [(full[cut:start], 0), (full[start:end], turn)]
            cut = end
    return [*pieces, (full[cut:], 0)]


def test_sft_chat_template_matches_transformers(tmp_path: Path, chatml: Path) -> None:
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(chatml.parent)
    source = write_jsonl(tmp_path / "chat.jsonl", SFT_ROWS)
    manifest = prepare(str(source), tmp_path / "o", format="sft", tokenizer=str(chatml),
                       template="chat", workers=2, eval_fraction=0.0, progress=False)
    assert manifest.task == {"format": "sft", "template": "chat", "dropped": 0}
    found = samples(manifest)
    for i, row in enumerate(SFT_ROWS):
        messages = row.get("messages") or [{"role": "user", "content": row["prompt"]},
                                           {"role": "assistant", "content": row["completion"]}]
        ids, mask = [], []
        for text, turn in reference_chat_pieces(hf, messages):
            piece = hf.encode(text, add_special_tokens=False)
            ids, mask = ids + piece, mask + [turn] * len(piece)
        assert tokens(found[i]) == ids
        assert np.load(io.BytesIO(found[i]["mask.npy"])).tolist() == mask
        assert hf.decode(ids) == hf.apply_chat_template(messages, tokenize=False)
    assert tokens(found[0])[0] == hf.bos_token_id  # {{ bos_token }}: the special token's id
    assert max(np.load(io.BytesIO(found[1]["mask.npy"]))) == 2
    assert all_ok(tmp_path / "o")


def shard_hashes(manifest: Manifest) -> list[tuple[str, str]]:
    return [(s.name, s.sha256) for shards in manifest.splits.values() for s in shards]


def test_workers_and_resume_give_identical_shards(tmp_path: Path, words: Path) -> None:
    rows = [{"prompt": "Say it.", "completion": "Said." if i % 7 else " "} for i in range(60)]
    source = write_jsonl(tmp_path / "sft.jsonl", rows)
    options = {"format": "sft", "tokenizer": str(words), "shard_tokens": 40,
               "eval_fraction": 0.2, "progress": False}
    first = prepare(str(source), tmp_path / "a", workers=1, **options)
    again = prepare(str(source), tmp_path / "b", workers=2, **options)
    assert shard_hashes(first) == shard_hashes(again) and len(first.splits["train"]) > 3
    assert first.task["dropped"] == again.task["dropped"] == 9
    # an interrupted prepare: a later shard damaged, the manifest gone; the rerun resumes
    damaged = first.splits["train"][2].path
    damaged.write_bytes(damaged.read_bytes()[:1000])
    (tmp_path / "a" / "manifest.json").unlink()
    resumed = prepare(str(source), tmp_path / "a", workers=1, **options)
    assert shard_hashes(resumed) == shard_hashes(first) and resumed.task == first.task
    assert resumed.stats == first.stats


def test_dedup_drops_exact_duplicate_rows(tmp_path: Path, spm: Path) -> None:
    rows = [SFT_ROWS[0], SFT_ROWS[3], {**SFT_ROWS[0], "id": 7}, SFT_ROWS[3] | {"completion": "x"}]
    manifest = run(write_jsonl(tmp_path / "d.jsonl", rows), tmp_path / "o", format="sft",
                   tokenizer=str(spm), dedup=True)
    assert manifest.stats["dropped_duplicate"] == 1 and manifest.stats["documents"] == 3


# --- cls ---------------------------------------------------------------------------------------


def test_cls_labels_sorted_or_given_and_pairs(tmp_path: Path, spm: Path) -> None:
    tok = load_tokenizer(spm)
    rows = [{"text": "a stunning film", "label": "pos"}, {"text": "a dull plot", "label": "neg"},
            {"text": "is it good?", "label": "neutral"}]
    manifest = run(write_jsonl(tmp_path / "c.jsonl", rows), tmp_path / "o", format="cls",
                   tokenizer=str(spm))
    assert manifest.task == {"format": "cls", "template": None,
                             "labels": ["neg", "neutral", "pos"], "dropped": 0}
    for i, sample in samples(manifest).items():
        assert tokens(sample) == [tok.cls_id, *tok.encode(rows[i]["text"]), tok.sep_id]
        assert manifest.task["labels"][int(sample["cls"].decode("ascii"))] == rows[i]["label"]
    given = run(write_jsonl(tmp_path / "c.jsonl", rows), tmp_path / "g", format="cls",
                tokenizer=str(spm), labels="pos, neg,neutral,unused")  # as --labels gives it
    assert given.task["labels"] == ["pos", "neg", "neutral", "unused"]
    assert {int(s["cls"]) for s in samples(given).values()} == {0, 1, 2}

    pairs = [{"text_a": "is it good?", "text_b": "yes it is", "label": 10},
             {"text_a": "a dull plot", "text_b": "a stunning film", "label": 2},
             {"text_a": "good", "text_b": "morning", "label": 0}]
    manifest = run(write_parquet(tmp_path / "p.parquet", pairs), tmp_path / "p", format="cls",
                   tokenizer=str(spm))
    assert manifest.task["labels"] == ["0", "2", "10"]  # integers sort by value
    for i, sample in samples(manifest).items():
        a, b = tok.encode(pairs[i]["text_a"]), tok.encode(pairs[i]["text_b"])
        assert tokens(sample) == [tok.cls_id, *a, tok.sep_id, *b, tok.sep_id]
        assert manifest.task["labels"][int(sample["cls"])] == str(pairs[i]["label"])
    assert all_ok(tmp_path / "o") and all_ok(tmp_path / "p")


# --- seq2seq -----------------------------------------------------------------------------------


def test_seq2seq_input_and_target(tmp_path: Path, spm: Path) -> None:
    tok = load_tokenizer(spm)
    rows = [{"input": "Translate: good morning", "target": "guten Morgen"},
            {"input": "the quick brown fox", "target": "jumps over the lazy dog"}]
    manifest = run(write_jsonl(tmp_path / "s.jsonl", rows), tmp_path / "o", format="seq2seq",
                   tokenizer=str(spm))
    assert manifest.task == {"format": "seq2seq", "template": None, "dropped": 0}
    for i, sample in samples(manifest).items():
        assert tokens(sample) == tok.encode(rows[i]["input"])
        assert tokens(sample, "target.npy") == tok.encode(rows[i]["target"])
    assert all_ok(tmp_path / "o")
    # --verify checks each format's member: these samples have no mask.npy
    data = json.loads((tmp_path / "o" / "manifest.json").read_text())
    data["task"]["format"] = "sft"
    (tmp_path / "o" / "manifest.json").write_text(json.dumps(data))
    bad = [c.line() for c in verify(tmp_path / "o") if not c.ok]
    assert bad and "expected json + mask.npy + tokens.npy" in bad[0]


# --- pretraining is unchanged; the --tokenizer a fine-tune reuses ------------------------------


def test_a_pretraining_manifest_has_no_task(tmp_path: Path, spm: Path) -> None:
    source = write_jsonl(tmp_path / "t.jsonl", [{"text": t} for t in TEXTS])
    manifest = run(source, tmp_path / "o", tokenizer=str(spm))
    data = json.loads((tmp_path / "o" / "manifest.json").read_text())
    assert "task" not in data and "task" not in data["options"]
    assert manifest.task is None and Manifest.load(tmp_path / "o").task is None


def test_tokenizer_of_a_run_folder(tmp_path: Path, spm: Path) -> None:
    step = tmp_path / "run" / "checkpoints" / "step_5"
    step.mkdir(parents=True)
    (step / "meta.json").write_text("{}")
    (step / "tokenizer.model").write_bytes(spm.read_bytes())
    (step.parent / "latest").write_text("step_5")
    source = write_jsonl(tmp_path / "s.jsonl", [{"input": "good", "target": "morning"}])
    manifest = run(source, tmp_path / "o", tokenizer=str(tmp_path / "run"), format="seq2seq")
    assert manifest.tokenizer_path.read_bytes() == spm.read_bytes()


# --- bad input: one line, naming the place -----------------------------------------------------


def fails(argv: list[str], capsys: pytest.CaptureFixture) -> str:
    assert main([*argv, "--workers", "1", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


@pytest.mark.parametrize(("rows", "message"), [
    ([SFT_ROWS[0], {"prompt": "x"}], r"bad\.jsonl:3: missing 'completion'"),
    ([SFT_ROWS[0], {"prompt": "x", "completion": ""}], r"bad\.jsonl:3: 'completion' is empty"),
    ([SFT_ROWS[0], {"prompt": "x", "completion": 5}], r"bad\.jsonl:3: 'completion' must be a str"),
    ([{"messages": [{"role": "tool", "content": "x"}]}],
     r"bad\.jsonl:1: messages\[0\]: unknown role 'tool' \(roles: system, user, assistant\)"),
    ([{"messages": [{"role": "user", "content": "x"}]}], r"bad\.jsonl:1: no assistant message"),
    ([SFT_ROWS[0], "{not json"], r"bad\.jsonl:3: not valid JSON"),
    ([[1, 2]], r"bad\.jsonl:1: expected a JSON object"),
])
def test_a_bad_sft_row_names_file_and_line(
    tmp_path: Path, spm: Path, capsys: pytest.CaptureFixture, rows: list, message: str
) -> None:
    source = write_jsonl(tmp_path / "bad.jsonl", rows, blank_after=1)
    err = fails(["--source", str(source), "--out", str(tmp_path / "o"), "--format", "sft",
                 "--tokenizer", str(spm)], capsys)
    assert err.startswith("error: ") and re.search(message, err), err
    assert not (tmp_path / "o").exists()  # checked before anything is written


def test_a_bad_parquet_row_names_its_index(tmp_path: Path, spm: Path) -> None:
    source = write_parquet(tmp_path / "bad.parquet", [{"input": "a", "target": "b"},
                                                      {"input": "a", "target": None}])
    with pytest.raises(DataError, match=r"bad\.parquet: row 1 \(0-based\): missing 'target'"):
        run(source, tmp_path / "o", tokenizer=str(spm), format="seq2seq")


def test_unknown_template_and_option_errors(
    tmp_path: Path, spm: Path, capsys: pytest.CaptureFixture
) -> None:
    source = write_jsonl(tmp_path / "s.jsonl", SFT_ROWS)
    base = ["--source", str(source), "--out", str(tmp_path / "o"), "--tokenizer", str(spm)]
    err = fails([*base, "--format", "sft", "--template", "vicuna"], capsys)
    assert err == "error: unknown template 'vicuna'; valid templates: plain, alpaca, chat"
    assert "valid formats: sft, cls, seq2seq" in fails([*base, "--format", "chat"], capsys)
    assert "--template applies to --format sft" in fails(
        [*base, "--format", "cls", "--template", "plain"], capsys)
    assert "do not apply to --format sft" in fails([*base, "--format", "sft", "--normalize",
                                                    "NFC"], capsys)
    with pytest.raises(ConfigError, match="add --format"):
        run(source, tmp_path / "o", tokenizer=str(spm), labels=["a"])


def test_label_not_in_the_given_labels(tmp_path: Path, spm: Path) -> None:
    rows = [{"text": "good", "label": "pos"}, {"text": "bad", "label": "negative"}]
    with pytest.raises(DataError, match=r"c\.jsonl:2: label 'negative' is not in --labels "
                                        r"\(pos, neg\)"):
        run(write_jsonl(tmp_path / "c.jsonl", rows), tmp_path / "o", tokenizer=str(spm),
            format="cls", labels=["pos", "neg"])
    with pytest.raises(DataError, match=r"c\.jsonl:1: 'label' must be a string or an integer"):
        run(write_jsonl(tmp_path / "c.jsonl", [{"text": "x", "label": 0.5}]), tmp_path / "o",
            tokenizer=str(spm), format="cls")


def test_tokenizers_that_lack_what_the_format_needs(
    tmp_path: Path, spm: Path, words: Path
) -> None:
    sft = write_jsonl(tmp_path / "s.jsonl", SFT_ROWS)
    with pytest.raises(DataError, match=r"--template chat: .*tokenizer\.json has no "
                                        "chat_template"):
        run(sft, tmp_path / "o", tokenizer=str(words), format="sft", template="chat")
    with pytest.raises(DataError, match="is a SentencePiece model, which has no chat_template"):
        run(sft, tmp_path / "o", tokenizer=str(spm), format="sft", template="chat")
    with pytest.raises(ConfigError, match="--template chat .* add --tokenizer"):
        run(sft, tmp_path / "o", vocab_size=450, format="sft", template="chat")
    cls = write_jsonl(tmp_path / "c.jsonl", [{"text": "Said", "label": 1}])
    with pytest.raises(DataError, match=r"needs the tokenizer's \[CLS\] and \[SEP\]"):
        run(cls, tmp_path / "o", tokenizer=str(words), format="cls")
    with pytest.raises(DataError, match=r"s\.jsonl:2: the alpaca template takes one user "
                                        "message then one assistant message"):
        run(sft, tmp_path / "o", tokenizer=str(spm), format="sft", template="alpaca")
    assert not (tmp_path / "o").exists()


RAISES = ("{% for m in messages %}{% if m['role'] == 'system' %}"
          "{{ raise_exception('no system role') }}{% endif %}{{ m['content'] }}{% endfor %}")
UNSTABLE = "{% for m in messages %}{{ m['content'] }}{% if loop.last %}.{% endif %}{% endfor %}"
MUTATES = "{{ messages.append(1) }}"  # the immutable sandbox refuses it: a template is data


@pytest.mark.parametrize(("template", "message"), [
    (RAISES, r"chat\.jsonl:2: the chat template failed: no system role"),
    (UNSTABLE, r"chat\.jsonl:1: .* up to assistant message 1 is not a prefix"),
    (MUTATES, r"chat\.jsonl:1: the chat template failed: .*unsafe"),
])
def test_a_chat_template_that_fails_names_the_row(
    tmp_path: Path, chatml: Path, template: str, message: str
) -> None:
    (tmp_path / "tok").mkdir()
    (tmp_path / "tok" / "tokenizer.json").write_bytes(chatml.read_bytes())
    (tmp_path / "tok" / "chat_template.jinja").write_text(template)  # before tokenizer_config
    (tmp_path / "tok" / "tokenizer_config.json").write_text(json.dumps({"chat_template": CHATML}))
    source = write_jsonl(tmp_path / "chat.jsonl", SFT_ROWS[:2])
    with pytest.raises(DataError, match=message):
        run(source, tmp_path / "o", tokenizer=str(tmp_path / "tok"), format="sft",
            template="chat")
    assert not (tmp_path / "o" / "manifest.json").exists()
