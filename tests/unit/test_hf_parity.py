"""Every registered family against its ``transformers`` class: the same logits both ways (with
padding in the batch, on every CPU attention backend), exact state-dict round trips, the same
greedy tokens, parameter counts of every named size, and ``megatrain-export`` folders that
transformers loads. Parametrized over the registry: a new family gets all of it by being
registered. Family-specific checks (T5's buckets, BERT's TensorFlow names, published sizes) stay
in the family's own test module."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch import nn

from megatrain.cli.export import main as export_main
from megatrain.data.prepare.train_tokenizer import train_tokenizer
from megatrain.data.tokenizer import load_tokenizer
from megatrain.models import generate
from megatrain.models.registry import MODEL_SPECS, load_hf_pretrained, resolve_model_config
from megatrain.models.spec import ModelSpec
from tests.unit.checkpoints import write_stage0_checkpoint

transformers = pytest.importorskip("transformers")

FAMILIES = sorted(f for f, spec in MODEL_SPECS.items() if spec.hf is not None)
VOCAB = 101
# Small dims every family takes; the rest (Llama's grouped heads, T5's head_dim and decoder
# stack) come from the family's smallest named size.
DIMS = {"n_layers": 2, "d_model": 64, "n_heads": 4, "d_ff": 128, "vocab_size": VOCAB,
        "max_seq_len": 64}


def _smallest_size(spec: ModelSpec) -> str:
    return min(spec.sizes, key=lambda s: spec.sizes[s]["n_layers"] * spec.sizes[s]["d_model"])


def _config(family: str, **changes: object) -> object:
    spec = MODEL_SPECS[family]
    return resolve_model_config({"family": family, "size": _smallest_size(spec), **DIMS,
                                 **changes}, VOCAB)


def _variants() -> Iterator[tuple[str, bool | None]]:
    """(family, tie_embeddings): both ways for families whose head can be tied or not."""
    for family in FAMILIES:
        fields = {f.name for f in dataclasses.fields(MODEL_SPECS[family].config_cls)}
        yield from ([(family, False), (family, True)] if "tie_embeddings" in fields
                    else [(family, None)])


VARIANTS = list(_variants())


def _variant_id(variant: tuple[str, bool | None]) -> str:
    family, tie = variant
    return family if tie is None else f"{family}-{'tied' if tie else 'untied'}"


def _variant_config(variant: tuple[str, bool | None], **changes: object) -> object:
    family, tie = variant
    return _config(family, **changes, **({} if tie is None else {"tie_embeddings": tie}))


@torch.no_grad()
def _randomize(model: nn.Module, seed: int) -> None:
    """Every parameter random and sizeable (init sets norms to 1 and biases to 0, which would
    hide a swapped norm or bias): norm gains near 1, matrices scaled by their width, biases
    small. Works on megatrain's and Hugging Face's modules alike."""
    g = torch.Generator().manual_seed(seed)
    for module in model.modules():
        is_norm = "Norm" in type(module).__name__
        for name, p in module.named_parameters(recurse=False):
            noise = torch.randn(p.shape, generator=g)
            if is_norm and name == "weight":
                p.copy_(1.0 + 0.2 * noise)
            else:
                p.copy_(noise / p.shape[-1] ** 0.5 if p.dim() == 2 else 0.1 * noise)


def _param_name(model: nn.Module, module: nn.Module) -> str:
    return next(n for n, m in model.named_modules() if m is module) + ".weight"


def _has_own_head(spec: ModelSpec, config: object) -> bool:
    """Whether the family's model has an output head of its own (not the input embedding):
    the converted state dict holds two different tensors for the two names."""
    model = spec.build(config, "meta", torch.float32)
    with torch.device("meta"):
        hf = _hf_class(spec)(spec.hf.hf_config(config))
    hf_sd = spec.hf.state_dict_to_hf(model.state_dict(keep_vars=True))  # tied: one object
    out, inp = hf.get_output_embeddings(), hf.get_input_embeddings()
    return hf_sd[_param_name(hf, out)] is not hf_sd[_param_name(hf, inp)]


def _tie_like(hf: nn.Module, own_head: bool) -> None:
    """transformers 5 builds some classes tied whatever the config says (T5) and others untied
    although the config ties them (Llama; it ties or unties when loading a checkpoint): make the
    head what the converted model's is, as a checkpoint would."""
    out, inp = hf.get_output_embeddings(), hf.get_input_embeddings()
    if own_head and out.weight is inp.weight:
        out.weight = nn.Parameter(out.weight.detach().clone())
        getattr(hf, "all_tied_weights_keys", {}).pop(_param_name(hf, out), None)
    elif not own_head:
        out.weight = inp.weight


def _hf_class(spec: ModelSpec) -> type:
    return getattr(transformers, spec.hf.architecture)


def _hf_model(spec: ModelSpec, config: object, seed: int) -> nn.Module:
    hf = _hf_class(spec)._from_config(spec.hf.hf_config(config), attn_implementation="eager")
    _tie_like(hf, _has_own_head(spec, config))
    _randomize(hf, seed)
    return hf.eval()


def _padding_mask(B: int, T: int) -> torch.Tensor:
    """Row 0 full, row 1 right-padded, row 2 left-padded (1 = token, 0 = padding)."""
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, T - T // 3:] = 0
    mask[2, :T // 4] = 0
    return mask


def _batch(spec: ModelSpec, T: int = 24) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """A batch as both libraries take it, and the mask of the positions whose logits count.
    An encoder–decoder (span corruption) gets a decoder side, padded on both ends too."""
    g, B = torch.Generator().manual_seed(1), 3
    batch = {"input_ids": torch.randint(0, VOCAB, (B, T), generator=g),
             "attention_mask": _padding_mask(B, T)}
    if spec.objective != "span":
        return batch, batch["attention_mask"]
    batch["decoder_input_ids"] = torch.randint(0, VOCAB, (B, T // 2), generator=g)
    batch["decoder_attention_mask"] = _padding_mask(B, T // 2)
    return batch, batch["decoder_attention_mask"]


def _assert_same_logits(actual: torch.Tensor, expected: torch.Tensor,
                        real: torch.Tensor) -> None:
    real = real.bool()
    assert (actual[real] - expected[real]).abs().max().item() <= 1e-4
    assert expected[real].abs().max() > 0.3  # not trivially small (T5's tied head scales by 1/√d)


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("variant", VARIANTS, ids=_variant_id)
@torch.no_grad()
def test_hf_to_megatrain_logits_match_with_padding(variant: tuple[str, bool | None],
                                                   impl: str) -> None:
    spec = MODEL_SPECS[variant[0]]
    hf = _hf_model(spec, _variant_config(variant), seed=0)
    config = dataclasses.replace(spec.hf.config_from_hf(hf.config), attn_impl=impl)
    model = spec.build(config, "cpu", torch.float32).eval()
    model.load_state_dict(spec.hf.state_dict_from_hf(hf.state_dict()), strict=True)
    batch, real = _batch(spec)
    _assert_same_logits(model(**batch), hf(**batch).logits, real)


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("variant", VARIANTS, ids=_variant_id)
@torch.no_grad()
def test_megatrain_to_hf_logits_match_with_padding(variant: tuple[str, bool | None],
                                                   impl: str) -> None:
    spec = MODEL_SPECS[variant[0]]
    model = spec.build(_variant_config(variant, attn_impl=impl), "cpu", torch.float32).eval()
    _randomize(model, seed=2)
    hf = _hf_model(spec, model.config, seed=5)
    hf.load_state_dict(spec.hf.state_dict_to_hf(model.state_dict()), strict=True)
    tied = hf.get_output_embeddings().weight is hf.get_input_embeddings().weight
    assert tied != _has_own_head(spec, model.config)
    batch, real = _batch(spec)
    _assert_same_logits(hf(**batch).logits, model(**batch), real)


@pytest.mark.parametrize("family", FAMILIES)
@torch.no_grad()
def test_padding_changes_nothing_at_real_positions(family: str) -> None:
    """So the parity above is not both models equally ignoring the masks: padded tokens do not
    move the logits at real positions, and without the mask they would."""
    spec = MODEL_SPECS[family]
    model = spec.build(_config(family), "cpu", torch.float32).eval()
    _randomize(model, seed=3)
    batch, real = _batch(spec)
    changed = {k: v.clone() for k, v in batch.items()}
    for ids, mask in (("input_ids", "attention_mask"),
                      ("decoder_input_ids", "decoder_attention_mask")):
        if ids in changed:
            changed[ids][changed[mask] == 0] += 1
            changed[ids] %= VOCAB
    real = real.bool()
    torch.testing.assert_close(model(**changed)[real], model(**batch)[real], atol=1e-5, rtol=0)
    unmasked = {k: v for k, v in changed.items() if "attention_mask" not in k}
    assert (model(**unmasked)[real] - model(**batch)[real]).abs().max() > 1e-2


@pytest.mark.parametrize("variant", VARIANTS, ids=_variant_id)
def test_config_and_state_dict_round_trip_exactly(variant: tuple[str, bool | None]) -> None:
    spec = MODEL_SPECS[variant[0]]
    config = _variant_config(variant)
    assert spec.hf.config_from_hf(spec.hf.hf_config(config)) == dataclasses.replace(
        config, attn_impl="auto")
    sd = spec.build(config, "cpu", torch.float32).state_dict()
    hf_sd = spec.hf.state_dict_to_hf(sd)
    spec.hf.check_loads(spec.hf.hf_config(config), hf_sd)  # strict: names and shapes
    back = spec.hf.state_dict_from_hf(hf_sd)
    assert back.keys() == sd.keys()
    assert all(torch.equal(back[k], sd[k]) for k in sd)


@pytest.mark.parametrize("family", [f for f in FAMILIES if MODEL_SPECS[f].generates])
@torch.no_grad()
def test_greedy_generation_matches_hf(family: str) -> None:
    spec = MODEL_SPECS[family]
    hf = _hf_model(spec, _config(family), seed=3)
    model = spec.build(spec.hf.config_from_hf(hf.config), "cpu", torch.float32).eval()
    model.load_state_dict(spec.hf.state_dict_from_hf(hf.state_dict()))
    batch, _ = _batch(spec, T=9)
    if spec.objective == "span":  # an encoder–decoder: the prompt is the encoder's input
        prompt, mask = batch["input_ids"], batch["attention_mask"]
        full = hf.generate(input_ids=prompt, attention_mask=mask, do_sample=False,
                           num_beams=1, max_new_tokens=12, min_new_tokens=12)
        assert (full[:, 0] == model.config.decoder_start_id).all()
        expected = full[:, 1:]  # transformers keeps the start token
        actual = generate(model, prompt, 12, temperature=0.0, attention_mask=mask)
    else:
        prompt = batch["input_ids"]
        expected = hf.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                               max_new_tokens=12, min_new_tokens=12, pad_token_id=0)
        actual = generate(model, prompt, 12, temperature=0.0)
    assert torch.equal(actual, expected)
    assert len(actual[:, -12:].unique()) > 1  # not one token whatever the prompt


@pytest.mark.parametrize("family, size", [(f, s) for f in FAMILIES for s in MODEL_SPECS[f].sizes])
def test_every_size_builds_on_meta_with_hf_parameter_counts(family: str, size: str) -> None:
    spec = MODEL_SPECS[family]
    config = resolve_model_config({"family": family, "size": size}, 32_000)
    model = spec.build(config, "meta", torch.float32)
    assert all(p.device.type == "meta" for p in model.parameters())
    with torch.device("meta"):
        hf = _hf_class(spec)(spec.hf.hf_config(config))
    _tie_like(hf, _has_own_head(spec, config))
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in hf.parameters())


# --- through megatrain-export ---------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    corpus = Path(json.__file__).read_text()[:8000]  # a few KB of Python source
    return train_tokenizer([corpus], tmp_path_factory.mktemp("tok") / "tokenizer.model", 512)


@pytest.mark.parametrize("variant", VARIANTS, ids=_variant_id)
@torch.no_grad()
def test_export_loads_in_transformers_with_the_same_logits(
        variant: tuple[str, bool | None], tokenizer_path: Path, tmp_path: Path) -> None:
    """A checkpoint → ``megatrain-export`` → the family's transformers class loads the folder
    and gives the same logits, ``AutoTokenizer`` the same special-token ids, and
    ``load_hf_pretrained`` reads back the same config and weights."""
    family = variant[0]
    spec = MODEL_SPECS[family]
    config = _variant_config(variant, vocab_size=512)
    model = spec.build(config, "cpu", torch.float32).eval()
    _randomize(model, seed=4)
    write_stage0_checkpoint(tmp_path / "run" / "checkpoints" / "step_7", family, model,
                            tokenizer_path)
    out = tmp_path / "hf"
    assert export_main(["--checkpoint", str(tmp_path / "run"), "--out", str(out)]) == 0

    hf = transformers.AutoConfig.from_pretrained(out).architectures
    assert hf == [spec.hf.architecture]
    hf = _hf_class(spec).from_pretrained(out, attn_implementation="eager").eval()
    batch, real = _batch(spec)
    _assert_same_logits(hf(**batch).logits, model(**batch), real)
    ours, theirs = load_tokenizer(tokenizer_path), transformers.AutoTokenizer.from_pretrained(out)
    for role in ("unk", "bos", "eos", "pad", "cls", "sep", "mask"):
        expected_id = getattr(ours, f"{role}_id")
        assert getattr(theirs, f"{role}_token_id") == (expected_id if expected_id >= 0 else None)
    back_family, back_config, state_dict = load_hf_pretrained(out)
    assert (back_family, back_config) == (family, dataclasses.replace(config, attn_impl="auto"))
    assert all(torch.equal(state_dict[k], v) for k, v in model.state_dict().items())
    assert state_dict.keys() == model.state_dict().keys()
