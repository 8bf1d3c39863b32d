"""Fixtures shared by the kernel tests, and the example budget of the property tests."""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import settings

from tests.utils import poison


@pytest.fixture()
def poisoned_outputs(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every ``torch.empty`` during the test starts as NaN, so an output element left unwritten fails."""
    empty = torch.empty
    monkeypatch.setattr(torch, "empty", lambda *args, **kwargs: poison(empty(*args, **kwargs)))


# Property tests: a bounded, repeatable number of examples by default (the Triton interpreter runs every
# example on the CPU, and CI must stay fast); HYPOTHESIS_PROFILE=thorough searches wider, locally.
settings.register_profile("ci", max_examples=20, deadline=None, derandomize=True, print_blob=True)
settings.register_profile("thorough", max_examples=300, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
