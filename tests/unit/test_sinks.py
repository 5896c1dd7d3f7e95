import json
from dataclasses import replace
from pathlib import Path

import pytest

from megatrain.config.schema import Config
from megatrain.metrics import wandb_log
from megatrain.metrics.sinks import JsonlSink, MetricSinks, ResumePoint, build_sinks
from megatrain.metrics.wandb_sink import resolve_mode


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _log_steps(sink: JsonlSink | MetricSinks, steps: range, scale: float = 1.0) -> None:
    for step in steps:
        sink.log({"step": step, "loss": scale / step})


def test_jsonl_resume_moves_the_rows_after_the_checkpoint_aside(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    sink = JsonlSink(path, None)
    _log_steps(sink, range(1, 4))
    sink.log({"step": 3, "eval_loss": 9.0})
    at_3 = sink.rows  # the checkpoint of step 3 is saved here
    _log_steps(sink, range(4, 6))
    sink.close()
    sink = JsonlSink(path, ResumePoint(3, at_3))  # died after step 5; resumes at step 3
    sink.log({"step": 4, "loss": 0.0})
    sink.go_back(ResumePoint(3, at_3), "rollback")  # step 4 spiked: back to step 3 again
    sink.log({"step": 4, "loss": 0.5})
    sink.close()
    assert [(r["step"], r.get("loss")) for r in _rows(path)] == [
        (1, 1.0), (2, 0.5), (3, 1 / 3), (3, None), (4, 0.5)]
    aside = [(r["step"], r["timeline"], r["rewound_to"], r["reason"])
             for r in _rows(tmp_path / "metrics.abandoned.jsonl")]
    assert aside == [(4, 1, 3, "resume"), (5, 1, 3, "resume"), (4, 2, 3, "rollback")]


def test_jsonl_from_an_older_checkpoint_goes_back_by_step(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    sink = JsonlSink(path, None)
    _log_steps(sink, range(1, 6))
    sink.close()
    JsonlSink(path, ResumePoint(2)).close()  # a checkpoint that did not count its rows
    assert [r["step"] for r in _rows(path)] == [1, 2]
    JsonlSink(path, None).close()  # run.resume=never in the same folder: everything moves aside
    assert not _rows(path) and {r["reason"] for r in _rows(path.with_name(
        "metrics.abandoned.jsonl"))} == {"resume", "restart"}


def test_a_torn_last_line_is_dropped_on_resume(tmp_path: Path) -> None:
    """A crash mid-write leaves the last row torn: the resume drops it (the checkpoint never
    counted it) instead of failing, and the next row starts on a line of its own."""
    path = tmp_path / "metrics.jsonl"
    sink = JsonlSink(path, None)
    _log_steps(sink, range(1, 4))
    at_3 = sink.rows
    sink.close()
    with path.open("a") as f:
        f.write('{"step": 4, "lo')  # killed mid-write
    for resume in (ResumePoint(3, at_3), ResumePoint(3)):  # counted rows, or by step
        sink = JsonlSink(path, resume)
        assert sink.rows == 3
        sink.log({"step": 4, "loss": 0.25})
        sink.close()
        assert [(r["step"], r["loss"]) for r in _rows(path)] == [
            (1, 1.0), (2, 0.5), (3, 1 / 3), (4, 0.25)]
        path.write_text(path.read_text().removesuffix('{"step": 4, "loss": 0.25}\n') +
                        '{"step": 4, "lo')
    assert not path.with_name("metrics.abandoned.jsonl").exists()


def test_wandb_auto_mode_is_offline_without_a_key(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert resolve_mode("auto") == "offline"
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert resolve_mode("auto") == "online"
    assert resolve_mode("disabled") == "disabled"


# --- W&B, offline, read back from its own transaction logs ----------------------------------

@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> Config:
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = Config()
    cfg.logger.wandb.mode, cfg.logger.progress = "offline", False
    return cfg


def _close(sinks: MetricSinks) -> None:
    """Close, and wait until wandb-core has written its transaction log (``finish`` returns
    before it has; a process's exit waits for it)."""
    import wandb

    sinks.close()
    wandb.teardown()


def _saved(sinks: MetricSinks, step: int) -> ResumePoint:
    """What a checkpoint saved now at ``step`` records of the metrics."""
    return ResumePoint.from_state({"progress": {"step": step}, **sinks.state()})


def _wandb_steps(run_dir: Path, run_id: str) -> list[tuple[int, float | None]]:
    return [(r["_step"], r.get("loss")) for r in wandb_log.run_history(run_dir / "wandb", run_id)]


def _jsonl_steps(run_dir: Path) -> list[tuple[int, float | None]]:
    return [(r["step"], r.get("loss")) for r in _rows(run_dir / "metrics.jsonl")]


def test_wandb_gets_rows_once_a_checkpoint_covers_them_and_never_a_rolled_back_step(
        offline: Config, tmp_path: Path) -> None:
    sinks = build_sinks(offline, tmp_path, None, {})
    _log_steps(sinks, range(1, 5))
    saved = _saved(sinks, 4)  # the checkpoint of step 4
    sinks.commit()
    _log_steps(sinks, range(5, 8), scale=20.0)  # step 7 spikes: back to step 4
    sinks.go_back(saved, "rollback")
    _log_steps(sinks, range(5, 9))
    sinks.commit()  # the run completes
    run_id = sinks.wandb_run_id
    _close(sinks)
    want = [(s, 1.0 / s) for s in range(1, 9)]
    assert _jsonl_steps(tmp_path) == want
    assert _wandb_steps(tmp_path, run_id) == want


def test_a_resume_sends_what_wandb_lost_and_forks_when_wandb_is_ahead(
        offline: Config, tmp_path: Path) -> None:
    sinks = build_sinks(offline, tmp_path, None, {})
    _log_steps(sinks, range(1, 4))
    at_3 = _saved(sinks, 3)
    sinks.commit()
    _log_steps(sinks, range(4, 7))
    at_6 = _saved(sinks, 6)
    sinks.commit()
    _log_steps(sinks, range(7, 9))  # after the last checkpoint: held back, then "killed"
    run_id = sinks.wandb_run_id
    _close(sinks)
    logs = wandb_log.run_logs(tmp_path / "wandb", run_id)
    assert [r["_step"] for r in wandb_log.history(logs[0])] == list(range(1, 7))
    data, cut = logs[0].read_bytes(), None
    while len(wandb_log.history(logs[0])) > 4:  # a killed wandb-core lost its last blocks
        cut = (cut or len(data)) - 16
        logs[0].write_bytes(data[:cut])

    sinks = build_sinks(offline, tmp_path, at_6, {})  # crash-resume from the last checkpoint
    assert sinks.wandb_run_id == run_id  # the same run, the lost steps sent again
    _log_steps(sinks, range(7, 9))
    sinks.commit()
    _close(sinks)
    assert _wandb_steps(tmp_path, run_id) == _jsonl_steps(tmp_path) == [
        (s, 1.0 / s) for s in range(1, 9)]

    sinks = build_sinks(offline, tmp_path, at_3, {})  # resume from an older checkpoint
    fork = sinks.wandb_run_id
    _log_steps(sinks, range(4, 6), scale=2.0)
    sinks.commit()
    _close(sinks)
    assert fork != run_id
    want = [*((s, 1.0 / s) for s in range(1, 4)), (4, 0.5), (5, 0.4)]
    assert _wandb_steps(tmp_path, fork) == _jsonl_steps(tmp_path) == want
    assert _wandb_steps(tmp_path, run_id)[-1][0] == 8  # the old run is left as it was


def test_the_reader_stops_at_a_torn_or_corrupt_chunk(offline: Config, tmp_path: Path) -> None:
    sinks = build_sinks(offline, tmp_path, None, {})
    _log_steps(sinks, range(1, 2000))
    sinks.commit()
    run_id = sinks.wandb_run_id
    _close(sinks)
    (path,) = wandb_log.run_logs(tmp_path / "wandb", run_id)
    data = path.read_bytes()
    assert [r["_step"] for r in wandb_log.history(path)] == list(range(1, 2000))
    path.write_bytes(data[:40000])  # a block and a bit: whole records only
    steps = [r["_step"] for r in wandb_log.history(path)]
    assert steps == list(range(1, len(steps) + 1)) and 10 < len(steps) < 1999
    path.write_bytes(data[:20000] + bytes([data[20000] ^ 1]) + data[20001:])
    assert len(wandb_log.history(path)) < len(steps)


class _ServerRun:
    """A W&B run as an online resume leaves it: the server holds steps up to 7."""

    def __init__(self, folder: Path) -> None:
        self.id, self.dir, self.starting_step = "abc", str(folder / "files"), 8
        self.sent: list[int] = []

    def log(self, values: dict, step: int) -> None:
        self.sent.append(step)


def test_online_the_server_says_what_wandb_holds(tmp_path: Path) -> None:
    """Online, a resume also asks the server: it resumes the run after its last step (no server
    here, so the run is a stand-in with ``starting_step``); only the steps it lacks are sent."""
    from megatrain.metrics.wandb_sink import WandbSink

    sink = WandbSink(Config().logger.wandb, "online", tmp_path, "run", {})
    sink.run = _ServerRun(tmp_path / "wandb" / "run-20260101_000000-abc")
    sink.through = sink._held_by_wandb()
    assert sink.through == 7
    sink.go_back(10, [{"step": s, "loss": 1.0} for s in range(1, 13)])  # resumed at step 10
    sink.log({"step": 11, "loss": 2.0})
    assert sink.run.sent == [8, 9, 10]  # 11 waits for the next checkpoint
    sink.commit()
    assert sink.run.sent == [8, 9, 10, 11]


def test_from_another_folders_checkpoint_the_history_forks(offline: Config,
                                                           tmp_path: Path) -> None:
    """``run.resume=<another run's checkpoint>``: that folder keeps its rows and its W&B run;
    this one starts after the checkpoint's step, in a W&B run forked from it."""
    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir()
    second.mkdir()
    sinks = build_sinks(offline, first, None, {})
    _log_steps(sinks, range(1, 5))
    saved = _saved(sinks, 4)
    sinks.commit()
    _close(sinks)
    sinks = build_sinks(offline, second, replace(saved, elsewhere=True), {})
    _log_steps(sinks, range(5, 7))
    sinks.commit()
    fork = sinks.wandb_run_id
    _close(sinks)
    assert fork != saved.wandb_run_id
    assert _wandb_steps(second, fork) == _jsonl_steps(second) == [(5, 0.2), (6, 1 / 6)]
    (log,) = wandb_log.run_logs(second / "wandb", fork)
    run = next(r.run for r in wandb_log.records(log) if r.WhichOneof("record_type") == "run")
    forked_from = next(json.loads(i.value_json) for i in run.config.update
                       if i.key == "forked_from")
    assert forked_from == f"{saved.wandb_run_id}?_step=4"
    assert [s for s, _ in _jsonl_steps(first)] == [1, 2, 3, 4]
