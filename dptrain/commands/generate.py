"""``dptrain generate RUN_DIR --prompt TEXT [--max-new-tokens N --samples K]``: samples from
a finished run's final model (see :mod:`dptrain.tasks.generation`).  For a run with canaries
the output is scanned for every canary secret (a verbatim secret is reported), and
``--canary-check`` completes each canary's prefix greedily."""

from __future__ import annotations

import argparse
import json

from ..errors import InputError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "generate",
        help="sample text from a finished run's final model",
        description="Generate from the final adapter/model of RUN_DIR, formatting each prompt "
        "as the run's records were (chat template for instruction and chat runs). Generation "
        "is post-processing of the released model and costs no privacy budget.",
    )
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument(
        "--prompt",
        action="append",
        default=None,
        help="prompt text (repeatable; default: one empty prompt, i.e. unconditional)",
    )
    p.add_argument("--max-new-tokens", type=int, default=64, metavar="N")
    p.add_argument("--samples", type=int, default=1, metavar="K", help="samples per prompt")
    p.add_argument("--temperature", type=float, default=1.0, help="0: greedy")
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--seed", type=int, default=0, help="sampling seed (public)")
    p.add_argument(
        "--canary-check",
        action="store_true",
        help="also complete each canary's prefix greedily and count verbatim secrets",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.max_new_tokens < 1 or args.samples < 1:
        raise InputError("--max-new-tokens and --samples must be at least 1")
    if args.temperature < 0 or not 0 < args.top_p <= 1:
        raise InputError("--temperature must be >= 0 and --top-p in (0, 1]")
    from ..data.canaries import read_manifest
    from ..tasks.generation import canary_check, complete, load_run, secrets_in

    _, task, model, tok = load_run(args.run_dir)
    manifest = read_manifest(args.run_dir)
    if args.canary_check and manifest is None:
        raise InputError(
            f"--canary-check: {args.run_dir} has no canaries (no canaries.secret.json: it was "
            "trained without data.canaries). Fix: drop --canary-check, or train a run with "
            "--set 'data.canaries={}'"
        )
    prompts = [p for p in (args.prompt or [""]) for _ in range(args.samples)]
    out: dict = {
        "samples": complete(
            model,
            tok,
            task,
            prompts,
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            top_p=args.top_p,
            seed=args.seed,
        )
    }
    texts = [s["text"] for s in out["samples"]]
    if manifest is not None:
        out["canary_secrets_in_samples"] = secrets_in(texts, manifest)
        if args.canary_check:
            from dataclasses import asdict

            check = canary_check(model, tok, manifest)
            out["canary_check"] = asdict(check)
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    for i, s in enumerate(out["samples"], start=1):
        print(f"--- sample {i} (prompt {s['prompt']!r})\n{s['text']}")
    if manifest is not None:
        n = out["canary_secrets_in_samples"]
        print(
            f"canary secrets      {n} of {len(manifest.canaries)} appear verbatim in these samples"
            + ("  WARNING" if n else "")
        )
        if args.canary_check:
            print(f"canary check        {check.line()}")
    return 0
