"""keep_freed_memory: after it, a large CPU tensor allocated again lands on pages already mapped.

Each case runs in a fresh interpreter: malloc's settings last for the process's life."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's mallopt")

PAGES = (64 << 20) // 4096  # a 64 MB tensor, above glibc's largest mmap threshold (32 MB)
PROBE = """
import json, resource, torch
from megatrain.training.host_memory import keep_freed_memory
applied = keep_freed_memory()

def faults_of_one_block():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.zeros(16 << 20)  # 64 MB of float32, freed at once
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

print(json.dumps({"applied": applied, "faults": [faults_of_one_block() for _ in range(30)]}))
"""


def _probe(**env: str) -> dict:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    out = subprocess.run([sys.executable, "-c", PROBE], env={**clean, **env}, check=True,
                         capture_output=True, text=True, timeout=120).stdout
    return json.loads(out.splitlines()[-1])


def test_a_freed_block_is_reused_without_page_faults():
    result = _probe()
    assert result["applied"]
    # The first blocks map new pages (an aligned block does not fit the hole its freed
    # predecessor left until a few holes have merged); from then on their pages are reused,
    # where glibc's default faults on every page of every block.
    steady = result["faults"][-10:]
    assert sum(steady) < PAGES // 10, result


def test_the_users_own_malloc_settings_stand():
    assert not _probe(MALLOC_MMAP_MAX_="65536")["applied"]
