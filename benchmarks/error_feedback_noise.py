"""The noise error feedback (DiceSGD) needs at equal (epsilon, delta), and what a canary reveals.

    python benchmarks/error_feedback_noise.py        # seconds; writes results/error_feedback_noise.json

For the utility setups and for the configurations of the DiceSGD authors' scripts, prints the
DP-SGD noise multiplier, the one our error-feedback bound needs for several C2 / C1, the
authors' code rule (DP-SGD noise times sqrt(1 + 2 C2 / C1)), and the epsilon lower bound of the
saturating-canary attack (``accountants.error_feedback.canary_attack_epsilon``) at both noises.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from accountants import ERROR_FEEDBACK, calibrate_noise  # noqa: E402
from accountants.error_feedback import FEEDBACK, canary_attack_epsilon  # noqa: E402

# (name, N, expected batch, steps, epsilon, delta); small/smollm as in benchmarks/utility.py
SETUPS = [
    ("utility small", 4050, 128, 200, 8.0, 1 / 40500),
    ("utility smollm", 4050, 32, 150, 8.0, 1e-5),
]
# the authors' scripts: CIFAR-10 (ViT, batch 1000, 2 epochs, epsilon 2) and GPT-2 on E2E
# (batch 1000, 10 epochs, epsilon 8, delta 8e-6); C2 / C1 = 1 and the E2E script's default 10
PAPER = [
    ("cifar10", 50000, 1000, 100, 2.0, 1e-5, 1.0),
    ("e2e", 42061, 1000, 421, 8.0, 8e-6, 1.0),
    ("e2e", 42061, 1000, 421, 8.0, 8e-6, 10.0),
]


def ef_sigma(eps: float, delta: float, q: float, steps: int, ratio: float) -> float:
    return calibrate_noise(
        eps, delta, q, steps, "rdp", kind=ERROR_FEEDBACK, params={FEEDBACK: 2 * ratio}
    )


def main() -> int:
    out: dict = {"setups": [], "paper": []}
    print("| setup | q | DP-SGD sigma (rdp) | C2 / C1 | EF sigma | ratio |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, n, b, steps, eps, delta in SETUPS:
        q = b / n
        base = calibrate_noise(eps, delta, q, steps, "rdp")
        for mult in (0.25, 0.5, 1.0, 2.0, 4.0, 1 / q):
            ratio = mult * q
            s = ef_sigma(eps, delta, q, steps, ratio)
            out["setups"].append(dict(setup=name, q=q, dpsgd=base, c2_over_c1=ratio, ef=s))
            print(f"| {name} | {q:.4f} | {base:.3f} | {ratio:.4f} | {s:.3f} | {s / base:.2f} |")
    print()
    print(
        "| config | C2 / C1 | DP-SGD sigma | code rule sigma | its attack epsilon >= |"
        " EF sigma (ours) | its attack epsilon >= | target |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, n, b, steps, eps, delta, ratio in PAPER:
        q = b / n
        base = calibrate_noise(eps, delta, q, steps, "rdp")
        code = base * math.sqrt(1 + 2 * ratio)
        ours = ef_sigma(eps, delta, q, steps, ratio)
        lb_code = canary_attack_epsilon(q, steps, code, 1.0, ratio, delta)
        lb_ours = canary_attack_epsilon(q, steps, ours, 1.0, ratio, delta)
        out["paper"].append(
            dict(
                config=name,
                q=q,
                steps=steps,
                epsilon=eps,
                delta=delta,
                c2_over_c1=ratio,
                dpsgd=base,
                code_rule=code,
                attack_epsilon_code_rule=lb_code,
                ef=ours,
                attack_epsilon_ef=lb_ours,
            )
        )
        print(
            f"| {name} (q={q:.4f}, T={steps}) | {ratio:g} | {base:.3f} | {code:.3f} | "
            f"{lb_code:.1f} | {ours:.1f} | {lb_ours:.2f} | {eps:g} |"
        )
    path = ROOT / "benchmarks" / "results" / "error_feedback_noise.json"
    path.write_text(json.dumps(out, indent=1, default=lambda x: None))
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
