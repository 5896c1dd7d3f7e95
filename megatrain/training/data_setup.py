"""From ``data.train`` / ``data.eval`` (paths or URLs) to prepared corpora (manifests),
preparing on first use, and how their shards are fetched."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from megatrain.config.schema import DataConfig
from megatrain.data.demo_tasks import DEMO_TASKS, write_demo_task
from megatrain.data.manifest import Manifest, sha256_file
from megatrain.data.prepare.pipeline import ensure_prepared, prepare_once
from megatrain.data.stream.shard_reader import ShardIO
from megatrain.data.tokenizer.files import find_tokenizer_file
from megatrain.distributed import World
from megatrain.errors import ConfigError

EMBEDDED_SOURCES = ("stdlib",)
DEMO_EVAL_FRACTION = 0.1
log = logging.getLogger("megatrain")


def cache_dir(data_cfg: DataConfig) -> Path:
    """Where corpora prepared on first use live: data.cache_dir, $MEGATRAIN_CACHE, ~/.cache."""
    if data_cfg.cache_dir:
        return Path(data_cfg.cache_dir)
    return Path(os.environ.get("MEGATRAIN_CACHE", Path.home() / ".cache" / "megatrain"))


def shard_io(data_cfg: DataConfig) -> ShardIO:
    """How this run fetches shards at URLs: ``data.retries``, ``data.shard_cache_gb``."""
    return ShardIO(retries=data_cfg.retries, cache_dir=str(cache_dir(data_cfg) / "shards"),
                   cache_bytes=int(data_cfg.shard_cache_gb * 1e9))


def init_tokenizer_file(init_from: str) -> Path:
    """The tokenizer file that ``model.init_from`` (a checkpoint, run folder or ``hf:``) holds."""
    from megatrain.training.checkpoint import resolve_checkpoint_path
    from megatrain.training.pretrained import HF_PREFIX, hf_directory

    if init_from.startswith(HF_PREFIX):
        return find_tokenizer_file(hf_directory(init_from.removeprefix(HF_PREFIX)))
    return find_tokenizer_file(resolve_checkpoint_path(Path(init_from)))


def tokenizer_matches(folder: Path, manifest: Manifest) -> bool:
    """Whether ``folder``'s tokenizer file (``tokenizer.model`` or ``tokenizer.json``) is the one
    ``manifest``'s data was prepared with (its sha256); True when the manifest names none."""
    expected = manifest.tokenizer.get("sha256")
    files = [folder / name for name in ("tokenizer.model", "tokenizer.json")]
    return not expected or any(f.is_file() and sha256_file(f) == expected for f in files)


def check_same_tokenizer(init_from: str, manifest: Manifest) -> None:
    """Stop a run whose ``model.init_from`` checkpoint was trained with another tokenizer than
    the corpus was prepared with: the model would silently read the wrong ids. A megatrain
    checkpoint carries its exact tokenizer file, so a different sha256 is a different tokenizer;
    a Hugging Face folder may hold an equivalent file in another format, so there it is a
    warning."""
    if not manifest.tokenizer.get("sha256") or tokenizer_matches(
            init_tokenizer_file(init_from).parent, manifest):
        return
    message = (f"model.init_from={init_from} was trained with another tokenizer than "
               f"data.train={manifest.root} was prepared with; prepare the data with "
               f"megatrain-prepare --tokenizer {init_from.removeprefix('hf:')}")
    if init_from.startswith("hf:"):
        log.warning("%s (the files differ; fine only if they are the same vocabulary)", message)
        return
    raise ConfigError(message)


def _demo_task(name: str, data_cfg: DataConfig, init_from: str | None, workers: int) -> Path:
    """A task of ``megatrain.data.demo_tasks``, prepared on first use with the tokenizer of the
    model it fine-tunes (``model.init_from``; else the ``stdlib`` corpus's)."""
    root = cache_dir(data_cfg)
    tokenizer = init_tokenizer_file(init_from) if init_from else find_tokenizer_file(
        ensure_prepared("stdlib", root, data_cfg.vocab_size, workers=workers))
    rows = write_demo_task(name, root / "demo-tasks" / f"{name}.jsonl")
    out = root / f"{name}-tok{sha256_file(tokenizer)[:12]}"
    return prepare_once(str(rows), out, tokenizer=str(tokenizer), format=DEMO_TASKS[name],
                        eval_fraction=DEMO_EVAL_FRACTION, workers=workers, progress=False)


def _load(source: str, data_cfg: DataConfig, workers: int,
          init_from: str | None = None) -> Manifest:
    if source in EMBEDDED_SOURCES:
        folder = ensure_prepared(source, cache_dir(data_cfg), data_cfg.vocab_size, workers=workers)
        return Manifest.load(folder)
    if source in DEMO_TASKS:
        return Manifest.load(_demo_task(source, data_cfg, init_from, workers))
    manifest = Manifest.load(source)
    if manifest.is_remote:
        manifest.fetch_tokenizer(cache_dir(data_cfg))
    manifest.check_files()
    return manifest


def resolve_corpus(data_cfg: DataConfig, world: World,
                   init_from: str | None = None) -> tuple[Manifest, Manifest]:
    """(train, eval) manifests; eval defaults to the train folder's eval shards.

    Every rank calls this: a corpus prepared on first use is guarded by a file lock, so one
    process prepares while the others wait and then reuse it.
    """
    workers = max(1, min(os.cpu_count() or 1, 8))
    train = _load(data_cfg.train, data_cfg, workers, init_from)
    evaluation = _load(data_cfg.eval, data_cfg, workers, init_from) if data_cfg.eval else train
    return train, evaluation


def resolve_train_data(data_cfg: DataConfig, world: World, init_from: str | None = None
                       ) -> tuple[list | None, Manifest, Manifest]:
    """(mixture sources or None, train manifest, eval manifest). With ``data.mixture`` the first
    source's manifest gives the tokenizer and, unless ``data.eval`` is set, the eval shards.
    ``init_from`` (``model.init_from``) gives the tokenizer of a demo task prepared on first use."""
    if not data_cfg.mixture:
        return None, *resolve_corpus(data_cfg, world, init_from)
    from megatrain.data.stream.mixture import build_sources, parse_mixture

    workers = max(1, min(os.cpu_count() or 1, 8))
    entries = parse_mixture(data_cfg.mixture)
    sources, manifests = build_sources(entries, lambda path: _load(path, data_cfg, workers))
    evaluation = _load(data_cfg.eval, data_cfg, workers) if data_cfg.eval else manifests[0]
    return sources, manifests[0], evaluation
