"""The benchmark scripts' command lines: thread counts and values they refuse with one line, before any
measurement (run as a user runs them, in a fresh process)."""

import subprocess
import sys
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


@pytest.mark.parametrize(
    "script, args, message",
    [
        (
            "bench_layers.py",
            ["--threads", "0,2"],
            "--threads must be positive integers separated by commas, got '0,2'",
        ),
        ("bench_models.py", ["--ratios", "0,x"], "--ratios=0,x: comma-separated numbers within [0, 1]"),
        ("bench_models.py", ["--batch", "0", "--ratios", "2"], "--batch=0, --ratios=2:"),
    ],
)
def test_bad_arguments_stop_with_one_line_naming_the_value(script, args, message, tmp_path):
    done = subprocess.run(
        [sys.executable, str(SCRIPTS / script), *args, "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2 and message in done.stderr.strip().splitlines()[-1], done.stderr
    assert not any(tmp_path.iterdir())
