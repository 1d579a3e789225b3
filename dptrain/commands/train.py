"""``dptrain train RECIPE [--resume RUN_DIR] [--nproc N]``."""

from __future__ import annotations

import argparse
import os
import sys

from ..errors import InputError, RunInterrupted
from . import add_overrides, quiet_library_bars


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
    add_overrides(p, "training.steps=10")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument(
        "--nproc",
        type=int,
        default=1,
        metavar="N",
        help="data-parallel processes on this machine (torchrun; gloo on CPU, NCCL on GPUs)",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.nproc < 1:
        raise InputError("--nproc must be at least 1")
    if args.nproc > 1 and int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return _launch(args)
    from .. import distributed
    from ..recipe import load_recipe
    from ..rundir import CheckpointWriteError
    from ..train import train

    if args.no_progress:
        quiet_library_bars()
    recipe = load_recipe(args.recipe, args.set, command="train")
    from ..steplog import check_reporters

    check_reporters(recipe.training.report_to)
    if recipe.audit is not None and recipe.audit.after_training:
        from attacks.audit import require_plots

        require_plots()  # before training, not after it
    run_dir = args.resume or args.output
    try:
        result = train(recipe, run_dir, resume=bool(args.resume), progress=not args.no_progress)
    except (RunInterrupted, CheckpointWriteError) as err:  # the resume hint names the recipe
        err.command = f"dptrain train {args.recipe}"
        raise
    audit = recipe.audit
    if result.already_complete:  # nothing was trained: an audit is `dptrain audit RUN_DIR`
        return 0
    if distributed.is_main():
        draw_figures(result.run_dir)
    if result.finished and distributed.is_main() and audit is not None:
        if audit.after_training or audit.whitebox:
            from attacks.audit import after_training

            after_training(result.run_dir, audit, progress=not args.no_progress)
    return 0


def draw_figures(run_dir: str | os.PathLike[str]) -> None:
    """The run's figures (:mod:`dptrain.figures`), if matplotlib is installed: one line says
    where they are, or why there are none; a failure to draw never fails the run."""
    import importlib.util

    if importlib.util.find_spec("matplotlib") is None:
        print(
            "figures             none (matplotlib is not installed: pip install "
            "'dptrain[plots]', then `dptrain epsilon --run RUN_DIR --plot`)",
            flush=True,
        )
        return
    try:
        from ..figures import render_run

        public, training = render_run(run_dir)
    except Exception as err:  # the run is complete: a figure is not worth failing it for
        detail = " ".join(f"{type(err).__name__}: {err}".split())
        print(
            f"figures             not drawn ({detail}); redraw with "
            f"`dptrain epsilon --run {run_dir} --plot`",
            flush=True,
        )
        return
    shown = f"{public.path} (public)"
    if training is not None:
        shown += f", {training.path} (PRIVATE)"
    print(f"figures             {shown}", flush=True)


def _launch(args: argparse.Namespace) -> int:
    """Re-run this command under torchrun with ``args.nproc`` processes on this machine."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun

    argv = [args.recipe, *(f"--set={s}" for s in args.set)]
    if args.resume:
        argv += ["--resume", args.resume]
    if args.output:
        argv += ["--output", args.output]
    if args.no_progress:
        argv.append("--no-progress")
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // args.nproc)))
    try:
        torchrun(
            ["--standalone", f"--nproc-per-node={args.nproc}", "-m", "dptrain.cli", "train", *argv]
        )
    except ChildFailedError as err:
        print(f"error: a training process failed:\n{err}", file=sys.stderr)
        return 1
    return 0
