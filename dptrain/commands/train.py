"""``dptrain train RECIPE [--resume RUN_DIR]``."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="privately train or fine-tune a model from a YAML recipe",
        description="Privately train or fine-tune a model as a recipe describes; prints progress, "
        "validation perplexity before and after, and the final (epsilon, delta).",
    )
    p.add_argument("recipe", help="path to a YAML recipe (see recipes/)")
    p.add_argument(
        "--resume", metavar="RUN_DIR", help="continue a stopped run in RUN_DIR with its ledger"
    )
    p.add_argument(
        "--output",
        metavar="RUN_DIR",
        help="run directory (default: recipe output_dir or runs/<name>)",
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a recipe key, e.g. --set training.steps=10",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..recipe import load_recipe
    from ..train import train

    recipe = load_recipe(args.recipe, args.set, command="train")
    run_dir = args.resume or args.output
    train(recipe, run_dir, resume=bool(args.resume), progress=not args.no_progress)
    return 0
