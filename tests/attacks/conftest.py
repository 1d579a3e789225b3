"""Fixtures shared by the attack tests."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for the module: tiny models gain nothing from a thread pool, and on
    a shared machine the pool spinning against other processes makes every small matmul many
    times slower.  The previous count comes back at the module's end."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
