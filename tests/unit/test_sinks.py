import json
from pathlib import Path

from megatrain.metrics.sinks import JsonlSink
from megatrain.metrics.wandb_sink import resolve_mode


def test_jsonl_resume_drops_rows_past_the_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    sink = JsonlSink(path, resume_step=0)
    for step in range(1, 6):
        sink.log({"step": step, "loss": 1.0 / step})
    sink.close()
    sink = JsonlSink(path, resume_step=3)  # the run died after step 5, the checkpoint is step 3
    sink.log({"step": 4, "loss": 0.0})
    sink.close()
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and rows[-1]["loss"] == 0.0


def test_wandb_auto_mode_is_offline_without_a_key(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert resolve_mode("auto") == "offline"
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert resolve_mode("auto") == "online"
    assert resolve_mode("disabled") == "disabled"
