"""BERT's task heads: the classifier (``num_labels``: BertForSequenceClassification) and the
pooler with the next-sentence head (``nsp``: BertForPreTraining), against ``transformers`` both
ways (state dicts, ``megatrain-export`` folders, ``model.init_from=hf:DIR``), with single
sentences and padded sentence pairs; their parameter counts and FLOPs; and changing heads when a
fine-tune starts from other weights (``training.pretrained``)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from megatrain.cli.export import main as export_main
from megatrain.config.schema import ModelConfig
from megatrain.data.prepare.train_tokenizer import train_tokenizer
from megatrain.errors import ConfigError
from megatrain.hf_export import export
from megatrain.models import GPT, GPTConfig, get_model_spec, resolve_model_config
from megatrain.models.bert import Bert, BertConfig, bert_flops_per_token
from megatrain.models.bert.hf import BERT_ADAPTER, bert_config_from_hf, bert_config_to_hf
from megatrain.models.registry import load_hf_pretrained, with_heads
from megatrain.training.checkpoint import write_manifest
from megatrain.training.pretrained import load_pretrained_weights, pretrained_config
from tests.unit.checkpoints import write_stage0_checkpoint

transformers = pytest.importorskip("transformers")

VOCAB = 512
BASE = BertConfig(n_layers=2, d_model=64, n_heads=4, d_ff=128, vocab_size=VOCAB, max_seq_len=40,
                  attn_impl="sdpa")
HEADS = {"cls": {"num_labels": 3}, "nsp": {"nsp": True}}
CLASSES = {"cls": "BertForSequenceClassification", "nsp": "BertForPreTraining"}
ATOL = 1e-5  # fp32


def _config(heads: str, **changes: object) -> BertConfig:
    return dataclasses.replace(BASE, **HEADS.get(heads, {}), **changes)


@torch.no_grad()
def _randomize(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every parameter random and sizeable (init zeroes biases and sets LayerNorms to 1/0,
    which would hide a swapped bias or LayerNorm); LayerNorm gains near 1."""
    g = torch.Generator().manual_seed(seed)
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            noise = torch.randn(p.shape, generator=g)
            if "LayerNorm" in type(module).__name__ and name == "weight":
                p.copy_(1.0 + 0.2 * noise)
            else:
                p.copy_(noise / p.shape[-1] ** 0.5 if p.dim() == 2 else 0.1 * noise)
    return model.eval()


def _batch(pairs: bool) -> dict[str, torch.Tensor]:
    """Three rows, two right-padded; ``pairs``: ``[CLS] a [SEP] b [SEP]`` with segment ids that
    switch at a different place in each row."""
    B, T = 3, 24
    ids = torch.randint(10, VOCAB, (B, T), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, 17:], mask[2, 9:] = 0, 0
    ids[:, 0] = 4  # [CLS]
    batch = {"input_ids": ids, "attention_mask": mask}
    if pairs:
        types = torch.zeros_like(ids)
        for row, (sep, end) in enumerate([(10, 23), (6, 16), (4, 8)]):
            ids[row, sep], ids[row, end] = 5, 5
            types[row, sep + 1:end + 1] = 1
        batch["token_type_ids"] = types
    return batch


def _outputs(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """A megatrain or transformers model's logits: (class,) or (MLM, NSP)."""
    out = model(**batch)
    if isinstance(out, torch.Tensor):
        return (out,)
    if isinstance(out, tuple):
        return out
    if hasattr(out, "seq_relationship_logits"):
        return out.prediction_logits, out.seq_relationship_logits
    return (out.logits,)


def _assert_same(actual: tuple[torch.Tensor, ...], expected: tuple[torch.Tensor, ...],
                 mask: torch.Tensor) -> None:
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected, strict=True):
        assert a.shape == e.shape
        real = mask.bool() if a.dim() == 3 else torch.ones(a.shape[0], dtype=torch.bool)
        torch.testing.assert_close(a[real], e[real], atol=ATOL, rtol=0)
        assert e[real].abs().max() > 0.3  # not trivially small
        assert (e[real][0] - e[real][1]).abs().max() > 1e-3  # rows differ


def _hf_class(heads: str) -> type:
    return getattr(transformers, CLASSES[heads])


# --- forward, sizes -------------------------------------------------------------------------


def test_heads_forward_shapes_and_no_mlm_head_in_a_classifier() -> None:
    batch = _batch(pairs=True)
    classes = Bert(_config("cls")).eval()(**batch)
    assert classes.shape == (3, 3)
    assert not hasattr(Bert(_config("cls")), "head")
    mlm, nsp = Bert(_config("nsp")).eval()(**batch)
    assert mlm.shape == (3, 24, VOCAB) and nsp.shape == (3, 2)
    assert Bert(BASE)(**batch).shape == (3, 24, VOCAB)


def test_classifier_dropout_applies_to_the_pooled_output_in_training_only() -> None:
    model = Bert(_config("cls", dropout=0.5))
    batch = _batch(pairs=False)
    model.eval()
    assert torch.equal(model(**batch), model(**batch))
    model.train()
    torch.manual_seed(0)
    assert not torch.equal(model(**batch), model(**batch))


@pytest.mark.parametrize("heads", ["cls", "nsp"])
@pytest.mark.parametrize("size", ["bert-tiny", "bert-base"])
def test_parameter_counts_equal_transformers(heads: str, size: str) -> None:
    config = with_heads(resolve_model_config({"family": "bert", "size": size}, 30522),
                        **HEADS[heads])
    model = Bert(config, device="meta")
    with torch.device("meta"):
        hf = _hf_class(heads)(bert_config_to_hf(config))
    n = sum(p.numel() for p in hf.parameters())
    assert model.num_params(non_embedding=False) == config.num_params(non_embedding=False) == n
    assert model.num_params() == config.num_params()


def test_num_params_and_flops_by_hand() -> None:
    # d=64, ff=128, L=2, V=512: per block 64·192+192 + 64·64+64 + 2·64 + 64·128+128 + 128·64+64
    # + 2·64 = 33472; the MLM head 64·64+64 + 2·64 + 512 = 4800; the pooler 64·64+64 = 4160.
    body = 512 * 64 + 2 * 64 + 2 * 33472  # tok_emb, emb_ln, blocks
    lookups = (40 + 2) * 64  # pos_emb, type_emb
    cls, nsp = _config("cls"), _config("nsp")
    per_sequence_cls, per_sequence_nsp = 4160 + 3 * 65, 4160 + 2 * 65
    assert cls.num_params(non_embedding=False) == body + per_sequence_cls + lookups
    assert cls.num_params() == body - 512 * 64 + per_sequence_cls  # the table is a lookup
    assert Bert(cls).num_params() == cls.num_params()
    assert nsp.num_params() == body + 4800 + per_sequence_nsp
    # per-token params at every token; the pooler and head once per sequence of 32
    attention = 12 * 2 * 64 * 32
    assert bert_flops_per_token(cls, 32) == 6 * (body - 512 * 64) + attention \
        + 6 * per_sequence_cls / 32
    assert get_model_spec("bert").flops_per_token(nsp, 32) == 6 * (body + 4800) + attention \
        + 6 * per_sequence_nsp / 32
    assert bert_flops_per_token(BASE, 32) == 6 * (body + 4800) + attention  # MLM unchanged


def test_a_model_is_a_classifier_or_a_pretrainer_not_both() -> None:
    with pytest.raises(ConfigError, match="num_labels.*or a next-sentence .*not both"):
        _config("cls", nsp=True)
    with pytest.raises(ConfigError, match="num_labels=-1 must be a non-negative integer"):
        _config("mlm", num_labels=-1)


# --- transformers parity ------------------------------------------------------------------


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("pairs", [False, True], ids=["single", "pairs"])
@pytest.mark.parametrize("heads", ["cls", "nsp"])
@torch.no_grad()
def test_megatrain_to_hf_logits_match(heads: str, pairs: bool, impl: str) -> None:
    model = _randomize(Bert(_config(heads, attn_impl=impl)), seed=2)
    hf_config = BERT_ADAPTER.hf_config(model.config)
    assert hf_config.architectures == [CLASSES[heads]]
    hf = _hf_class(heads)._from_config(hf_config, attn_implementation="eager").eval()
    hf.load_state_dict(BERT_ADAPTER.state_dict_to_hf(model.state_dict()), strict=True)
    batch = _batch(pairs)
    _assert_same(_outputs(hf, batch), _outputs(model, batch), batch["attention_mask"])


@pytest.mark.parametrize("pairs", [False, True], ids=["single", "pairs"])
@pytest.mark.parametrize("heads", ["cls", "nsp"])
@torch.no_grad()
def test_hf_to_megatrain_logits_match(heads: str, pairs: bool) -> None:
    hf_config = bert_config_to_hf(_config(heads))
    hf = _randomize(_hf_class(heads)._from_config(hf_config, attn_implementation="eager"), 3)
    config = bert_config_from_hf(hf.config)
    assert config == _config(heads, attn_impl="auto")
    model = Bert(dataclasses.replace(config, attn_impl="sdpa")).eval()
    model.load_state_dict(BERT_ADAPTER.state_dict_from_hf(hf.state_dict()), strict=True)
    batch = _batch(pairs)
    _assert_same(_outputs(model, batch), _outputs(hf, batch), batch["attention_mask"])


@pytest.mark.parametrize("heads", ["cls", "nsp"])
def test_config_and_state_dict_round_trip_exactly(heads: str) -> None:
    config = _config(heads)
    hf_config = BERT_ADAPTER.hf_config(config)
    assert bert_config_from_hf(hf_config) == dataclasses.replace(config, attn_impl="auto")
    sd = Bert(config).state_dict()
    hf_sd = BERT_ADAPTER.state_dict_to_hf(sd)
    BERT_ADAPTER.check_loads(hf_config, hf_sd)  # strict: names and shapes
    back = BERT_ADAPTER.state_dict_from_hf(hf_sd)
    assert back.keys() == sd.keys() and all(torch.equal(back[k], sd[k]) for k in sd)
    if heads == "cls":
        assert not any(k.startswith("cls.predictions") for k in hf_sd)
        assert (hf_config.num_labels, hf_config.problem_type) == (3, "single_label_classification")


def test_unsupported_bert_architectures_are_refused() -> None:
    hf_config = bert_config_to_hf(BASE)
    hf_config.architectures = ["BertForQuestionAnswering"]
    with pytest.raises(ValueError, match="BertForQuestionAnswering is not supported; megatrain's "
                                         "BERT is BertForMaskedLM, BertForPreTraining or Bert"):
        bert_config_from_hf(hf_config)
    hf_config.architectures = ["BertModel"]  # no head named: read as the masked LM
    assert bert_config_from_hf(hf_config) == dataclasses.replace(BASE, attn_impl="auto")


@pytest.mark.parametrize("heads", ["cls", "nsp"])
def test_pre_ln_heads_cannot_be_exported(heads: str) -> None:
    pre = _config(heads, norm_position="pre")
    with pytest.raises(ConfigError, match=f"cannot be exported to {CLASSES[heads]}: Hugging "):
        bert_config_to_hf(pre)
    with pytest.raises(ConfigError, match=f"cannot be exported to {CLASSES[heads]}"):
        BERT_ADAPTER.state_dict_to_hf(Bert(pre).state_dict())
    assert Bert(pre)(**_batch(pairs=True)) is not None  # it trains


# --- megatrain-export and model.init_from=hf:DIR --------------------------------------------


@pytest.fixture(scope="module")
def tokenizer_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    corpus = Path(json.__file__).read_text()[:8000]
    return train_tokenizer([corpus], tmp_path_factory.mktemp("tok") / "tokenizer.model", VOCAB)


def _checkpoint(tmp_path: Path, model: torch.nn.Module, tokenizer: Path, family: str = "bert",
                name: str = "run") -> Path:
    run = tmp_path / name
    write_stage0_checkpoint(run / "checkpoints" / "step_7", family, model, tokenizer)
    return run


@pytest.mark.parametrize("heads", ["cls", "nsp"])
@torch.no_grad()
def test_export_loads_in_transformers_and_back_with_the_same_logits(
        heads: str, tokenizer_path: Path, tmp_path: Path) -> None:
    model = _randomize(Bert(_config(heads)), seed=4)
    run = _checkpoint(tmp_path, model, tokenizer_path)
    out = tmp_path / "hf"
    if heads == "cls":
        export(run, out, labels=["negative", "neutral", "positive"])
    else:
        assert export_main(["--checkpoint", str(run), "--out", str(out)]) == 0
    saved = json.loads((out / "config.json").read_text())
    assert saved["architectures"] == [CLASSES[heads]]
    hf = transformers.AutoConfig.from_pretrained(out)
    if heads == "cls":
        assert hf.id2label == {0: "negative", 1: "neutral", 2: "positive"}
        assert hf.label2id == {"negative": 0, "neutral": 1, "positive": 2}
        hf = transformers.AutoModelForSequenceClassification.from_pretrained(out).eval()
    else:
        hf = transformers.BertForPreTraining.from_pretrained(out).eval()
    for pairs in (False, True):
        batch = _batch(pairs)
        _assert_same(_outputs(hf, batch), _outputs(model, batch), batch["attention_mask"])
    # ... and back: model.init_from=hf:DIR reads the same config and weights
    family, config, state_dict = load_hf_pretrained(out)
    assert (family, config) == ("bert", dataclasses.replace(model.config, attn_impl="auto"))
    assert state_dict.keys() == model.state_dict().keys()
    assert all(torch.equal(state_dict[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("heads", ["cls", "nsp"])
@torch.no_grad()
def test_init_from_a_transformers_folder_of_each_class(heads: str, tmp_path: Path) -> None:
    """A folder transformers saved (not ours) starts a run whose data asks for its heads; the
    model built from it gives transformers' logits."""
    hf = _randomize(_hf_class(heads)._from_config(bert_config_to_hf(_config(heads)),
                                                  attn_implementation="eager"), seed=5)
    hf.save_pretrained(tmp_path / "hf")
    config, state_dict = pretrained_config(f"hf:{tmp_path / 'hf'}",
                                           ModelConfig(family="bert", attn_impl="sdpa"), VOCAB,
                                           **HEADS[heads])
    assert config == _config(heads)
    model = Bert(config).eval()
    load_pretrained_weights(model, state_dict, "hf:x")
    for pairs in (False, True):
        batch = _batch(pairs)
        _assert_same(_outputs(model, batch), _outputs(hf, batch), batch["attention_mask"])


@torch.no_grad()
def test_a_bert_for_masked_lm_folder_with_extra_heads_loads_as_its_class(tmp_path: Path) -> None:
    """Google's BERTs name BertForMaskedLM but their weights hold the pooler and NSP head too:
    the import leaves those out, so the state dict loads strictly."""
    hf = _randomize(transformers.BertForPreTraining._from_config(bert_config_to_hf(BASE)), 6)
    hf.save_pretrained(tmp_path / "hf")
    config_json = tmp_path / "hf" / "config.json"
    config_json.write_text(config_json.read_text().replace("BertForPreTraining",
                                                           "BertForMaskedLM"))
    _, config, state_dict = load_hf_pretrained(tmp_path / "hf")
    assert (config.num_labels, config.nsp) == (0, False)
    Bert(config).load_state_dict(state_dict, strict=True)


def test_label_names_must_be_one_per_class(tokenizer_path: Path, tmp_path: Path) -> None:
    run = _checkpoint(tmp_path, Bert(_config("cls")), tokenizer_path)
    with pytest.raises(ConfigError, match="2 label names \\(a, b\\.\\.\\.\\) for a model with 3 "
                                          "classes"):
        export(run, tmp_path / "hf", labels=["a", "b"])
    with pytest.raises(ConfigError, match="one distinct name per class"):
        export(run, tmp_path / "hf", labels=["a", "b", "a"])
    with pytest.raises(ConfigError, match="for a model with 0 classes"):
        export(_checkpoint(tmp_path, Bert(BASE), tokenizer_path, name="mlm"), tmp_path / "hf",
               labels=["a"])
    assert not (tmp_path / "hf").exists()


def test_label_names_stored_with_the_checkpoint_are_exported(tokenizer_path: Path,
                                                             tmp_path: Path) -> None:
    """The trainer may keep the manifest's labels in meta.json: a plain ``megatrain-export``
    then names the classes."""
    run = _checkpoint(tmp_path, Bert(_config("cls")), tokenizer_path)
    meta_path = run / "checkpoints" / "step_7" / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta_path.write_text(json.dumps({**meta, "labels": ["x", "y", "z"]}))
    write_manifest(meta_path.parent)
    assert export_main(["--checkpoint", str(run), "--out", str(tmp_path / "hf")]) == 0
    saved = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert saved["id2label"] == {"0": "x", "1": "y", "2": "z"}


# --- changing heads when fine-tuning (model.init_from) --------------------------------------


def _start(source: str, heads: str, seed: int = 0) -> Bert:
    """What the trainer does: the pretrained config with the run's heads, a model built under
    the run's seed, the weights loaded."""
    config, state_dict = pretrained_config(source, ModelConfig(family="bert"), VOCAB,
                                           **HEADS.get(heads, {}))
    torch.manual_seed(seed)
    model = Bert(config)
    load_pretrained_weights(model, state_dict, source)
    return model


def _fresh(config: BertConfig, seed: int = 0) -> Bert:
    torch.manual_seed(seed)
    return Bert(config)


def _same(a: torch.nn.Module, b: torch.nn.Module, prefix: str = "") -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    keys = [k for k in sa if k.startswith(prefix)]
    return bool(keys) and all(torch.equal(sa[k], sb[k]) for k in keys)


def _body_equal(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    heads = ("head.", "pooler.", "nsp_head.", "classifier.")
    sa, sb = a.state_dict(), b.state_dict()
    return all(torch.equal(v, sb[k]) for k, v in sa.items() if not k.startswith(heads))


def test_a_masked_lm_becomes_a_classifier_with_a_new_pooler_and_classifier(
        tokenizer_path: Path, tmp_path: Path) -> None:
    mlm = _randomize(Bert(BASE), seed=7)
    model = _start(str(_checkpoint(tmp_path, mlm, tokenizer_path)), "cls")
    assert model.config == _config("cls", attn_impl="auto")
    assert _body_equal(model, mlm)
    fresh = _fresh(model.config)  # the family's init, under the run's seed
    assert _same(model, fresh, "pooler.") and _same(model, fresh, "classifier.")
    assert not model.classifier.bias.any()
    assert model.classifier.weight.std().item() == pytest.approx(0.02, rel=0.25)


def test_an_nsp_pretrainer_becomes_a_classifier_keeping_its_pooler(tokenizer_path: Path,
                                                                   tmp_path: Path) -> None:
    nsp = _randomize(Bert(_config("nsp")), seed=8)
    model = _start(str(_checkpoint(tmp_path, nsp, tokenizer_path)), "cls")
    assert _body_equal(model, nsp) and _same(model, nsp, "pooler.")
    assert _same(model, _fresh(model.config), "classifier.")


def test_a_classifier_with_the_same_classes_keeps_everything(tokenizer_path: Path,
                                                             tmp_path: Path) -> None:
    cls = _randomize(Bert(_config("cls")), seed=9)
    model = _start(str(_checkpoint(tmp_path, cls, tokenizer_path)), "cls").eval()
    assert _same(model, cls)
    batch = _batch(pairs=True)
    assert torch.equal(model(**batch), cls(**batch))


def test_another_number_of_classes_gets_a_new_classifier(tokenizer_path: Path,
                                                         tmp_path: Path) -> None:
    cls = _randomize(Bert(_config("cls")), seed=10)
    source = str(_checkpoint(tmp_path, cls, tokenizer_path))
    config, state_dict = pretrained_config(source, ModelConfig(family="bert"), VOCAB,
                                           num_labels=5)
    model = _fresh(config)
    load_pretrained_weights(model, state_dict, source)
    assert model.classifier.weight.shape == (5, 64)
    assert _same(model, cls, "pooler.") and _same(model, _fresh(config), "classifier.")


def test_a_classifier_continues_as_a_masked_lm_with_a_new_mlm_head(tokenizer_path: Path,
                                                                   tmp_path: Path) -> None:
    cls = _randomize(Bert(_config("cls")), seed=11)
    model = _start(str(_checkpoint(tmp_path, cls, tokenizer_path)), "mlm")
    assert not hasattr(model, "pooler") and not hasattr(model, "classifier")
    assert model.head.decoder.weight is model.tok_emb.weight  # still tied, to the loaded table
    assert torch.equal(model.tok_emb.weight, cls.tok_emb.weight)
    assert _same(model, _fresh(model.config), "head.dense.")


@pytest.mark.parametrize("change, message", [
    ("drop", ("model.init_from=ckpt: the weights have no blocks.1.ln_2.bias \\(only task "
              "heads may be missing\\)")),
    ("add", ("model.init_from=ckpt: the weights have blocks.2.ln_1.weight, which the model "
             "has not")),
    ("reshape", ("model.init_from=ckpt: emb_ln.weight is \\(32,\\) in the weights, \\(64,\\) "
                 "in the model")),
])
def test_differences_outside_the_heads_are_errors_naming_the_key(change: str,
                                                                 message: str) -> None:
    state_dict = Bert(BASE).state_dict()
    if change == "drop":
        del state_dict["blocks.1.ln_2.bias"]
    elif change == "add":
        state_dict["blocks.2.ln_1.weight"] = torch.ones(64)
    else:
        state_dict["emb_ln.weight"] = torch.ones(32)
    with pytest.raises(ConfigError, match=message):
        load_pretrained_weights(Bert(_config("cls")), state_dict, "ckpt")


def test_a_checkpoint_of_another_family_is_a_one_line_error(tokenizer_path: Path,
                                                            tmp_path: Path) -> None:
    gpt = GPT(GPTConfig(n_layers=1, d_model=32, n_heads=2, d_ff=64, vocab_size=VOCAB,
                        max_seq_len=16))
    source = str(_checkpoint(tmp_path, gpt, tokenizer_path, family="gpt"))
    with pytest.raises(ConfigError) as err:
        pretrained_config(source, ModelConfig(family="bert"), VOCAB, num_labels=2)
    assert str(err.value) == (f"model.init_from={source} is a gpt model, but model.family=bert "
                              "and data.objective=cls needs a bert model; start from a bert "
                              "checkpoint")
    with pytest.raises(ConfigError, match="is a gpt model, but model.family=bert; set "
                                          "model.family=gpt$"):
        pretrained_config(source, ModelConfig(family="bert"), VOCAB)


@pytest.mark.parametrize("family", ["gpt", "llama", "t5"])
def test_task_heads_on_a_family_without_them_are_config_errors(family: str) -> None:
    config = resolve_model_config({"family": family, "size": None, "n_layers": 1, "d_model": 32,
                                   "n_heads": 2, "d_ff": 64, "max_seq_len": 16}, VOCAB)
    assert with_heads(config) is config  # no heads asked: unchanged
    with pytest.raises(ConfigError, match=f"data.objective=cls needs a model with a pooled "
                                          f"\\[CLS\\] head \\(model.family=bert\\); "
                                          f"model.family={family} has none"):
        with_heads(config, num_labels=2)
    with pytest.raises(ConfigError, match=f"data.nsp needs .*model.family={family} has none"):
        pretrained_config("unused", ModelConfig(family=family), VOCAB, nsp=True)


def test_a_resumed_fine_tune_reads_the_config_with_its_heads_only(tokenizer_path: Path,
                                                                  tmp_path: Path) -> None:
    source = str(_checkpoint(tmp_path, Bert(BASE), tokenizer_path))
    config, state_dict = pretrained_config(source, ModelConfig(family="bert"), VOCAB,
                                           weights=False, num_labels=4)
    assert state_dict is None and config.num_labels == 4
