"""Data pipeline benchmarks; results go to docs/benchmarks.md with the machine and date.

    python tools/bench_data.py prepare [--workers 1 2] [--inputs stdlib wds wds-http]
                                       [--vocab-size 8192] [--repeats 3]

``prepare``: megatrain-prepare's throughput on the stdlib corpus (the Python standard library's
source), for each worker count and input: the ``.py`` files themselves (``stdlib``), or the same
documents written beforehand with ``webdataset.ShardWriter`` as ``txt`` samples, read from local
disk (``wds``) or from a local HTTP server (``wds-http``). The tokenizer is trained once first and timed on its own row;
the throughput rows then prepare with that tokenizer, i.e. they measure what grows with the
corpus (read, clean, route, tokenize, write shards). CPU time is measured for the main process
and for the worker processes separately, so "per core" is measured rather than assumed and the
table says where the time goes. The best of ``--repeats`` runs is kept (shared machines are noisy;
the load average is printed with the results).

    python tools/bench_data.py stream [--workers 0 1 2] [--stores disk http s3] [--batches 1500]
                                      [--repeats 3] [--profile]

``stream``: one rank's training stream (CLM, packed, seq_len 1024, micro-batch 8) from shards of
the stdlib corpus, in tokens/s, for each store (local disk; the HTTP and S3 servers the tests use,
started here on 127.0.0.1: ``tests/servers.py``) and number of DataLoader workers (0:
in-process). Worker start-up and the first shard are not timed; ``--profile`` prints where the
in-process time goes.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import resource
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatrain.data.prepare.pipeline import ensure_prepared, prepare
from megatrain.data.prepare.sources import iter_documents
from megatrain.data.prepare.train_tokenizer import train_tokenizer


@dataclass
class Run:
    """One prepare: wall seconds, CPU seconds of the main process and of its workers."""

    source: str
    workers: int
    tokens: int
    wall: float
    main_cpu: float
    worker_cpu: float

    def row(self) -> str:
        rate = self.tokens / self.wall
        per_cpu = self.tokens / (self.main_cpu + self.worker_cpu)
        return (f"| {self.source} | {self.workers} | {self.tokens:,} | {self.wall:.2f} | "
                f"{rate / 1e6:.2f}M | "
                f"{rate / self.workers / 1e6:.2f}M | {self.main_cpu:.2f} | {self.worker_cpu:.2f} "
                f"| {per_cpu / 1e6:.2f}M |")


HEADER = ("| input | workers | tokens | wall s | tokens/s | tokens/s per worker | main CPU s | "
          "worker CPU s | tokens per CPU-s |\n|---|---|---|---|---|---|---|---|---|")


def _cpu() -> tuple[float, float]:
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime, kids.ru_utime + kids.ru_stime


def prepare_once(source: str, label: str, model: Path, out: Path, workers: int) -> Run:
    """Prepare ``source`` with the given tokenizer into a fresh ``out``; measure it."""
    shutil.rmtree(out, ignore_errors=True)
    main0, kids0 = _cpu()
    start = time.perf_counter()
    manifest = prepare(source, out, tokenizer=str(model), workers=workers, progress=False)
    wall = time.perf_counter() - start
    main1, kids1 = _cpu()
    tokens = manifest.stats["train_tokens"] + manifest.stats["eval_tokens"]
    return Run(label, workers, tokens, wall, main1 - main0, kids1 - kids0)


def write_wds(folder: Path, shard_bytes: int = 8 << 20) -> str:
    """The stdlib documents as WebDataset ``txt`` samples (``webdataset.ShardWriter``); the
    brace pattern of the shards."""
    import webdataset as wds

    folder.mkdir(parents=True)
    with wds.ShardWriter(str(folder / "stdlib-%06d.tar"), maxsize=shard_bytes,
                         verbose=0) as sink:
        for i, doc in enumerate(iter_documents("stdlib")):
            sink.write({"__key__": f"doc{i:07d}", "txt": doc.text})
        last = sink.shard - 1
    return str(folder / f"stdlib-{{000000..{last:06d}}}.tar")


@contextlib.contextmanager
def prepare_inputs(work: Path, inputs: list[str]) -> Iterator[dict[str, str]]:
    """Each benchmarked input's ``--source``; a local HTTP server serves the ``wds-http`` one."""
    sources = {"stdlib": "stdlib"}
    if {"wds", "wds-http"} & set(inputs):
        sources["wds"] = write_wds(work / "wds")
    if "wds-http" not in inputs:
        yield sources
        return
    from tests.servers import http_server

    server = http_server(work).start()
    try:
        yield sources | {"wds-http": f"http://127.0.0.1:{server.port}/wds/"
                                     + Path(sources["wds"]).name}
    finally:
        server.stop()


def bench_prepare(args: argparse.Namespace) -> None:
    work = Path(tempfile.mkdtemp(prefix="bench_prepare_"))
    try:
        start = time.perf_counter()
        texts = (doc.text for doc in iter_documents("stdlib"))
        model = train_tokenizer(texts, work / "tokenizer.model", args.vocab_size,
                                threads=max(args.workers), max_sentences=args.tokenizer_sample)
        trained = time.perf_counter() - start
        runs = []
        with prepare_inputs(work, args.inputs) as sources:
            for label in args.inputs:
                for workers in args.workers:
                    best = min((prepare_once(sources[label], label, model, work / "out", workers)
                                for _ in range(args.repeats)), key=lambda r: r.wall)
                    runs.append(best)
                    print(f"{label} workers={workers}: {best.tokens / best.wall:,.0f} tokens/s",
                          file=sys.stderr)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    _report(args, trained, runs)


def _report(args: argparse.Namespace, trained: float, runs: list[Run]) -> None:
    print(f"\nmachine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
          f"load average {os.getloadavg()[0]:.2f}; python {platform.python_version()}; "
          f"{time.strftime('%Y-%m-%d')}")
    print(f"command: python tools/bench_data.py prepare --workers "
          f"{' '.join(map(str, args.workers))} --inputs {' '.join(args.inputs)} "
          f"--vocab-size {args.vocab_size} "
          f"--repeats {args.repeats}")
    print(f"tokenizer: BPE {args.vocab_size}, trained on {args.tokenizer_sample:,} sampled lines "
          f"in {trained:.1f}s (once; not in the rows below)\n")
    print(HEADER)
    for run in runs:
        print(run.row())


# --- stream throughput ----------------------------------------------------------------------


def stream_once(data: str, workers: int, batches: int, seq_len: int, micro_batch: int) -> float:
    """Tokens/s of one rank's training stream (CLM, packed) with ``workers`` loader workers; the
    first batch (worker start-up, first shard) is not timed."""
    from megatrain.data.manifest import Manifest
    from megatrain.data.stream.train_stream import build_train_stream

    stream = build_train_stream(Manifest.load(data), seq_len=seq_len, micro_batch_size=micro_batch,
                                seed=0, rank=0, world_size=1, num_workers=workers)
    batches_iter = iter(stream)
    next(batches_iter)
    tokens, start = 0, time.perf_counter()
    for _ in range(batches):
        tokens += next(batches_iter)["input_ids"].numel()
    wall = time.perf_counter() - start
    batches_iter.close()
    return tokens / wall


@contextlib.contextmanager
def served(data: Path, store: str) -> Iterator[str]:
    """The prepared folder ``data`` as ``store`` serves it: its path, or its URL on a local HTTP
    or S3 server started for the benchmark."""
    if store == "disk":
        yield str(data)
        return
    from tests.servers import http_server, s3_environment, s3_server, upload_folder

    server = (http_server(data.parent) if store == "http" else s3_server()).start()
    try:
        if store == "http":
            yield f"http://127.0.0.1:{server.port}/{data.name}"
            return
        with s3_environment(server.port):
            upload_folder(data, "s3://bench/corpus")
            yield "s3://bench/corpus"
    finally:
        server.stop()


def bench_stream(args: argparse.Namespace) -> None:
    folder = Path(args.data) if args.data else ensure_prepared(
        "stdlib", Path(tempfile.gettempdir()) / "megatrain_bench", args.vocab_size,
        workers=2, progress=False)
    if args.profile:
        import cProfile
        import pstats

        cProfile.runctx("stream_once(data, 0, args.batches, args.seq_len, args.micro_batch)",
                        globals(), {"data": str(folder), "args": args}, "/tmp/bench_stream.prof")
        pstats.Stats("/tmp/bench_stream.prof").sort_stats("tottime").print_stats(15)
    rows = []
    for store in args.stores:
        with served(folder, store) as data:
            for workers in args.workers:
                rate = max(stream_once(data, workers, args.batches, args.seq_len,
                                       args.micro_batch) for _ in range(args.repeats))
                rows.append(f"| {store} | {workers} | {args.seq_len} | {args.micro_batch} | "
                            f"{args.batches} | {rate / 1e6:.1f}M |")
                print(f"{store} workers={workers}: {rate:,.0f} tokens/s", file=sys.stderr)
    print(f"\nmachine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
          f"load average {os.getloadavg()[0]:.2f}; {time.strftime('%Y-%m-%d')}; corpus {folder}")
    print(f"command: python tools/bench_data.py stream --workers "
          f"{' '.join(map(str, args.workers))} --stores {' '.join(args.stores)} "
          f"--batches {args.batches} --repeats {args.repeats}")
    print("\n| store | loader workers | seq_len | micro-batch | batches timed | tokens/s (best) |"
          "\n|---|---|---|---|---|---|")
    print("\n".join(rows))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="what", required=True)
    prep = sub.add_parser("prepare", help="megatrain-prepare throughput on the stdlib corpus")
    prep.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    prep.add_argument("--inputs", nargs="+", choices=("stdlib", "wds", "wds-http"),
                      default=["stdlib"])
    prep.add_argument("--vocab-size", type=int, default=8192)
    prep.add_argument("--tokenizer-sample", type=int, default=300_000)
    prep.add_argument("--repeats", type=int, default=3)
    prep.set_defaults(run=bench_prepare)
    stream = sub.add_parser("stream", help="training stream throughput from local shards")
    stream.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    stream.add_argument("--stores", nargs="+", choices=("disk", "http", "s3"),
                        default=["disk", "http", "s3"])
    stream.add_argument("--data", help="a prepared folder (default: stdlib, prepared once)")
    stream.add_argument("--vocab-size", type=int, default=8192)
    stream.add_argument("--seq-len", type=int, default=1024)
    stream.add_argument("--micro-batch", type=int, default=8)
    stream.add_argument("--batches", type=int, default=1500)
    stream.add_argument("--repeats", type=int, default=3)
    stream.add_argument("--profile", action="store_true", help="cProfile the in-process stream")
    stream.set_defaults(run=bench_stream)
    args = parser.parse_args(argv)
    args.run(args)


if __name__ == "__main__":
    main()
