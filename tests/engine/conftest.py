"""The ``exact`` fixture: run a case, record its outcome, then assert.

With ``DPTRAIN_EXACTNESS_JSON=path`` set, every outcome of the session is written to ``path``
(``python -m tests.engine.table`` renders such files as the table in EXACTNESS.md).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any

import pytest
import torch

from .builders import Case
from .harness import Outcome, run_case

_OUTCOMES: list[dict[str, Any]] = []


@pytest.fixture
def exact(request: pytest.FixtureRequest) -> Callable[..., Outcome]:
    """``exact(section, label, case, **run_case_kwargs)``: the case must pass (or be refused
    as a good refusal, for a case marked ``refuse``)."""

    def go(section: str, label: str, case: Case, **kwargs: Any) -> Outcome:
        torch.manual_seed(0)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # tiny models: a second thread only spins on a shared machine
        try:
            outcome = run_case(case, **kwargs)
        finally:
            torch.set_num_threads(threads)
        _OUTCOMES.append(
            {
                "section": section,
                "case": label,
                "expect": "refusal" if case.refuse else "exact",
                "status": outcome.status,
                "passed": outcome.passed,
                "error": outcome.error,
                "detail": outcome.detail,
                "cell": outcome.cell(),
                "test": request.node.nodeid,
            }
        )
        assert outcome.passed, f"{outcome.status}: {outcome.detail}"
        return outcome

    return go


def pytest_sessionfinish(session: pytest.Session) -> None:
    path = os.environ.get("DPTRAIN_EXACTNESS_JSON")
    if path and _OUTCOMES:
        with open(path, "w") as f:
            json.dump(_OUTCOMES, f, indent=1)
