"""trainer.precision: what auto and bf16_if_native resolve to on a CPU, by the CPU's flags."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from megatrain.errors import ConfigError
from megatrain.training import engine
from megatrain.training.engine import cpu_has_native_bf16, resolve_precision

CPU = torch.device("cpu")
FLAGS = "processor\t: 0\nflags\t\t: fpu sse2 avx2 {extra}\nbugs\t\t: spectre_v1\n"


def _cpuinfo(tmp_path: Path, extra: str) -> Path:
    path = tmp_path / "cpuinfo"
    path.write_text(FLAGS.format(extra=extra))
    return path


@pytest.mark.parametrize("extra, native", [("avx512f avx512_bf16", True), ("amx_bf16 amx_tile", True),
                                           ("avx512f avx512bw avx512_vnni", False), ("", False)])
def test_native_bf16_is_read_from_the_cpu_flags(tmp_path, extra, native):
    assert cpu_has_native_bf16(_cpuinfo(tmp_path, extra)) is native


def test_an_unreadable_cpuinfo_means_no_native_bf16(tmp_path):
    assert not cpu_has_native_bf16(tmp_path / "missing")


@pytest.mark.parametrize("native", [True, False])
def test_bf16_if_native_follows_the_cpu_and_auto_stays_fp32(monkeypatch, native):
    monkeypatch.setattr(engine, "cpu_has_native_bf16", lambda: native)
    assert resolve_precision("bf16_if_native", CPU) == ("bf16" if native else "fp32")
    assert resolve_precision("auto", CPU) == "fp32"
    assert resolve_precision("bf16", CPU) == "bf16"


def test_an_unknown_precision_names_the_choices():
    with pytest.raises(ConfigError, match="bf16_if_native"):
        resolve_precision("bf32", CPU)
