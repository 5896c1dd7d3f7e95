"""W&B artifacts of a real (offline) run: the best checkpoint's Hugging Face export as a model
artifact holding exactly the bytes ``megatrain-export`` writes for that checkpoint, and the
end-of-run sample as a table; both read back from the run's ``.wandb`` transaction log."""

from __future__ import annotations

import base64
import hashlib
import json
import re
from pathlib import Path

import pytest

from tests.integration.helpers import env_for_tests, metrics, train
from tests.launch.helpers import wandb_records

pytestmark = pytest.mark.integration


def md5_b64(path: Path) -> str:
    return base64.b64encode(hashlib.md5(path.read_bytes()).digest()).decode()


def test_best_model_artifact_and_sample_table(tmp_path: Path, prepared_dir: Path) -> None:
    pytest.importorskip("transformers")
    run_dir = tmp_path / "run"
    env = env_for_tests() | {"WANDB_DATA_DIR": str(tmp_path / "wandb-data")}  # staging
    result = train(run_dir, prepared_dir, "trainer.max_steps=12", "trainer.eval_every=4",
                   "trainer.save_every=4", "trainer.eval_steps=2", "trainer.keep_best=eval_loss",
                   "trainer.sample_prompt=KING", "trainer.sample_tokens=8",
                   "logger.wandb.mode=offline", "logger.wandb.log_model=best",
                   "logger.wandb.sample_table=true", env=env)
    sample = re.search(r"----- sample \(prompt 'KING'\) -----\n(.*)\n-----", result.stdout,
                       re.DOTALL).group(1)
    best = json.loads((run_dir / "checkpoints" / "best.json").read_text())
    evals = {r["step"]: r["eval_loss"] for r in metrics(run_dir) if "eval_loss" in r}
    assert best["step"] == min(evals, key=evals.get)

    (folder,) = (run_dir / "wandb").glob("offline-run-*")
    records = list(wandb_records(next(folder.glob("run-*.wandb"))))
    run_id = next(r.run.run_id for r in records if r.WhichOneof("record_type") == "run")
    models = [r.artifact for r in records
              if r.WhichOneof("record_type") == "artifact" and r.artifact.type == "model"]
    assert len(models) == 1
    model = models[0]
    assert model.name == f"model-{run_id}"
    assert {"best", f"step-{best['step']}"} <= set(model.aliases)
    assert json.loads(model.metadata)["step"] == best["step"]

    from megatrain.hf_export import export

    reference = export(run_dir / "checkpoints" / best["checkpoint"], tmp_path / "reference")
    contents = {c.path: c for c in model.manifest.contents}
    assert set(contents) == {p.name for p in reference.iterdir()}
    for name in ("model.safetensors", "config.json"):
        assert contents[name].digest == md5_b64(reference / name), name
        assert Path(contents[name].local_path).exists()  # staged for `wandb sync`
    assert not list(run_dir.glob("hf_export.*"))  # the export made for W&B is gone

    tables = [item for r in records if r.WhichOneof("record_type") == "history"
              for item in r.history.item if list(item.nested_key[:2]) == ["samples", "path"]]
    assert len(tables) == 1
    table = json.loads((folder / "files" / json.loads(tables[0].value_json)).read_text())
    assert table["columns"] == ["step", "prompt", "text"]
    assert table["data"] == [[12, "KING", sample]]
