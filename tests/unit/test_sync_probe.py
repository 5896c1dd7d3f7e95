"""tests/sync_probe.py's CPU counting: reads of the loader's batches are left out, and every
other read is counted — also of a tensor made after a batch was freed (which may take that
batch's id())."""

from __future__ import annotations

import torch

from tests.sync_probe import HostBatches, count_reads

CPU = torch.device("cpu")


def test_the_cpu_probe_counts_each_steps_read_but_not_the_batches() -> None:
    """Like train_step: take a batch, read it on the host (not counted), compute a loss from
    it and read the loss (an injected ``float(loss)``: counted, every step), drop the batch."""
    steps, host = 20, set()
    batches = HostBatches(({"labels": torch.full((2, 3), i)} for i in range(steps)), host, CPU)
    with count_reads(host, CPU) as reads:
        for _ in range(steps):
            batch = next(batches)
            batch["labels"].tolist()  # a host batch: not a read of the device
            loss = batch["labels"].float().mean()
            del batch
            float(loss)
            del loss
    assert len(reads) == steps and all(r.startswith("__float__ at ") for r in reads), reads
