"""``dptrain check RECIPE``: is the engine exact on this recipe's model?  Before any budget is
spent, one noise-free engine step per batch of the recipe's first records against the explicit
per-example loop; per layer the rule, the error and the verdict, or the refusal (exit code 1
when not exact or refused)."""

from __future__ import annotations

import argparse
import json
import sys

from . import add_overrides


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "check",
        help="check the engine's per-sample gradients on a recipe's model against a loop",
        description="Run the privacy engine (noise 0) and an explicit per-example loop of clipped "
        "gradients on the recipe's model and its first records; print per layer the rule used, "
        "the relative error and the verdict, or what the engine refuses and why. Spends no "
        "budget and writes nothing (the output depends on the records without noise: keep it "
        "private).",
    )
    p.add_argument("recipe", help="path to a YAML recipe (see recipes/)")
    p.add_argument("--records", type=int, default=8, help="records to use (default 8)")
    p.add_argument("--batch-size", type=int, default=4, help="records per batch (default 4)")
    add_overrides(p, "model.dtype=float64")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..diagnose import check_recipe
    from ..recipe import load_recipe

    recipe = load_recipe(args.recipe, args.set, command="train")
    print(f"checking {recipe.model.name} on {args.records} records ...", file=sys.stderr)
    result = check_recipe(recipe, records=args.records, batch_size=args.batch_size)
    print(json.dumps(result.to_dict(), indent=2) if args.json else result.render())
    return 0 if result.exact else 1
