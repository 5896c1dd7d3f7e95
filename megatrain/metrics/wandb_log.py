"""Read back what W&B itself holds for a run: its transaction logs (``run-<id>.wandb``).

wandb-core writes every record of a run, offline or online, to a LevelDB-style log of 32 KiB
blocks in the run's folder, and ``wandb sync`` uploads exactly those records. The log is written
a block at a time: a killed process leaves only the records of its full blocks (a torn or
unflushed tail fails its checksum or length and ends the read). wandb 0.31 ships no Python
reader of these files (``wandb.sdk.internal.datastore`` is gone), hence this one; the records
are wandb's own protobufs (``wandb.proto.wandb_internal_pb2.Record``).
"""

from __future__ import annotations

import json
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

MAGIC = b":W&B"
HEADER = 7  # magic, version, and one byte
BLOCK = 32768
CHUNK = 7  # crc32 (of the type byte and the data), length (u16), type
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(path: Path) -> Iterator[Any]:
    """The protobuf records of one transaction log, up to the first torn or missing chunk."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    if data[:4] != MAGIC:
        return
    pos, parts = HEADER, b""
    while pos + CHUNK <= len(data):
        if BLOCK - pos % BLOCK < CHUNK:  # a block's tail too short for a chunk header: padding
            pos += BLOCK - pos % BLOCK
            continue
        crc, length, kind = struct.unpack("<IHB", data[pos:pos + CHUNK])
        body = data[pos + CHUNK:pos + CHUNK + length]
        if kind == 0 or len(body) < length or zlib.crc32(body, zlib.crc32(bytes([kind]))) != crc:
            return  # the end of what was written
        pos += CHUNK + length
        parts = body if kind in (FULL, FIRST) else parts + body
        if kind in (FULL, LAST):
            record = pb.Record()
            record.ParseFromString(parts)
            parts = b""
            yield record


def history(path: Path) -> list[dict[str, Any]]:
    """The history rows of one transaction log, as logged: ``{"_step": N, key: value, ...}``."""
    rows = []
    for record in records(path):
        if record.WhichOneof("record_type") == "history":
            row = {".".join(item.nested_key) or item.key: json.loads(item.value_json)
                   for item in record.history.item}
            row["_step"] = record.history.step.num
            rows.append(row)
    return rows


def run_logs(wandb_dir: Path, run_id: str, skip: Path | None = None) -> list[Path]:
    """Every transaction log of ``run_id`` under ``wandb_dir`` (one per attempt, offline and
    online), oldest first; ``skip``: a run folder to leave out (the attempt now running).

    An attempt's folder is ``[offline-]run-<date>_<time>-<id>``, with a ``-N`` suffix when a
    folder of that name exists already (the run started again within the same second)."""
    attempts = []
    for folder in wandb_dir.glob(f"*run-*-{run_id}*"):
        log = folder / f"run-{run_id}.wandb"
        if folder.is_symlink() or folder == skip or not log.is_file():  # latest-run: a link
            continue
        stamp, _, rest = folder.name.removeprefix("offline-").removeprefix("run-").partition("-")
        suffix = rest.removeprefix(run_id).removeprefix("-")
        if rest.startswith(run_id) and (suffix == "" or suffix.isdigit()):
            attempts.append(((stamp, int(suffix or 0)), log))
    return [log for _, log in sorted(attempts)]


def last_step(wandb_dir: Path, run_id: str, skip: Path | None = None) -> int:
    """The highest step any transaction log of ``run_id`` holds a history row for (0: none)."""
    return max((record.history.step.num for path in run_logs(wandb_dir, run_id, skip)
                for record in records(path) if record.WhichOneof("record_type") == "history"),
               default=0)


def run_history(wandb_dir: Path, run_id: str) -> list[dict[str, Any]]:
    """The history ``wandb sync`` would upload for ``run_id``: its logs' rows in order."""
    return [row for path in run_logs(wandb_dir, run_id) for row in history(path)]
