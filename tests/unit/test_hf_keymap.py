"""The table-driven HF state-dict conversion: errors name the key, older spellings and ignored
buffers are read, and each adapter names (and strictly loads into) its transformers class."""

from __future__ import annotations

import pytest
import torch

from megatrain.errors import MegatrainError
from megatrain.models import GPT, GPTConfig, Llama, LlamaConfig
from megatrain.models.bert import Bert, BertConfig
from megatrain.models.bert.hf import BERT_ADAPTER
from megatrain.models.common.hf import HFAdapter, StateDict
from megatrain.models.gpt2.hf import GPT2_ADAPTER
from megatrain.models.llama.hf import LLAMA_ADAPTER
from megatrain.models.t5 import T5, T5Config
from megatrain.models.t5.hf import T5_ADAPTER

transformers = pytest.importorskip("transformers")

DIMS = {"n_layers": 2, "d_model": 32, "n_heads": 4, "d_ff": 64, "vocab_size": 50,
        "max_seq_len": 16}


def _models() -> dict[str, tuple[HFAdapter, torch.nn.Module]]:
    torch.manual_seed(0)
    return {
        "gpt2": (GPT2_ADAPTER, GPT(GPTConfig(**DIMS))),
        "llama": (LLAMA_ADAPTER, Llama(LlamaConfig(**DIMS, n_kv_heads=2))),
        "llama-tied": (LLAMA_ADAPTER, Llama(LlamaConfig(**DIMS, n_kv_heads=1,
                                                        tie_embeddings=True))),
        "bert": (BERT_ADAPTER, Bert(BertConfig(**DIMS))),
        "t5": (T5_ADAPTER, T5(T5Config(**DIMS, head_dim=8))),
    }


FAMILIES = list(_models())


def _converted(name: str) -> tuple[HFAdapter, torch.nn.Module, StateDict]:
    adapter, model = _models()[name]
    return adapter, model, adapter.state_dict_to_hf(model.state_dict())


@pytest.mark.parametrize("name", FAMILIES)
def test_unknown_names_are_errors_that_name_them(name: str) -> None:
    adapter, model, hf_sd = _converted(name)
    with pytest.raises(KeyError, match="not a megatrain .* parameter name: 'blocks.0.nope'"):
        adapter.state_dict_to_hf({**model.state_dict(), "blocks.0.nope": torch.zeros(1)})
    with pytest.raises(KeyError, match="not a Hugging Face .* parameter name: 'model.nope'"):
        adapter.state_dict_from_hf({**hf_sd, "model.nope": torch.zeros(1)})


@pytest.mark.parametrize("name, part", [
    ("llama", "model.layers.1.self_attn.k_proj.weight"),
    ("bert", "bert.encoder.layer.0.attention.self.value.bias"),
    ("t5", "decoder.block.1.layer.1.EncDecAttention.v.weight"),
])
def test_a_missing_part_of_a_fused_tensor_is_named(name: str, part: str) -> None:
    adapter, _, hf_sd = _converted(name)
    del hf_sd[part]
    with pytest.raises(KeyError, match=f"has no '{part}', a part of"):
        adapter.state_dict_from_hf(hf_sd)


@pytest.mark.parametrize("name, source", [("gpt2", "transformer.wte.weight"),
                                          ("bert", "bert.embeddings.word_embeddings.weight")])
def test_a_missing_source_of_a_tied_head_is_named(name: str, source: str) -> None:
    adapter, model, hf_sd = _converted(name)
    del hf_sd[source]
    with pytest.raises(KeyError, match=f"has no '{source}'"):
        adapter.state_dict_from_hf(hf_sd)
    with pytest.raises(KeyError, match="has no 'tok_emb.weight'"):
        adapter.state_dict_to_hf({k: v for k, v in model.state_dict().items()
                                  if k != "tok_emb.weight"})


def test_gpt2_model_names_and_old_buffers_are_read() -> None:
    """GPT2Model (and the original GPT-2 files) have no ``transformer.`` prefix and no head; old
    transformers saved causal-mask buffers."""
    _, model, hf_sd = _converted("gpt2")
    bare = {k.removeprefix("transformer."): v for k, v in hf_sd.items() if k != "lm_head.weight"}
    bare["h.0.attn.bias"] = bare["h.0.attn.masked_bias"] = torch.ones(1)
    back = GPT2_ADAPTER.state_dict_from_hf(bare)
    assert back.keys() == model.state_dict().keys()
    assert back["lm_head.weight"] is back["tok_emb.weight"]


def test_aliased_and_fallback_names_come_back_from_any_one() -> None:
    _, model, hf_sd = _converted("t5")
    for alias in ("shared.weight", "encoder.embed_tokens.weight", "lm_head.weight"):
        del hf_sd[alias]
    back = T5_ADAPTER.state_dict_from_hf(hf_sd)
    assert torch.equal(back["tok_emb.weight"], model.tok_emb.weight)
    assert torch.equal(back["lm_head.weight"], back["tok_emb.weight"])


@pytest.mark.parametrize("name", FAMILIES)
def test_the_hf_config_names_the_architecture_which_loads_the_weights(name: str) -> None:
    adapter, model, hf_sd = _converted(name)
    hf_config = adapter.hf_config(model.config)
    assert hf_config.architectures == [adapter.architecture]
    assert hf_config.model_type == adapter.model_type
    adapter.check_loads(hf_config, hf_sd)


def test_weights_the_architecture_would_not_take_are_named() -> None:
    adapter, model, hf_sd = _converted("llama")
    hf_sd["model.layers.0.mlp.up_proj.weight"] = hf_sd.pop("model.layers.0.mlp.down_proj.weight")
    with pytest.raises(MegatrainError, match="do not load into LlamaForCausalLM: .*Missing .*"
                                             "model.layers.0.mlp.down_proj.weight"):
        adapter.check_loads(adapter.hf_config(model.config), hf_sd)
