"""The subcommands of ``dptrain``: one module each, with ``register(sub)`` and ``run(args)``."""

from __future__ import annotations

import argparse


def add_overrides(p: argparse.ArgumentParser, example: str) -> None:
    """``--set KEY=VALUE`` (repeatable): recipe keys overridden on the command line."""
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help=f"override a recipe key, e.g. --set {example}",
    )


def quiet_library_bars() -> None:
    """Turn off the progress bars of ``transformers`` and ``huggingface_hub`` (a "loading
    weights" bar per model load): under ``--no-progress`` a command prints only its own lines."""
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:  # pragma: no cover - transformers is a dependency
        return
    hf_logging.disable_progress_bar()
    try:
        from huggingface_hub.utils import disable_progress_bars
    except ImportError:  # pragma: no cover
        return
    disable_progress_bars()
