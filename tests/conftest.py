"""Fixtures shared by the kernel tests."""

from __future__ import annotations

import pytest
import torch

from tests.utils import poison


@pytest.fixture()
def poisoned_outputs(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every ``torch.empty`` during the test starts as NaN, so an output element left unwritten fails."""
    empty = torch.empty
    monkeypatch.setattr(torch, "empty", lambda *args, **kwargs: poison(empty(*args, **kwargs)))
