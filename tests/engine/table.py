"""Render outcome files of the exactness matrix as the markdown table of EXACTNESS.md.

    DPTRAIN_EXACTNESS_JSON=main.json pytest tests/engine      # once per engine
    python -m tests.engine.table [--into tests/engine/EXACTNESS.md] "main=a.json" "new=b.json"

Each argument is ``column title=path``; rows are the cases in the order of the first file.
``--into FILE`` replaces everything after the line ``MARKER`` in FILE instead of printing.
"""

from __future__ import annotations

import json
import sys
from collections import Counter

STATUSES = ("pass", "wrong", "crash", "refused", "accepted")
MARKER = "<!-- table: python -m tests.engine.table; do not edit below -->"


def _cell(outcome: dict | None, limit: int = 120) -> str:
    """``pass (error)``, ``refused as required: ...``, or a bold failure."""
    if outcome is None:
        return "not run"
    text = outcome["cell"]
    if outcome["passed"] and outcome["status"] == "refused":
        text = "refused as required: " + outcome["detail"]
    text = text if len(text) <= limit else text[: limit - 3] + "..."
    text = text.replace("|", "\\|")
    return text if outcome["passed"] else f"**{text}**"


def render(columns: list[tuple[str, list[dict]]]) -> str:
    keys: list[tuple[str, str]] = []
    for _, outcomes in columns:
        for o in outcomes:
            if (o["section"], o["case"]) not in keys:
                keys.append((o["section"], o["case"]))
    by_col = [{(o["section"], o["case"]): o for o in outcomes} for _, outcomes in columns]
    lines = []
    head = "| case | must | " + " | ".join(title for title, _ in columns) + " |"
    lines += [head, "|" + " --- |" * (2 + len(columns))]
    section = None
    for key in keys:
        if key[0] != section:
            section = key[0]
            lines.append(f"| **{section}** | |" + " |" * len(columns))
        first = next((c[key] for c in by_col if key in c), None)
        must = "refuse" if first and first["expect"] == "refusal" else "exact"
        cells = " | ".join(_cell(c.get(key)) for c in by_col)
        lines.append(f"| {key[1]} | {must} | {cells} |")
    lines.append("")
    for title, outcomes in columns:
        counts = Counter(o["status"] for o in outcomes)
        ok = sum(o["passed"] for o in outcomes)
        parts = ", ".join(f"{counts[s]} {s}" for s in STATUSES if counts[s])
        lines.append(f"- {title}: {ok} of {len(outcomes)} as required ({parts}).")
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    into = None
    if argv[:1] == ["--into"] and len(argv) > 1:
        into, argv = argv[1], argv[2:]
    if not argv or any("=" not in a for a in argv):
        print(__doc__, file=sys.stderr)
        return 2
    columns = []
    for arg in argv:
        title, path = arg.split("=", 1)
        with open(path) as f:
            columns.append((title, json.load(f)))
    table = render(columns)
    if into is None:
        sys.stdout.write(table)
        return 0
    with open(into) as f:
        text = f.read()
    if MARKER not in text:
        print(f"{into} has no line {MARKER}", file=sys.stderr)
        return 2
    with open(into, "w") as f:
        f.write(text[: text.index(MARKER) + len(MARKER)] + "\n\n" + table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
