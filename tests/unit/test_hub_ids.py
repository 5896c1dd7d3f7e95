"""``model.init_from=hf:ORG/NAME[@REVISION]``: a hub id resolves through huggingface_hub's own
cache (HF_HOME, HF_HUB_OFFLINE honoured), tested offline against a cache built here."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
RESOLVE = """
import json, sys
from megatrain.errors import ConfigError
from megatrain.training.pretrained import hf_directory
out = {}
for name in sys.argv[1:]:
    try:
        out[name] = str(hf_directory(name))
    except ConfigError as exc:
        out[name] = "error: " + str(exc)
print(json.dumps(out))
"""


def _snapshot(hub: Path, repo: str, revision: str, commit: str) -> Path:
    """A model in the cache layout huggingface_hub writes: refs/<revision> → snapshots/<commit>."""
    root = hub / f"models--{repo.replace('/', '--')}"
    (root / "refs").mkdir(parents=True, exist_ok=True)
    (root / "refs" / revision).write_text(commit)
    snapshot = root / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text(json.dumps({"model_type": "gpt2", "rev": revision}))
    return snapshot


def test_hub_ids_resolve_from_the_cache_offline_or_fail_in_one_line(tmp_path: Path) -> None:
    home = tmp_path / "hf"
    main = _snapshot(home / "hub", "acme/tiny-gpt", "main", "a" * 40)
    tagged = _snapshot(home / "hub", "acme/tiny-gpt", "v1", "b" * 40)
    local = tmp_path / "exported"
    local.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env |= {"HF_HOME": str(home), "HF_HUB_OFFLINE": "1"}
    names = ["acme/tiny-gpt", "acme/tiny-gpt@v1", "acme/not-cached", str(local)]
    result = subprocess.run([sys.executable, "-c", RESOLVE, *names], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=120, check=True)
    got = json.loads(result.stdout.strip().splitlines()[-1])
    assert Path(got["acme/tiny-gpt"]) == main and Path(got["acme/tiny-gpt@v1"]) == tagged
    assert Path(got[str(local)]) == local
    error = got["acme/not-cached"]
    assert error.startswith("error: model.init_from=hf:acme/not-cached: not a local folder, and "
                            "not in the Hugging Face cache or reachable (") and "\n" not in error
