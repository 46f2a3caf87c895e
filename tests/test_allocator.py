"""glibc malloc settings of the training process against real page faults (README "Benchmarks")."""

import os
import subprocess
import sys
import textwrap

import pytest

from convnn.train import app as train
from tests.test_train import QUIET, TINY_DATA, TINY_VGG, convnn_train


def glibc() -> bool:
    """Whether this process runs on glibc."""
    try:
        return (os.confstr("CS_GNU_LIBC_VERSION") or "").startswith("glibc")
    except (ValueError, OSError):
        return False


needs_glibc = pytest.mark.skipif(not glibc(), reason="needs glibc malloc")

#: Two 48 MiB tensors (above glibc's largest dynamic mmap threshold, 32 MiB) made, touched and freed
#: per round, 40 rounds; the minor page faults of each round.
CHURN = textwrap.dedent(
    """
    import resource, torch
    from convnn.train.allocator import keep_freed_memory
    print(keep_freed_memory())
    for _ in range(40):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        blocks = [torch.ones(12 << 20) for _ in range(2)]
        del blocks
        print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    """
)
PAGES = 2 * (48 << 20) // 4096  # per round


def churn(**env: str) -> tuple[bool, list[int]]:
    """``(applied, minor page faults per round)`` of :data:`CHURN` in a fresh process."""
    env = {**os.environ, "GLIBC_TUNABLES": "", **env}
    out = subprocess.run(
        [sys.executable, "-c", CHURN], env=env, capture_output=True, text=True, timeout=120, check=True
    ).stdout.split()
    return out[0] == "True", [int(n) for n in out[1:]]


@needs_glibc
def test_freed_memory_is_reused_without_page_faults():
    # with the settings the heap settles after a few rounds (3 to 8 seen) and then faults no more
    applied, faults = churn()
    assert applied and max(faults[-10:]) < 0.02 * PAGES, faults
    # glibc's defaults map such blocks afresh every round: every page faults again
    applied, faults = churn(CONVNN_MALLOC_TUNING="0")
    assert not applied and min(faults[1:]) > 0.5 * PAGES, faults


@needs_glibc
def test_users_allocator_settings_win():
    tunables = "glibc.malloc.trim_threshold=4096:glibc.malloc.mmap_threshold=131072"
    applied, faults = churn(GLIBC_TUNABLES=tunables)
    assert not applied and min(faults[1:]) > 0.5 * PAGES, faults


def test_every_training_job_applies_it(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(train, "keep_freed_memory", lambda: calls.append(1) or True)
    with pytest.raises(SystemExit):  # k=40 stops the run after the job started
        convnn_train(
            tmp_path, *TINY_DATA, *TINY_VGG, *QUIET, "layer=convnn", "layer.k=40", monkeypatch=monkeypatch
        )
    assert calls == [1]


def test_a_bad_setting_is_one_line(monkeypatch, capsys):
    monkeypatch.setenv("CONVNN_MALLOC_TUNING", "off")
    monkeypatch.setattr(sys, "argv", ["convnn-train"])
    with pytest.raises(SystemExit) as e:
        train.main()
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and err == "convnn-train: error: CONVNN_MALLOC_TUNING must be 0 or 1, got 'off'"
