"""torch.nn layers against the explicit per-example loop (float64, most samples clipped).

Each case must match the loop to 1e-5 relative over the whole clipped update, or, for the cases
built with ``refuse=`` (layers that mix samples: BatchNorm in train mode, frozen or not, with
running statistics, and a parameter-free batch mean), be refused before the step with a
message naming the layer and a private fix.
"""

from __future__ import annotations

import pytest

from .builders import LAYER_CASES


@pytest.mark.parametrize("name", list(LAYER_CASES))
def test_layer(exact, name):
    exact("torch.nn layers", name, LAYER_CASES[name])
