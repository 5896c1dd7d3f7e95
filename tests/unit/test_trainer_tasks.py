"""Which objective a run trains on: ``data.objective``, the corpus's task format and the model
family must agree, or the run stops before anything is built (``Trainer._task``)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from megatrain.config.schema import DataConfig
from megatrain.errors import ConfigError
from megatrain.models.registry import get_model_spec
from megatrain.training.trainer import Trainer


def _task(family: str, corpus_format: str | None, **data: object) -> str:
    task = {"format": corpus_format, "labels": ["a", "b"]} if corpus_format else None
    manifest = SimpleNamespace(task=task)
    cfg = SimpleNamespace(data=DataConfig(train="DATA", **data),
                          model=SimpleNamespace(family=family))
    trainer = SimpleNamespace(cfg=cfg, spec=get_model_spec(family), train_manifest=manifest,
                              eval_manifest=manifest)
    return Trainer._task(trainer)


@pytest.mark.parametrize(("family", "corpus", "expected"), [
    ("gpt", None, "clm"), ("bert", None, "mlm"), ("t5", None, "span"),
    ("gpt", "sft", "sft"), ("llama", "sft", "sft"), ("bert", "cls", "cls"),
    ("t5", "seq2seq", "seq2seq"),
])
def test_the_objective_follows_the_corpus_then_the_family(family: str, corpus: str | None,
                                                          expected: str) -> None:
    assert _task(family, corpus) == expected


@pytest.mark.parametrize(("family", "corpus", "data", "message"), [
    ("bert", "sft", {}, "data.objective=sft does not fit model.family=bert, which trains on mlm"),
    ("gpt", "cls", {}, "data.objective=cls does not fit model.family=gpt"),
    ("gpt", "sft", {"objective": "clm"},
     "data.train=DATA is sft task data .* data.objective=clm cannot train on it"),
    ("gpt", None, {"objective": "sft"},
     "data.objective=sft needs task data .* data.train=DATA is a pretraining corpus"),
    ("bert", "cls", {"nsp": "next"}, "data.nsp=next is a part of masked-LM pretraining"),
])
def test_objectives_that_do_not_fit_stop_the_run(family: str, corpus: str | None, data: dict,
                                                 message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        _task(family, corpus, **data)


def test_eval_data_of_another_kind_stops_the_run() -> None:
    cfg = SimpleNamespace(data=DataConfig(train="DATA", eval="EVAL"),
                          model=SimpleNamespace(family="gpt"))
    trainer = SimpleNamespace(cfg=cfg, spec=get_model_spec("gpt"),
                              train_manifest=SimpleNamespace(task={"format": "sft"}),
                              eval_manifest=SimpleNamespace(task=None))
    with pytest.raises(ConfigError, match="data.eval=EVAL is not the same kind of data as "
                                          "data.train=DATA \\(sft\\)"):
        Trainer._task(trainer)


def test_cls_eval_data_must_name_the_same_classes() -> None:
    cfg = SimpleNamespace(data=DataConfig(train="DATA", eval="EVAL"),
                          model=SimpleNamespace(family="bert"))
    trainer = SimpleNamespace(
        cfg=cfg, spec=get_model_spec("bert"),
        train_manifest=SimpleNamespace(task={"format": "cls", "labels": ["neg", "pos"]}),
        eval_manifest=SimpleNamespace(task={"format": "cls", "labels": ["neg", "neu", "pos"]}))
    with pytest.raises(ConfigError, match="data.eval=EVAL names its classes .*same --labels"):
        Trainer._task(trainer)
