from pathlib import Path

import pytest

from tests.integration.helpers import train


@pytest.fixture(scope="session")
def prepared_dir(prepared) -> Path:
    """The folder of the session's small prepared corpus (tests/conftest.py)."""
    return prepared.root


@pytest.fixture(scope="session")
def trained_gpt(tmp_path_factory: pytest.TempPathFactory, prepared_dir: Path) -> Path:
    """The run folder of a tiny GPT trained for 60 steps (a loss logged every step), for the
    tests that start from a trained checkpoint."""
    run = tmp_path_factory.mktemp("trained_gpt") / "run"
    train(run, prepared_dir, "trainer.max_steps=60", "optim.lr=3e-3", "trainer.log_every=1",
          "trainer.eval_every=1000", "trainer.save_every=1000")
    return run


def _prepare_task(root: Path, rows: list[dict], tokenizer: Path, fmt: str) -> Path:
    import json

    from megatrain.data.prepare.pipeline import prepare

    source = root / f"{fmt}.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    prepare(str(source), root / "prepared", tokenizer=str(tokenizer), format=fmt,
            eval_fraction=0.1, progress=False)
    return root / "prepared"


@pytest.fixture(scope="session")
def sft_dir(tmp_path_factory: pytest.TempPathFactory, shakespeare_text: str,
            tokenizer_model: Path) -> Path:
    """Instruction rows of very different lengths from tinyshakespeare (a line as the prompt,
    the next 1 to 4 as the completion), prepared with the corpus tokenizer (that of
    ``trained_gpt``)."""
    import random

    lines = [line for line in shakespeare_text.splitlines() if line.strip()][:2000]
    rng, rows, at = random.Random(0), [], 0
    while at + 5 < len(lines):
        k = rng.randint(1, 4)
        rows.append({"prompt": lines[at], "completion": "\n".join(lines[at + 1 : at + 1 + k])})
        at += 1 + k
    return _prepare_task(tmp_path_factory.mktemp("sft"), rows, tokenizer_model, "sft")


@pytest.fixture(scope="session")
def cls_dir(tmp_path_factory: pytest.TempPathFactory, tokenizer_model: Path) -> Path:
    """The stdlib-cls demo task (a function's code -> its package), with the corpus tokenizer."""
    from megatrain.data.demo_tasks import cls_rows

    return _prepare_task(tmp_path_factory.mktemp("cls"), list(cls_rows()), tokenizer_model,
                         "cls")


@pytest.fixture(scope="session")
def uneven_docs(tmp_path_factory: pytest.TempPathFactory, shakespeare_text: str,
                tokenizer_model: Path) -> Path:
    """Slices of tinyshakespeare of 20 to 600 characters, prepared as one document each."""
    import json
    import random

    from megatrain.data.prepare.pipeline import prepare

    root = tmp_path_factory.mktemp("uneven")
    rng, at, lines = random.Random(0), 0, []
    while at < 120_000:
        size = rng.randint(20, 600)
        lines.append(json.dumps({"text": shakespeare_text[at : at + size]}))
        at += size
    (root / "docs.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    prepare(str(root / "docs.jsonl"), root / "prepared", tokenizer=str(tokenizer_model),
            eval_fraction=0.05, progress=False)
    return root / "prepared"
