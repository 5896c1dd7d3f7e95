"""BERT: sizes, masks, pre-LN, and parity with Hugging Face's BertForMaskedLM both ways (direct and
through megatrain-export), with padding in the batch."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

from megatrain.cli.export import main as export_main
from megatrain.config.schema import ModelConfig
from megatrain.data.prepare.train_tokenizer import train_tokenizer
from megatrain.errors import ConfigError
from megatrain.models import build_model, get_model_spec, resolve_model_config
from megatrain.models.bert import Bert, BertConfig, PostNormBlock, bert_flops_per_token
from megatrain.models.bert.hf import (
    bert_config_from_hf,
    bert_config_to_hf,
    state_dict_from_hf,
    state_dict_to_hf,
)
from megatrain.models.common.heads import load_fitted
from megatrain.models.common.layers import Block
from megatrain.training.transforms import apply_transforms
from tests.unit.checkpoints import write_stage0_checkpoint

transformers = pytest.importorskip("transformers")

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "model"
SIZES = ["bert-tiny", "bert-base", "bert-large"]
# Non-default eps and type_vocab_size, so a dropped one shows.
CONFIG = BertConfig(n_layers=3, d_model=64, n_heads=4, d_ff=160, vocab_size=101, max_seq_len=32,
                    type_vocab_size=3, norm_eps=1e-6, attn_impl="sdpa")
DOCS = torch.tensor([[0] * 5 + [1] * 7 + [2] * 4, [3] * 16])  # (2, 16): 3 documents, then 1


def _config(**changes: object) -> BertConfig:
    return dataclasses.replace(CONFIG, **changes)


def _ids(B: int = 3, T: int = 24, vocab: int = CONFIG.vocab_size) -> torch.Tensor:
    return torch.randint(0, vocab, (B, T), generator=torch.Generator().manual_seed(1))


def _padding(B: int = 3, T: int = 24) -> torch.Tensor:
    """(B, T) 1/0: row 0 full, row 1 right-padded by 9, row 2 left-padded by 5."""
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, T - 9:] = 0
    mask[2, :5] = 0
    return mask


@torch.no_grad()
def _randomize(model: torch.nn.Module, seed: int) -> None:
    """Every parameter random and sizeable (init zeroes biases and sets LayerNorms to 1/0, which
    would hide a mixed-up bias or LayerNorm); 1-D weights are LayerNorm gains, kept near 1."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        noise = torch.randn(p.shape, generator=g) * 0.1
        p.copy_(1.0 + noise if p.dim() == 1 and name.endswith("weight") else noise)


def _hf_model(config: BertConfig = CONFIG) -> transformers.BertForMaskedLM:
    model = transformers.BertForMaskedLM._from_config(bert_config_to_hf(config),
                                                      attn_implementation="eager")
    _randomize(model, seed=0)
    return model.eval()


def _max_diff_at_tokens(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> float:
    real = mask.bool()
    return (a[real] - b[real]).abs().max().item()


# --- sizes, registry, config ----------------------------------------------------------------

@pytest.mark.parametrize("size", SIZES)
def test_every_size_builds_on_meta_with_hf_param_counts(size: str) -> None:
    model, spec, config = build_model({"family": "bert", "size": size}, 30522, device="meta")
    assert spec.family == "bert" and spec.objective == "mlm" and spec.hf.model_type == "bert"
    assert len(model.blocks) == config.n_layers and model.config is config
    assert all(isinstance(b, PostNormBlock) for b in model.blocks)
    assert model.num_params(non_embedding=False) == config.num_params(non_embedding=False)
    assert model.num_params() == config.num_params()
    with torch.device("meta"):
        hf = transformers.BertForMaskedLM(bert_config_to_hf(config))
    assert model.num_params(non_embedding=False) == sum(p.numel() for p in hf.parameters())


def test_bert_base_is_110m() -> None:
    model, _, config = build_model({"family": "bert", "size": "bert-base"}, 30522, device="meta")
    assert (config.n_layers, config.d_model, config.n_heads, config.d_ff) == (12, 768, 12, 3072)
    assert model.num_params(non_embedding=False) == 109_514_298  # BertForMaskedLM, no pooler
    large, _, _ = build_model({"family": "bert", "size": "bert-large"}, 30522, device="meta")
    assert large.num_params(non_embedding=False) == 335_174_458


def test_every_size_has_a_yaml() -> None:
    shipped = sorted(p.stem for p in CONFIGS.glob("bert-*.yaml"))
    assert shipped == sorted(get_model_spec("bert").sizes)
    for name in shipped:
        cfg = yaml.safe_load((CONFIGS / f"{name}.yaml").read_text())
        assert cfg == {"family": "bert", "size": name}


def test_schema_norm_position_reaches_the_model() -> None:
    cfg = ModelConfig(family="bert", size="bert-tiny", norm_position="pre", attn_impl="eager")
    model, _, config = build_model(cfg, 100)
    assert config.norm_position == "pre" and config.norm_eps == 1e-12
    assert all(isinstance(b, Block) for b in model.blocks)
    assert isinstance(model.emb_ln, torch.nn.Identity) and isinstance(model.ln_f,
                                                                      torch.nn.LayerNorm)
    assert resolve_model_config({**cfg.__dict__, "norm_position": None}, 100).norm_position \
        == "post"


@pytest.mark.parametrize("override, message", [
    ({"norm_position": "sandwich"},
     "model.norm_position=sandwich is not a norm position; valid: post, pre"),
    ({"type_vocab_size": 0}, "type_vocab_size=0 must be a positive integer"),
    ({"n_heads": 5}, "not divisible"),
    ({"dropout": 1.5}, r"model.dropout=1.5 must be in \[0, 1\)"),
    ({"n_kv_heads": 2}, "model.n_kv_heads is not a setting of the bert family"),
    ({"rope_theta": 1e4}, "model.rope_theta is not a setting of the bert family"),
])
def test_bad_bert_configs_are_config_errors(override: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        resolve_model_config({"family": "bert", "size": "bert-tiny", **override}, 100)


def test_unknown_size_lists_the_bert_sizes() -> None:
    with pytest.raises(ConfigError, match="valid: bert-tiny, bert-base, bert-large"):
        resolve_model_config({"family": "bert", "size": "bert-huge"}, 100)


def test_num_params_and_flops_by_hand() -> None:
    # d=64, ff=160, L=3, V=101: per block (64·192+192) + (64·64+64) + 2·64 + (64·160+160)
    # + (160·64+64) + 2·64 = 37600; head 64·64+64 + 2·64 + 101 = 4389;
    # N = 101·64 (tied) + 2·64 (emb_ln) + 3·37600 + 4389 = 123781 (positions, types excluded)
    n = 123_781
    assert CONFIG.num_params() == n
    assert CONFIG.num_params(non_embedding=False) == n + (32 + 3) * 64
    assert Bert(CONFIG).num_params() == n
    assert bert_flops_per_token(CONFIG, 32) == 6 * n + 12 * 3 * 64 * 32
    assert get_model_spec("bert").flops_per_token(CONFIG, 32) == 6 * n + 12 * 3 * 64 * 32


def test_init_as_hf_bert() -> None:
    torch.manual_seed(0)
    model = Bert(_config(n_layers=4, d_model=256, d_ff=1024))
    assert model.head.decoder.weight is model.tok_emb.weight
    qkv = torch.cat([b.attn.qkv.weight.flatten() for b in model.blocks])
    proj = torch.cat([b.mlp.proj.weight.flatten() for b in model.blocks])
    for weights in (qkv, proj, model.pos_emb.weight):
        assert weights.std().item() == pytest.approx(0.02, rel=0.03)  # no residual scaling
    biases = [b.attn.qkv.bias for b in model.blocks] + [model.head.decoder.bias]
    assert all((b == 0).all() for b in biases)
    assert (model.emb_ln.weight == 1).all() and (model.blocks[0].ln_2.bias == 0).all()


def test_build_in_bf16_on_the_requested_backend() -> None:
    model = Bert(_config(attn_impl="eager"), dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model.attn_impl == "eager" and model.blocks[0].attn.attn_impl == "eager"
    assert not model.blocks[0].attn.causal
    assert Bert(_config(attn_impl="auto")).attn_impl == "sdpa"  # CPU


def test_too_long_input_is_an_error() -> None:
    with pytest.raises(ValueError, match="exceeds max_seq_len=32"):
        Bert(CONFIG)(torch.zeros(1, 33, dtype=torch.long))


# --- behaviour ------------------------------------------------------------------------------

def test_attention_is_bidirectional() -> None:
    torch.manual_seed(0)
    model = Bert(CONFIG).eval()
    ids = _ids(2, 12)
    changed = ids.clone()
    changed[:, 10] = (changed[:, 10] + 1) % CONFIG.vocab_size
    assert (model(ids)[:, :10] - model(changed)[:, :10]).abs().max() > 1e-4


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_padding_does_not_change_real_positions(impl: str) -> None:
    torch.manual_seed(0)
    model = Bert(_config(attn_impl=impl)).eval()
    _randomize(model, seed=3)
    ids = _ids(1, 20)
    padded = torch.cat([ids, _ids(1, 6, vocab=7)], dim=1)  # 6 junk tokens after the text
    mask = torch.cat([torch.ones(1, 20), torch.zeros(1, 6)], dim=1).long()
    out = model(padded, attention_mask=mask)
    torch.testing.assert_close(out[:, :20], model(ids), atol=2e-5, rtol=0)
    assert (model(padded)[:, :20] - out[:, :20]).abs().max() > 1e-3  # unmasked: it would leak


@pytest.mark.parametrize("impl", ["sdpa", "eager"])  # flex cannot be built on CPU
@pytest.mark.parametrize("with_padding", [False, True])
def test_document_masking_equals_each_document_alone(impl: str, with_padding: bool) -> None:
    torch.manual_seed(0)
    model = Bert(_config(attn_impl=impl)).eval()
    _randomize(model, seed=4)
    ids = _ids(2, 16)
    mask = torch.ones(2, 16, dtype=torch.long)
    if with_padding:
        mask[1, 12:] = 0  # the single document of row 1 ends in padding
    packed = model(ids, attention_mask=mask if with_padding else None, doc_ids=DOCS)
    for row in range(2):
        for doc in DOCS[row].unique():
            cols = ((DOCS[row] == doc) & mask[row].bool()).nonzero().squeeze(1)
            alone = model(ids[row:row + 1, cols])
            torch.testing.assert_close(packed[row, cols], alone[0], atol=2e-5, rtol=0)
    whole = model(ids)
    assert (whole[0, :5] - packed[0, :5]).abs().max() > 1e-3  # the documents did see each other


def test_token_type_ids_default_to_segment_zero() -> None:
    torch.manual_seed(0)
    model = Bert(CONFIG).eval()
    _randomize(model, seed=5)
    ids = _ids()
    torch.testing.assert_close(model(ids), model(ids, token_type_ids=torch.zeros_like(ids)))
    assert (model(ids, token_type_ids=torch.ones_like(ids)) - model(ids)).abs().max() > 1e-3


def _mlm_batch(B: int = 4, T: int = 24) -> tuple[torch.Tensor, torch.Tensor]:
    """input ids and labels that are -100 except at a few "masked" positions."""
    ids = _ids(B, T)
    labels = torch.full_like(ids, -100)
    picked = torch.rand(B, T, generator=torch.Generator().manual_seed(2)) < 0.3
    labels[picked] = ids[picked]
    inputs = ids.masked_fill(picked, 0)  # 0 stands in for [MASK]
    return inputs, labels


def _mlm_loss(model: torch.nn.Module, inputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    logits = model(inputs)
    return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)


@pytest.mark.parametrize("norm_position", ["pre", "post"])
def test_trains_on_the_mlm_objective(norm_position: str) -> None:
    torch.manual_seed(0)
    model = Bert(_config(norm_position=norm_position, dropout=0.1))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    inputs, labels = _mlm_batch()
    losses = []
    for _ in range(8):
        loss = _mlm_loss(model, inputs, labels)
        opt.zero_grad()
        loss.backward()
        assert all(p.grad is not None and torch.isfinite(p.grad).all()
                   for p in model.parameters())
        opt.step()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(torch.log(torch.tensor(101.0)).item(), abs=0.3)
    assert losses[-1] < losses[0] - 1.0


def test_activation_checkpointing_gives_the_same_gradients() -> None:
    torch.manual_seed(0)
    plain = Bert(CONFIG)
    wrapped = Bert(CONFIG)
    wrapped.load_state_dict(plain.state_dict())
    apply_transforms(wrapped, activation_checkpointing=True, compile=False)
    inputs, labels = _mlm_batch()
    for model in (plain, wrapped):
        _mlm_loss(model, inputs, labels).backward()
    for (name, a), b in zip(plain.named_parameters(), wrapped.parameters()):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-6, rtol=0, msg=name)


# --- parity with transformers ---------------------------------------------------------------

def test_config_round_trips() -> None:
    hf = bert_config_to_hf(_config(dropout=0.1))
    assert (hf.num_hidden_layers, hf.hidden_size, hf.intermediate_size, hf.type_vocab_size,
            hf.layer_norm_eps, hf.hidden_act, hf.tie_word_embeddings) == (
        3, 64, 160, 3, 1e-6, "gelu", True)
    assert bert_config_from_hf(hf) == _config(dropout=0.1, attn_impl="auto")


def test_pre_ln_cannot_become_bert_for_masked_lm() -> None:
    pre = _config(norm_position="pre")
    with pytest.raises(ConfigError, match="norm_position=pre cannot be exported to "
                                          "BertForMaskedLM: Hugging Face's BERT is post-Layer"):
        bert_config_to_hf(pre)
    with pytest.raises(ConfigError, match="norm_position=pre cannot be exported"):
        state_dict_to_hf(Bert(pre).state_dict())


@pytest.mark.parametrize("change, message", [
    ({"hidden_act": "gelu_new"}, "activation gelu_new is not exact GELU"),
    ({"is_decoder": True}, "as a decoder"),
    ({"tie_word_embeddings": False}, "untied"),
])
def test_unsupported_hf_variants_are_refused(change: dict, message: str) -> None:
    hf = bert_config_to_hf(CONFIG)
    for key, value in change.items():
        setattr(hf, key, value)
    with pytest.raises(ValueError, match=message):
        bert_config_from_hf(hf)


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_hf_to_megatrain_logits_match_with_padding(impl: str) -> None:
    hf = _hf_model()
    config = dataclasses.replace(bert_config_from_hf(hf.config), attn_impl=impl)
    model = Bert(config).eval()
    model.load_state_dict(state_dict_from_hf(hf.state_dict()), strict=True)
    ids, mask = _ids(), _padding()
    expected = hf(ids, attention_mask=mask).logits
    assert _max_diff_at_tokens(model(ids, attention_mask=mask), expected, mask) <= 1e-4
    assert expected.abs().max() > 1.0  # not trivially small logits
    types = torch.randint(0, 3, ids.shape, generator=torch.Generator().manual_seed(6))
    expected = hf(ids, attention_mask=mask, token_type_ids=types).logits
    actual = model(ids, attention_mask=mask, token_type_ids=types)
    assert _max_diff_at_tokens(actual, expected, mask) <= 1e-4


def test_hf_bert_for_pretraining_weights_load() -> None:
    """A BertForPreTraining checkpoint (how Google's BERTs ship) has a pooler and an NSP head
    besides the MLM head; a plain masked LM leaves those out."""
    hf = transformers.BertForPreTraining._from_config(bert_config_to_hf(CONFIG),
                                                      attn_implementation="eager")
    _randomize(hf, seed=7)
    model = Bert(CONFIG).eval()
    assert load_fitted(model, state_dict_from_hf(hf.state_dict()), "test") == []
    ids, mask = _ids(), _padding()
    expected = hf.eval()(ids, attention_mask=mask).prediction_logits
    assert _max_diff_at_tokens(model(ids, attention_mask=mask), expected, mask) <= 1e-4


def test_tensorflow_layernorm_names_are_read() -> None:
    hf_sd = {k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias",
                                                                       "LayerNorm.beta"): v
             for k, v in state_dict_to_hf(Bert(CONFIG).state_dict()).items()}
    assert "bert.embeddings.LayerNorm.gamma" in hf_sd
    Bert(CONFIG).load_state_dict(state_dict_from_hf(hf_sd), strict=True)


# --- megatrain-export -----------------------------------------------------------------------

CORPUS = Path(json.__file__).read_text()[:8000]
VOCAB = 512


@pytest.fixture(scope="module")
def tokenizer_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_tokenizer([CORPUS], tmp_path_factory.mktemp("tok") / "tokenizer.model", VOCAB)


def test_export_of_pre_ln_is_a_one_line_config_error(
    tokenizer_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = Bert(BertConfig(n_layers=1, d_model=32, n_heads=2, d_ff=64, vocab_size=VOCAB,
                            max_seq_len=16, norm_position="pre"))
    write_stage0_checkpoint(tmp_path / "run" / "checkpoints" / "step_3", "bert", model,
                            tokenizer_path)
    assert export_main(["--checkpoint", str(tmp_path / "run"), "--out",
                        str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: model.norm_position=pre cannot be exported")
    assert err.count("\n") == 1
    assert not (tmp_path / "hf" / "model.safetensors").exists()
