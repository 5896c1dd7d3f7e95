"""Training from a corpus at a URL: the local S3 server (moto) and an HTTP server give the same
run as the folder on disk, and the S3 credentials reach no file of the run."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.integration.helpers import losses, train
from tests.servers import S3_SECRET

pytestmark = pytest.mark.integration
# The trained_gpt fixture's run (tests/integration/conftest.py), from the same corpus on disk.
SAME_RUN = ("trainer.max_steps=60", "optim.lr=3e-3", "trainer.log_every=1",
            "trainer.eval_every=1000", "trainer.save_every=1000")


@pytest.mark.parametrize("store", ["s3", "http"])
def test_a_run_from_a_url_logs_the_losses_of_the_run_from_disk(
        store: str, tmp_path: Path, trained_gpt: Path, s3_corpus, http_corpus) -> None:
    url = (s3_corpus if store == "s3" else http_corpus)[1]
    extra = ("logger.wandb.mode=offline",) if store == "s3" else ()
    run = tmp_path / "run"
    result = train(run, url, *SAME_RUN, *extra)
    reference = losses(trained_gpt)
    assert len(reference) == 60 and losses(run) == reference  # equal as floats, every step
    if store == "s3":
        _assert_secret_nowhere(run, result.stdout + result.stderr)


def _assert_secret_nowhere(run: Path, console: str) -> None:
    """The planted AWS_SECRET_ACCESS_KEY is in no file of the run folder (config.yaml, metrics,
    checkpoints, W&B's offline files) nor on the console."""
    files = [p for p in run.rglob("*") if p.is_file()]
    records = [p for p in files if p.suffix == ".wandb"]  # W&B's offline run, config included
    assert records and b"s3://corpora/small" in records[0].read_bytes()
    leaked = [str(p.relative_to(run)) for p in files if S3_SECRET.encode() in p.read_bytes()]
    assert leaked == [] and S3_SECRET not in console
