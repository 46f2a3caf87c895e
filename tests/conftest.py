"""Test-suite conventions: a test marked ``cuda`` needs a CUDA device and skips without one, saying so
(``make gpu-check`` runs exactly these: ``pytest -m cuda``)."""

from __future__ import annotations

import pytest
import torch


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (make gpu-check runs the tests marked cuda)")
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip)
