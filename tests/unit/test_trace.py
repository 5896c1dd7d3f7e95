"""data.trace files: one line per step; a resume drops what the interrupted run wrote after
its checkpoint, for its own rank and (rank 0) for ranks the new world no longer has."""

from __future__ import annotations

from pathlib import Path

from megatrain.data.stream.trace import TraceWriter, read_traces


def test_a_resume_drops_lines_past_the_resumed_step(tmp_path: Path) -> None:
    for rank in range(3):
        writer = TraceWriter(tmp_path, rank, 3, 0)
        for step in range(1, 6):
            writer.write(step, [f"r{rank}s{step}"], [0])
        writer.close()
    TraceWriter(tmp_path, 1, 2, 3).close()  # a 2-rank resume at step 3: rank 1 ...
    assert [line["step"] for line in read_traces(tmp_path)[1]] == [1, 2, 3]
    assert len(read_traces(tmp_path)[2]) == 5  # ... leaves rank 2's file to rank 0
    writer = TraceWriter(tmp_path, 0, 2, 3)
    writer.write(4, ["again"], [0])
    writer.close()
    traces = read_traces(tmp_path)
    assert [line["step"] for line in traces[0]] == [1, 2, 3, 4]
    assert traces[0][-1] == {"step": 4, "keys": ["again"], "epochs": [0]}
    assert [line["step"] for line in traces[2]] == [1, 2, 3]
