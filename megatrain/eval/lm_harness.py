"""lm-evaluation-harness tasks on a megatrain model (``megatrain-eval --task lm-eval:T1,T2``).

Two backends give the same numbers (tests/unit/test_lm_harness.py):

- ``native``: :func:`adapter_class`, an ``lm_eval`` ``TemplateLM`` registered as ``megatrain``,
  scores and generates with megatrain's own model (gpt and llama): ``loglikelihood`` in batches
  (right padding, the context cropped from the left to the model's ``max_seq_len`` so the
  continuation is kept, as ``HFLM`` crops), ``loglikelihood_rolling`` over lm-eval's disjoint
  windows, and ``generate_until`` through :func:`megatrain.models.generation.generate_text`
  (KV cache, left-padded batches, stop strings);
- ``hf``: lm-eval's own ``HFLM`` on the folder :func:`megatrain.hf_export.export` writes (a
  temporary one; an ``hf:DIR`` source is used as it is), which also runs T5.

Tasks come from local files: ``include_path`` names a folder of task YAMLs (only those are
indexed; without it lm-eval's built-in tasks are, which takes half a minute), e.g. a
multiple-choice task over a local JSONL::

    task: my_mc
    dataset_path: json
    dataset_kwargs: {data_files: {test: /data/mc.jsonl}}
    test_split: test
    output_type: multiple_choice
    doc_to_text: "Question: {{question}}\\nAnswer:"
    doc_to_choice: choices
    doc_to_target: gold
    metric_list: [{metric: acc}, {metric: acc_norm}]

Nothing is fetched from a hub: the harness runs with ``HF_HUB_OFFLINE`` and
``HF_DATASETS_OFFLINE`` set (a built-in task works only if its dataset is already cached).
``lm_eval`` is imported only when a harness run starts (it is heavy), and its absence is a
one-line message naming the ``megatrain[lmeval]`` extra.
"""

from __future__ import annotations

import functools
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from megatrain.data.manifest import sha256_file
from megatrain.errors import ConfigError

EXTRA = 'pip install "megatrain[lmeval]"'
MODEL_NAME = "megatrain"
BACKENDS = ("native", "hf")
NATIVE_FAMILIES = ("gpt", "llama")
HF_FAMILIES = ("gpt", "llama", "t5")
OFFLINE = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
DEFAULT_MAX_GEN_TOKS = 256  # HFLM's

Request = tuple[Any, list[int], list[int]]
"""What ``TemplateLM._loglikelihood_tokens`` takes: (request strings or None, context ids,
continuation ids)."""


def _lm_eval() -> Any:
    """The ``lm_eval`` package, or a ConfigError naming the extra that installs it."""
    try:
        import lm_eval
        import lm_eval.api.model  # the adapter's base class
    except ImportError as exc:
        raise ConfigError(f"lm-eval tasks need lm-evaluation-harness: {EXTRA}") from exc
    return lm_eval


_FLAGS = (("huggingface_hub.constants", "HF_HUB_OFFLINE"), ("datasets.config", "HF_HUB_OFFLINE"),
          ("datasets.config", "HF_DATASETS_OFFLINE"))
"""Where ``huggingface_hub`` and ``datasets`` keep what they read from the environment at
import."""


@contextmanager
def offline() -> Iterator[None]:
    """No hub access inside: ``HF_HUB_OFFLINE`` / ``HF_DATASETS_OFFLINE`` set in the environment
    (for what imports here) and in the flags of ``huggingface_hub`` / ``datasets`` (imported
    already); afterwards the environment is put back and the flags follow it again."""
    env = {name: os.environ.get(name) for name in OFFLINE}
    os.environ.update(dict.fromkeys(OFFLINE, "1"))
    _set_flags(lambda attr: True)
    try:
        yield
    finally:
        for name, value in env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        _set_flags(lambda attr: os.environ.get(attr, "").upper() in {"1", "ON", "YES", "TRUE"})


def _set_flags(value: Callable[[str], bool]) -> None:
    for module, attr in _FLAGS:
        loaded = sys.modules.get(module)
        if loaded is not None and hasattr(loaded, attr):
            setattr(loaded, attr, value(attr))


# --- the native adapter's pieces (pure functions: the class below only wires them) ------------


def crop(context: list[int], continuation: list[int], max_len: int) -> list[int]:
    """The model's input for scoring ``continuation`` after ``context``: the last ``max_len``
    tokens of both but the final one (so the continuation survives a long context)."""
    return (context + continuation)[-(max_len + 1):][:-1]


def score_batch(model: torch.nn.Module, rows: Sequence[tuple[list[int], list[int]]],
                max_len: int, device: torch.device) -> list[tuple[float, bool]]:
    """(sum of the continuation's log-probabilities, whether greedy decoding gives it) for each
    (context, continuation) row, in one right-padded forward pass (causal: padding on the right
    changes nothing before it)."""
    inputs = [crop(ctx, cont, max_len) for ctx, cont in rows]
    width = max(len(x) for x in inputs)
    ids = torch.zeros(len(inputs), width, dtype=torch.long, device=device)
    for i, x in enumerate(inputs):
        ids[i, :len(x)] = torch.tensor(x, dtype=torch.long)
    with torch.no_grad():
        logprobs = F.log_softmax(model(ids).float(), dim=-1)  # (B, T, V)
    out = []
    for i, ((_, cont), x) in enumerate(zip(rows, inputs, strict=True)):
        lp = logprobs[i, len(x) - len(cont):len(x)]  # (n, V): the positions predicting cont
        target = torch.tensor(cont, dtype=torch.long, device=device)
        picked = lp.gather(-1, target[:, None]).squeeze(-1)
        out.append((float(picked.sum()), bool((lp.argmax(-1) == target).all())))
    return out


def rolling_windows(tokens: list[int], prefix: int, max_len: int) -> list[tuple[list[int],
                                                                                list[int]]]:
    """lm-eval's disjoint windows that score every token of ``tokens`` once (the first after
    ``prefix``), as HFLM's ``loglikelihood_rolling`` makes them."""
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    return [make_disjoint_window(w) for w in get_rolling_token_windows(
        token_list=tokens, prefix_token=prefix, max_seq_len=max_len, context_len=1)]


def sampling_args(gen_kwargs: dict[str, Any]) -> dict[str, Any]:
    """A task's generation kwargs (after lm-eval's ``normalize_gen_kwargs``) as
    ``generate_text``'s: greedy unless ``do_sample``."""
    if not gen_kwargs.get("do_sample"):
        return {"temperature": 0.0}
    args = {"temperature": float(gen_kwargs.get("temperature", 1.0))}
    for name in ("top_k", "top_p", "repetition_penalty", "seed"):
        if gen_kwargs.get(name) is not None:
            args[name] = gen_kwargs[name]
    return args


def _batch_size(value: int | str | None) -> int:
    """lm-eval passes ``batch_size`` as given on its command line ("8", or "auto")."""
    if value in (None, "auto"):
        return 8
    try:
        size = int(value)
    except (TypeError, ValueError):
        raise ConfigError(f"lm-eval batch_size={value!r} must be a positive integer") from None
    if size < 1:
        raise ConfigError(f"lm-eval batch_size={value!r} must be a positive integer")
    return size


@functools.cache
def adapter_class() -> type:
    """The native adapter, ``lm_eval``'s model ``megatrain`` (built on first use, so importing
    this module does not import lm-eval)."""
    _lm_eval()
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import register_model
    from lm_eval.models.utils import Collator, handle_stop_sequences, normalize_gen_kwargs

    from megatrain.eval.model import load_eval_model
    from megatrain.models.generation import generate_text

    @register_model(MODEL_NAME)
    class MegatrainLM(TemplateLM):
        """A megatrain causal LM (gpt, llama) under lm-eval: ``checkpoint`` is a checkpoint,
        run folder or ``hf:DIR``, or ``loaded`` an :class:`~megatrain.eval.model.EvalModel`."""

        def __init__(self, checkpoint: str | None = None, batch_size: int | str | None = 8,
                     device: str | None = None, max_gen_toks: int = DEFAULT_MAX_GEN_TOKS,
                     loaded: Any = None, **_: Any) -> None:
            super().__init__()
            if loaded is None:
                if not checkpoint:
                    raise ConfigError("model megatrain needs checkpoint=PATH")
                loaded = load_eval_model(checkpoint, device or "cpu")
            _check_family(loaded.source, loaded.family, NATIVE_FAMILIES, "native")
            self.loaded, self.model, self.tok = loaded, loaded.model.eval(), loaded.tokenizer
            self.size, self.max_gen_toks = _batch_size(batch_size), int(max_gen_toks)

        @property
        def eot_token_id(self) -> int:
            return self.tok.eos_id

        @property
        def prefix_token_id(self) -> int:
            """What an empty context is (HFLM's choice: BOS, else EOS)."""
            return self.tok.bos_id if self.tok.bos_id >= 0 else self.tok.eos_id

        @property
        def max_length(self) -> int:
            return self.loaded.max_seq_len

        @property
        def device(self) -> torch.device:
            return self.loaded.device

        def tok_encode(self, string: str, add_special_tokens: bool | None = None,
                       **_: Any) -> list[int]:
            return self.tok.encode(string)

        def _loglikelihood_tokens(self, requests: list[Request], disable_tqdm: bool = False,
                                  **_: Any) -> list[tuple[float, bool]]:
            """Longest first (lm-eval's Collator), ``batch_size`` rows per forward pass."""
            order = Collator(requests, sort_fn=lambda r: (-len(r[1] + r[2]), tuple(r[1] + r[2])))
            out: list[tuple[float, bool]] = []
            for chunk in order.get_batched(n=self.size):
                scores = score_batch(self.model, [(r[1], r[2]) for r in chunk],
                                     self.max_length, self.device)
                for (key, _, _), answer in zip(chunk, scores, strict=True):
                    if key is not None:
                        self.cache_hook.add_partial("loglikelihood", key, answer)
                out.extend(scores)
            return order.get_original(out)

        def loglikelihood_rolling(self, requests: list, disable_tqdm: bool = False
                                  ) -> list[float]:
            """Each text's log-likelihood, summed over windows of at most ``max_length``."""
            windows, owners = [], []
            for i, (text,) in enumerate(r.args for r in requests):
                for ctx, cont in rolling_windows(self.tok_encode(text), self.prefix_token_id,
                                                 self.max_length):
                    windows.append((None, ctx, cont))
                    owners.append(i)
            totals = [0.0] * len(requests)
            for i, (ll, _) in zip(owners, self._loglikelihood_tokens(windows), strict=True):
                totals[i] += ll
            for request, total in zip(requests, totals, strict=True):
                self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
            return totals

        def generate_until(self, requests: list, disable_tqdm: bool = False) -> list[str]:
            """Requests grouped by their generation kwargs; each group through
            ``generate_text`` (contexts left-cropped to leave room for ``max_gen_toks``)."""
            groups: dict[str, list[int]] = {}
            for i, r in enumerate(requests):
                groups.setdefault(json.dumps(r.args[1], sort_keys=True, default=str),
                                  []).append(i)
            out = [""] * len(requests)
            for members in groups.values():
                contexts = [requests[i].args[0] for i in members]
                for i, text in zip(members, self._generate(contexts, requests[members[0]].args[1]),
                                   strict=True):
                    out[i] = text
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
            return out

        def _generate(self, contexts: list[str], gen_kwargs: dict[str, Any]) -> list[str]:
            kwargs = normalize_gen_kwargs(gen_kwargs, self.max_gen_toks)
            until = handle_stop_sequences(kwargs.pop("until", None),
                                          eos=self.tok.decode([self.eot_token_id]))
            new = int(kwargs.pop("max_gen_toks"))
            room = self.max_length - new
            if room < 1:
                raise ConfigError(f"lm-eval max_gen_toks={new} leaves no room for a prompt in "
                                  f"the model's {self.max_length}-token context")
            return generate_text(
                self.model, self.tok, contexts, max_new_tokens=new, batch_size=self.size,
                stop=until, encode=lambda s: self.tok_encode(s)[-room:] or [self.eot_token_id],
                **sampling_args(kwargs))

    return MegatrainLM


def _check_family(source: str, family: str, families: Sequence[str], backend: str) -> None:
    if family not in families:
        raise ConfigError(f"lm-eval's {backend} backend runs {', '.join(families)} models; "
                          f"{source} is a {family} model")


# --- a run ------------------------------------------------------------------------------------


def run_harness(checkpoint: str, tasks: Sequence[str], *, backend: str = "native",
                include_path: str | Path | None = None, limit: float | None = None,
                batch_size: int = 8, device: str | None = None, num_fewshot: int | None = None,
                log_samples: bool = False) -> dict[str, Any]:
    """Run lm-eval ``tasks`` on ``checkpoint`` (a checkpoint, run folder or ``hf:DIR``) through
    ``backend``; the result dict: what ran (checkpoint, backend, tasks, settings, the task data
    files' sha256, lm-eval's version) and lm-eval's per-task ``metrics`` (and its per-request
    ``samples`` with ``log_samples``)."""
    if backend not in BACKENDS:
        raise ConfigError(f"lm-eval backend {backend!r} is not one of {', '.join(BACKENDS)}")
    names = [t.strip() for t in tasks if t.strip()]
    if not names:
        raise ConfigError("lm-eval: no task named (--task lm-eval:TASK[,TASK...])")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    start = time.perf_counter()
    with offline():
        lm_eval = _lm_eval()
        manager = _task_manager(include_path, names)
        with _model(checkpoint, backend, batch_size, device) as lm:
            results = lm_eval.simple_evaluate(model=lm, tasks=names, task_manager=manager,
                                              limit=limit, num_fewshot=num_fewshot,
                                              log_samples=log_samples)
    result = {
        "task": "lm-eval:" + ",".join(names),
        "checkpoint": checkpoint,
        "backend": backend,
        "settings": {"tasks": names, "include_path": None if include_path is None
                     else str(include_path), "limit": limit, "batch_size": batch_size,
                     "num_fewshot": num_fewshot, "device": device},
        "data": {name: _data_files(results["configs"].get(name, {}))
                 for name in results["configs"]},
        "scorer": {"name": "lm-evaluation-harness", "version": lm_eval.__version__},
        "metrics": results["results"],
        "n-shot": results.get("n-shot", {}),
        "versions": results.get("versions", {}),
        "seconds": round(time.perf_counter() - start, 3),
    }
    if log_samples:
        result["samples"] = results["samples"]
    return result


def _task_manager(include_path: str | Path | None, names: list[str]) -> Any:
    """lm-eval's index of the tasks in ``include_path`` (or its built-in ones), checked to hold
    every name asked for."""
    from lm_eval.tasks import TaskManager

    if include_path is not None and not Path(include_path).is_dir():
        raise ConfigError(f"lm-eval --include-path {include_path} is not a folder")
    manager = TaskManager(include_path=None if include_path is None else str(include_path),
                          include_defaults=include_path is None)
    unknown = [n for n in names if not manager.match_tasks([n])]
    if unknown:
        where = f"in {include_path}" if include_path is not None else "among lm-eval's tasks"
        known = ", ".join(manager.all_tasks[:20]) if include_path is not None else ""
        raise ConfigError(f"lm-eval task {', '.join(unknown)} not found {where}"
                          + (f" (there: {known})" if known else ""))
    return manager


@contextmanager
def _model(checkpoint: str, backend: str, batch_size: int, device: str) -> Iterator[Any]:
    """The lm-eval model for ``backend``; the ``hf`` export lives as long as the run."""
    if backend == "native":
        yield adapter_class()(checkpoint, batch_size=batch_size, device=device)
        return
    from megatrain.training.pretrained import HF_PREFIX, hf_directory, load_pretrained

    family = load_pretrained(checkpoint, weights=False)[0]
    _check_family(checkpoint, family, HF_FAMILIES, "hf")
    if checkpoint.startswith(HF_PREFIX):
        yield hf_lm(hf_directory(checkpoint[len(HF_PREFIX):]), batch_size, device)
        return
    from megatrain.hf_export import export

    with tempfile.TemporaryDirectory(prefix="megatrain-lm-eval-") as tmp:
        yield hf_lm(export(checkpoint, Path(tmp) / "hf"), batch_size, device)


def hf_lm(folder: Path, batch_size: int, device: str) -> Any:
    """lm-eval's ``HFLM`` on a Hugging Face folder (fp32)."""
    _lm_eval()
    try:
        from lm_eval.models.huggingface import HFLM
    except ImportError as exc:  # accelerate, transformers: lm-eval's [hf] extra
        raise ConfigError(f"lm-eval's hf backend needs lm-eval[hf]: {EXTRA}") from exc
    return HFLM(pretrained=str(folder), batch_size=batch_size, device=device, dtype="float32")


def _data_files(config: dict[str, Any]) -> dict[str, str]:
    """sha256 of each local file a task's ``dataset_kwargs.data_files`` names."""
    files = (config.get("dataset_kwargs") or {}).get("data_files")
    paths = files.values() if isinstance(files, dict) else [files]
    flat = [p for group in paths for p in ([group] if isinstance(group, str) else group or [])]
    return {p: sha256_file(Path(p)) for p in flat if Path(p).is_file()}
