"""megatrain-plot: which runs a folder names, the series each run and metric gives (repeated steps
resolved to the last row, eval rows placed on the token axis), the files it writes, and the
one-line errors for folders that hold no run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from megatrain.cli.plot import main
from megatrain.errors import ConfigError, DataError
from megatrain.metrics.plot import find_runs, last_per_step, read_rows, series

TOKENS_PER_STEP = 1000


@pytest.fixture
def matplotlib() -> None:
    """For the tests that draw; the data side needs no matplotlib (the ``plot`` extra)."""
    pytest.importorskip("matplotlib")


def train_row(step: int, loss: float, lr: float = 1e-3) -> dict:
    return {"step": step, "loss": loss, "lr": lr, "grad_norm": 1.0,
            "tokens_seen": step * TOKENS_PER_STEP, "tokens_per_s": 500.0 + step, "mfu": None}


def write_run(folder: Path, rows: list[dict], name: str | None = None) -> Path:
    folder.mkdir(parents=True)
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if name:
        (folder / "config.yaml").write_text(f"run:\n  name: {name}\n  dir: {folder}\n")
    return folder


def two_runs(tmp_path: Path) -> tuple[Path, Path]:
    a = write_run(tmp_path / "a", [train_row(10, 5.0), train_row(20, 4.0),
                                   {"step": 20, "eval_loss": 4.5, "eval_ppl": 90.0},
                                   train_row(30, 3.5)], name="lr-high")
    b = write_run(tmp_path / "b", [train_row(10, 6.0, lr=5e-4), train_row(20, 5.5, lr=5e-4)])
    return a, b


def test_series_per_run_and_metric(tmp_path: Path) -> None:
    runs = find_runs(list(two_runs(tmp_path)))
    assert [r.name for r in runs] == ["lr-high", "b"]  # run.name from config.yaml, else folder
    high, low = runs
    assert series(high, "loss") == ([10.0, 20.0, 30.0], [5.0, 4.0, 3.5])
    assert series(high, "eval_loss") == ([20.0], [4.5])
    assert series(low, "lr") == ([10.0, 20.0], [5e-4, 5e-4])
    assert series(high, "tokens_per_s", x="tokens") == ([10e3, 20e3, 30e3], [510.0, 520.0, 530.0])
    assert not low.has("eval_loss") and not high.has("mfu")  # null values are not data


def test_eval_rows_on_the_token_axis_between_logged_steps(tmp_path: Path) -> None:
    run = write_run(tmp_path / "r", [train_row(20, 4.0), train_row(40, 3.0),
                                     {"step": 30, "eval_loss": 3.5},
                                     {"step": 5, "eval_loss": 6.0}])
    (only,) = find_runs([run])
    assert series(only, "eval_loss", x="tokens") == ([5e3, 30e3], [6.0, 3.5])  # 0 at step 0


def test_a_repeated_step_keeps_its_last_row(tmp_path: Path) -> None:
    """A rollback (or a crash-resume written before rows were moved aside) logs steps again."""
    rows = [train_row(10, 5.0), train_row(20, 9.0), train_row(30, 9.5),  # abandoned 20, 30
            train_row(20, 4.0), {"step": 20, "eval_loss": 4.4}, train_row(30, 3.0)]
    run = write_run(tmp_path / "r", rows)
    (only,) = find_runs([run])
    assert series(only, "loss") == ([10.0, 20.0, 30.0], [5.0, 4.0, 3.0])
    assert last_per_step(only.rows, "eval_loss") == {20: 4.4}  # a step's eval row is its own


def test_a_sweep_folder_expands_to_its_jobs_in_order(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    for job in (0, 1, 2, 10):
        write_run(sweep / str(job), [train_row(10, 5.0 - job)], name=f"lr-{job}")
    (sweep / "multirun.yaml").write_text("{}\n")
    (sweep / ".hydra").mkdir()  # a folder without metrics is no job
    runs = find_runs([sweep])
    assert [r.name for r in runs] == ["lr-0", "lr-1", "lr-2", "lr-10"]
    assert [series(r, "loss")[1] for r in runs] == [[5.0], [4.0], [3.0], [-5.0]]


def test_runs_of_one_name_are_named_by_folder(tmp_path: Path) -> None:
    a = write_run(tmp_path / "a", [train_row(1, 1.0)], name="quickstart")
    b = write_run(tmp_path / "b", [train_row(1, 1.0)], name="quickstart")
    assert [r.name for r in find_runs([a, b])] == [str(a), str(b)]


@pytest.mark.parametrize("suffix, magic", [(".png", b"\x89PNG"), (".svg", b"<?xml")])
@pytest.mark.usefixtures("matplotlib")
def test_the_command_writes_the_image(tmp_path: Path, suffix: str, magic: bytes,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    a, b = two_runs(tmp_path)
    out = tmp_path / "plots" / f"curves{suffix}"
    assert main([str(a), str(b), "--out", str(out), "--x", "tokens"]) == 0
    assert out.read_bytes().startswith(magic)
    assert "loss, eval_loss, lr, tokens_per_s of 2 run(s) against tokens" in capsys.readouterr().out


@pytest.mark.usefixtures("matplotlib")
def test_a_metric_no_run_logs_is_left_out_and_said(tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    a, _ = two_runs(tmp_path)
    out = tmp_path / "c.png"
    assert main([str(a), "--metrics", "loss,eval_accuracy", "--out", str(out)]) == 0
    assert "loss of 1 run(s) against step; no run logs eval_accuracy" in capsys.readouterr().out
    assert main([str(a), "--metrics", "eval_accuracy", "--out", str(out)]) == 2


@pytest.mark.parametrize("make, message", [
    (lambda p: p / "missing", "no such run folder"),
    (lambda p: (p / "empty").mkdir() or p / "empty", "no metrics.jsonl in it or in its subfolders"),
])
def test_a_folder_without_runs_is_one_line(tmp_path: Path, make, message: str,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    folder = make(tmp_path)
    assert main([str(folder), "--out", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(folder) in err and message in err
    assert not (tmp_path / "x.png").exists()


def test_bad_rows_name_their_line_and_a_torn_last_line_is_skipped(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    path.write_text(json.dumps(train_row(1, 2.0)) + '\n{"step": 2, "lo')  # killed mid-write
    assert [r["step"] for r in read_rows(path)] == [1]
    path.write_text('{"step": 1}\nnot json\n{"step": 3}\n')
    with pytest.raises(DataError, match=r"metrics.jsonl:2: not a JSON row"):
        read_rows(path)
    path.write_text('{"loss": 1.0}\n')
    with pytest.raises(DataError, match=r"metrics.jsonl:1: .*integer 'step'"):
        read_rows(path)


def test_an_unknown_image_format_or_axis_is_a_config_error(tmp_path: Path) -> None:
    runs = find_runs([two_runs(tmp_path)[0]])
    from megatrain.metrics.plot import draw

    with pytest.raises(ConfigError, match=r"--out .*\.jpg: the file name ends in one of"):
        draw(runs, ["loss"], "step", tmp_path / "c.jpg")
    with pytest.raises(ConfigError, match="--x 'time'"):
        series(runs[0], "loss", x="time")
