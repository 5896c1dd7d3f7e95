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


def test_a_checkpoint_trained_with_another_tokenizer_stops_the_run(tmp_path) -> None:
    """The corpus's tokenizer (its manifest's sha256) must be the one init_from was trained with:
    an error for a megatrain checkpoint, a warning for a Hugging Face folder."""
    import hashlib
    import logging

    from megatrain.training.data_setup import check_same_tokenizer

    for name in ("ckpt", "hf"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "tokenizer.json").write_text('{"model": "A"}')
        (tmp_path / name / "meta.json").write_text("{}")
    same = hashlib.sha256(b'{"model": "A"}').hexdigest()
    corpus = SimpleNamespace(tokenizer={"sha256": same}, root="DATA")
    check_same_tokenizer(str(tmp_path / "ckpt"), corpus)
    other = SimpleNamespace(tokenizer={"sha256": "0" * 64}, root="DATA")
    with pytest.raises(ConfigError, match="was trained with another tokenizer than data.train=DATA"):
        check_same_tokenizer(str(tmp_path / "ckpt"), other)
    logger = logging.getLogger("megatrain")
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    logger.addHandler(handler)
    try:
        check_same_tokenizer(f"hf:{tmp_path / 'hf'}", other)
    finally:
        logger.removeHandler(handler)
    assert any("another tokenizer" in r.getMessage() for r in records)
