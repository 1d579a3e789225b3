"""The audit's outputs: ``summary.json``, a self-contained ``report.html`` (PNG plots embedded as
data URIs) and a short table on the terminal, all in plain words."""

from __future__ import annotations

import base64
import html
import io
import json
import math
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from dptrain.rundir import atomic_write

__all__ = [
    "print_table",
    "render_figures",
    "verdict",
    "whitebox_verdict",
    "write_report",
    "write_whitebox",
]

_COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2"]


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return _jsonable(x.tolist())
    if isinstance(x, np.generic):
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return "inf" if x > 0 else "-inf" if x < 0 else "nan"
    return x


def _eps(x: float) -> str:
    return "∞" if math.isinf(x) else f"{x:.3g}"


# -- verdict -----------------------------------------------------------------------------------


def verdict(s: dict[str, Any]) -> tuple[str, list[str]]:
    """``(level, sentences)``: level is "bug", "none" (no guarantee) or "ok"; a run with
    ``privacy.insecure_seed`` is first said to have no guarantee against who knows it."""
    level, words = _verdict(s)
    seed = s["claim"].get("insecure_seed")
    if seed is not None:
        words.insert(
            0,
            f"This run used privacy.insecure_seed={seed}: its Poisson coins and noise follow from "
            "that seed, so it has NO privacy guarantee against anyone who knows it (a test or "
            "debugging run).",
        )
    return level, words


def _verdict(s: dict[str, Any]) -> tuple[str, list[str]]:
    eps, conf = s["accountant_epsilon"], s["confidence"]
    delta = s.get("delta_total", s["delta"])  # the bounds are at the guarantee's delta
    lower = s["empirical_epsilon_lower_bound"]
    bounds = s["epsilon_lower_bounds"]
    c = s.get("canaries") or {}
    words: list[str] = []
    best = max(s["attacks"].items(), key=lambda kv: kv[1]["auc"], default=None)
    if best:
        a = best[1]
        words.append(
            f"The strongest membership attack ({a['label']}) has AUC {a['auc']:.3f} (0.5 is "
            f"guessing) and flags {a['tpr_at_fpr_0.01']:.1%} of training records at a 1% false "
            "positive rate."
        )
    if "one_run" in bounds:
        b = bounds["one_run"]
        words.append(
            f"Of {b['canaries']} single canaries, each trained on with probability 1/2, the "
            f"attacker guessed {b['guesses']} and got {b['correct']} right: the training cannot be "
            f"better than ({_eps(b['epsilon'])}, {delta:.3g})-DP, at {conf:.0%} confidence "
            f"(the most {b['canaries']} canaries can show is {_eps(b['ceiling'])})."
        )
    if c.get("exposure_by_repetitions"):
        k, bits = max(c["exposure_by_repetitions"].items(), key=lambda kv: int(kv[0]))
        rank = 2 ** max(c["max_exposure"] - bits, 0.0)
        words.append(
            f"Canaries {'never inserted' if k == '0' else f'repeated {k} times'} have exposure "
            f"{bits:.1f} bits of at most {c['max_exposure']:.1f} (an unseen secret has about "
            f"{c['random_exposure']:.1f}): "
            + (
                "the model ranks such a secret first among all candidates, so an attacker who "
                "knows the template reads it off the model."
                if rank < 1.5
                else f"an attacker who knows the template needs about {rank:,.0f} guesses of "
                f"{c['secret_space']:,} to find such a secret."
            )
        )
    stated = s["claim"].get("run_json_epsilon")
    if isinstance(stated, int | float) and not math.isclose(stated, eps, rel_tol=1e-3):
        words.append(
            f"Note: run.json reports epsilon {_eps(stated)}, but the ledger gives {_eps(eps)}; "
            "the audit compares against the ledger."
        )
    alarm = [false_alarm_sentence(s["false_alarm"])] if "false_alarm" in s else []
    w = s.get("whitebox")
    # the white-box sentences without their own false-alarm rate: the report states the
    # rate of all its tests together, next to its verdict
    wb = [x for x in whitebox_verdict(w)[1] if not x.startswith("False alarms")] if w else []
    if w and w["privacy_bug_suspected"]:
        return "bug", wb[:1] + alarm + wb[1:] + words
    words += wb
    if not s["privacy_guarantee"]:
        return "none", [
            "This run has NO privacy guarantee: it was trained without noise (the ledger's "
            "epsilon is infinite), so nothing limits what the model reveals about a record.",
            *words,
        ]
    if s["privacy_bug_suspected"]:
        over = [
            {
                "one_run": "the one-run bound",
                "clopper_pearson": "the Clopper-Pearson bound",
                "whitebox": "the white-box bound",
            }[k]
            for k, b in bounds.items()
            if b["epsilon"] > eps
        ]
        return "bug", [
            f"LIKELY PRIVACY BUG: {' and '.join(over)} show, at {conf:.0%} confidence, that this "
            f"training is not ({_eps(lower)}, {delta:.3g})-DP, yet the accountant claims "
            f"({_eps(eps)}, {delta:.3g})-DP. The ledger under-reports what training did (noise, "
            "sampling or clipping), or the implementation leaks more than its analysis allows. "
            "Do not release this model; investigate the run.",
            *alarm,
            *words,
        ]
    return "ok", [
        f"Consistent with the guarantee: the empirical lower bound epsilon >= {_eps(lower)} "
        f"({conf:.0%} confidence) is below the accountant's epsilon = {_eps(eps)} at delta "
        f"{delta:.3g}.",
        *alarm,
        *words,
        "A lower bound far below the accountant's epsilon is normal: audits of one run with few "
        "canaries are loose, so this does not show the guarantee is loose.",
    ]


_TEST_NAMES = {
    "ledger_bound": "the f-DP test of the ledger's curve",
    "sampling_check": "the sampling check",
    "noise_check": "the noise check",
    "key_replay": "the key replay check",
    "one_run": "the one-run bound",
    "clopper_pearson": "the Clopper-Pearson bound (nominal)",
    "whitebox": "the white-box audit",
}


def _pct(x: float) -> str:
    return f"{100 * x:.3g}%"


def false_alarm_sentence(fa: dict[str, Any]) -> str:
    """The false-alarm rate of a correct run, in words, with how the tests' rates combine
    (``fa``: :func:`attacks.whitebox.false_alarm` or :func:`attacks.audit.false_alarm`)."""
    tests = fa["per_test"]
    if not tests:
        return "False alarms: no test was run, so nothing can be flagged."
    parts = " + ".join(f"{_pct(v)} for {_TEST_NAMES[k]}" for k, v in tests.items())
    if len(tests) == 1:
        how = "one test"
    else:
        how = (
            "each test is stated at that confidence, not corrected for the others; a flag "
            "from any of them is the verdict, so their rates add"
        )
    return (
        f"False alarms: at {_pct(fa['confidence'])} confidence a correct run is flagged with "
        f"probability at most {_pct(fa['at_most'])} ({parts}; {how}). A single flag is evidence, "
        "not proof: rerun the audit, or raise audit.confidence, to confirm it."
    )


def whitebox_verdict(w: dict[str, Any]) -> tuple[str, list[str]]:
    """``(level, sentences)`` of a white-box audit (:mod:`attacks.whitebox`): "bug" or "ok"."""
    b, c, conf = w["bounds"], w["ceiling"], w["confidence"]
    claim, delta = w["claimed_epsilon"], w.get("delta_total", w["delta"])  # as the run states it
    led = b["ledger"]
    mech = (
        f"Poisson-subsampled Gaussian steps at q={w['sample_rate']:.3g}, noise multiplier "
        f"{w['noise_multiplier']:.3g}, {w['steps']} steps, {w['groups']} clip group(s)"
    )
    evidence = (
        f"{w['canaries']} white-box canaries ({w['members']} of them trained on, by secret coin), "
        "an auditor who sees every released update: "
        + (
            f"the updates are less private than they would be with {led['noise_factor']:.3g} "
            f"times the recorded noise, which the {w['accountant']} accountant charges epsilon "
            f"{_eps(led['epsilon'])}"
            if led["epsilon"] > 0
            else "no trade-off curve of the ledger's family is rejected"
        )
        + f"; the f-DP bound (Gaussian curve) is {_eps(b['fdp']['epsilon'])} and Steinke et "
        f"al.'s {_eps(b['one_run']['epsilon'])}, at {conf:.0%} confidence."
    )
    reach = (
        f"The most {w['canaries']} canaries can show is {_eps(c['ledger'])} (ledger curve), "
        f"{_eps(c['fdp'])} (f-DP), {_eps(c['one_run'])} (Steinke et al.)"
    )
    p = w.get("perfect")
    if p:
        reach += (
            f"; a perfect attacker on the exact claimed mechanism certifies {_eps(p['ledger'])} "
            f"(median of {p['simulations']} simulated runs)"
        )
    words = [evidence, reach + "."]
    samp = w.get("sampling") or {}
    if samp.get("applicable"):
        words.append(
            f"Sampling check ({samp['members']} member canaries, {samp['steps']} steps): the "
            f"autocovariance of their projections within an epoch of 1/q steps has Z = "
            f"{samp['z']:.2f} (p = {samp['p_value']:.3g}, flagged below "
            f"{1 - samp['confidence']:.2g}; Poisson sampling: standard normal; a shuffle per "
            f"epoch would shift it by about {samp['shuffler_shift']:.1f})."
        )
    elif samp:
        words.append(f"Sampling check not applicable: {samp['reason']}.")
    noise = w.get("noise") or {}
    if noise.get("applicable"):
        t = noise["tests"]
        fresh = t.get("freshness")
        words.append(
            f"Noise check ({noise['values_per_step']:,} canary-free coordinates x "
            f"{noise['steps']} steps, each test at p < {noise['alpha_per_test']:.2g}): variance "
            f"{t['scale']['variance_ratio']:.4f} of the claimed (p = {t['scale']['p_value']:.3g}); "
            + ", ".join(
                f"|z| > {v['k']:g}: {v['count']:,} vs {v['expected']:,.1f} expected"
                for k, v in t.items()
                if k.startswith("tail_")
            )
            + (
                f"; largest |cosine| between two steps' noise {fresh['max_abs_cosine']:.3f} "
                f"(p = {fresh['p_value']:.3g})"
                if fresh
                else ""
            )
            + "."
        )
    elif noise:
        words.append(f"Noise check not applicable: {noise['reason']}.")
    replay = w.get("key_replay") or {}
    if replay:
        words.append(
            "Key replay check: two new runs of this recipe "
            + (
                "draw the SAME noise and coins."
                if replay["replayed"]
                else f"draw different noise (cosine {replay['noise_cosine']:.3f}) and coins "
                f"({replay['coin_agreement']:.1%} agree)."
            )
            + (
                ""
                if replay["secure_keys"]
                else " The run uses privacy.insecure_seed: its randomness is public by design, "
                "and it has NO privacy guarantee against anyone who knows the seed."
            )
        )
    check = w.get("engine_check") or {}
    if check.get("refusal"):
        words.append(
            f"Engine check not applicable: the engine refuses its batches ({check['refusal']})."
        )
    elif check:
        words.append(
            f"Engine check (deterministic; the run's model at its starting point, its first "
            f"{check['records']} records, {check['dtype']}): the engine's clipped update differs "
            f"from the explicit per-example loop's by {check['total_error']:.1e} (relative; "
            f"tolerance {check['tolerance']:.0e})"
            + (
                f", and {check['neighbour_tests']} neighbour tests (a batch's sum against the "
                f"sum without its longest or shortest record plus that record's, collated alone) "
                f"by at most {check['neighbour_error']:.1e}."
                if check["neighbour_tests"]
                else "."
            )
        )
    bugs = []
    if check.get("flagged"):
        bugs.append(
            "LIKELY PRIVACY BUG (white-box audit): the engine's per-sample clipped gradients on "
            "this run's model are not the mechanism's: "
            + (
                f"the clipped update is off by {check['total_error']:.1e} against the explicit "
                f"per-example loop (worst layer {check['worst_layer']}); "
                if check["total_error"] > check["tolerance"]
                else ""
            )
            + (
                f"removing one record changes the others' clipped gradients (neighbour error "
                f"{check['neighbour_error']:.1e}), so one record moves the release by more than "
                "the clip; "
                if check["neighbour_error"] > check["tolerance"]
                else ""
            )
            + f"the tolerance is {check['tolerance']:.0e}. The canaries above inject their "
            "gradients and cannot see this. Do not release this model; run `dptrain check` on "
            "the recipe for the layer at fault."
        )
    if w.get("bound_rejects_claim", w["privacy_bug_suspected"]):
        bugs.append(
            f"LIKELY PRIVACY BUG (white-box audit): at {conf:.0%} confidence the released updates "
            f"are less private than the mechanism the ledger records ({mech}): the f-DP test "
            f"rejects the ledger's own trade-off curve, so the implementation leaks more than "
            f"the claimed ({_eps(claim)}, {delta:.3g})-DP. Do not release this model; check "
            "noise, clipping and sampling."
        )
    if samp.get("flagged"):
        bugs.append(
            f"LIKELY PRIVACY BUG (white-box audit): not Poisson sampling. At "
            f"{samp['confidence']:.2%} confidence the member canaries' inclusions are negatively correlated across the "
            "steps of an epoch (p = "
            f"{samp['p_value']:.3g}), as when records are taken once per epoch (a shuffle cut "
            "into batches) instead of independently with probability q at every step: the "
            "accountant's subsampling analysis does not apply, so the claimed "
            f"({_eps(claim)}, {delta:.3g})-DP is not shown. Do not release this model; check "
            "the sampler (it must be Poisson, as dptrain.sampling.PoissonSampler)."
        )
    if noise.get("flagged"):
        names = {
            "scale": "its variance is below the claimed",
            "freshness": "two steps' noise is the same draw (replayed)",
            "tensors": "two parameter tensors get the same noise (a counter without the "
            "tensor's place)",
        }
        why = "; ".join(names.get(k, f"too few values beyond {k[5:]} std") for k in noise["failed"])
        bugs.append(
            f"LIKELY PRIVACY BUG (white-box audit): the released noise is not the claimed "
            f"Gaussian. At {noise['confidence']:.2%} confidence, on coordinates that carry "
            f"noise alone: {why}. The accountant assumes fresh, full-tailed N(0, (sigma C)^2) "
            f"noise every step, so the claimed ({_eps(claim)}, {delta:.3g})-DP is not shown. "
            "Do not release this model; check the noise sampler and its counter."
        )
    if replay.get("flagged"):
        bugs.append(
            "LIKELY PRIVACY BUG (white-box audit): two new runs of this recipe draw the same "
            "noise or coins, so the run's randomness follows from public inputs (the recipe) "
            "and hides nothing from anyone who reruns it. Check how the run key is made "
            "(dptrain.train.run_key_for must draw from the OS CSPRNG)."
        )
    alarm = [false_alarm_sentence(w["false_alarm"])] if "false_alarm" in w else []
    if bugs:
        return "bug", [*bugs, *alarm, *words]
    return "ok", [
        f"White-box audit consistent with the ledger ({mech}): the empirical lower bound "
        f"{_eps(led['epsilon'])} is below the claimed epsilon {_eps(claim)} at delta "
        f"{delta:.3g}.",
        *alarm,
        *words,
    ]


def _whitebox_table(w: dict[str, Any]) -> str:
    b, c, p = w["bounds"], w["ceiling"], w.get("perfect") or {}
    names = {
        "ledger": "f-DP, the ledger's own curve (verdict)",
        "fdp": "f-DP, Gaussian curve (Mahloujifar et al. 2024)",
        "one_run": "(ε, δ) one run (Steinke et al. 2023)",
    }
    rows = "".join(
        f"<tr><td>{names[k]}</td><td>{_eps(b[k]['epsilon'])}</td><td>{_eps(c[k])}</td>"
        f"<td>{_eps(p[k]) if k in p else '—'}</td></tr>"
        for k in names
    )
    samp = w.get("sampling") or {}
    if samp.get("applicable"):
        rows += (
            "<tr><td>sampling check: Poisson? (Z of the within-epoch autocovariance)</td>"
            f"<td>Z = {samp['z']:.2f}, p = {samp['p_value']:.3g}"
            f"{' — NOT POISSON' if samp['flagged'] else ''}</td>"
            f"<td>shuffler: Z ≈ {samp['shuffler_shift']:.1f}</td><td>correct run: Z ~ N(0, 1)</td></tr>"
        )
    noise = w.get("noise") or {}
    for name, t in (noise.get("tests") or {}).items():
        failed = " — FAILED" if name in noise["failed"] else ""
        rows += (
            f"<tr><td>noise check: {html.escape(t['test'])}</td>"
            f"<td>p = {t['p_value']:.3g}{failed}</td>"
            f"<td>flagged below {noise['alpha_per_test']:.2g}</td><td>—</td></tr>"
        )
    return (
        f"<table><tr><th>bound at {w['confidence']:.0%} confidence</th><th>ε ≥</th>"
        f"<th>ceiling ({w['canaries']} canaries)</th><th>perfect attacker (median)</th></tr>"
        f"<tr><td>accountant ({html.escape(w['accountant'])}), the claim</td>"
        f"<td>{_eps(w['claimed_epsilon'])} (upper bound)</td><td>—</td><td>—</td></tr>"
        + rows
        + "</table>"
    )


def whitebox_section(w: dict[str, Any]) -> str:
    level, words = whitebox_verdict(w)
    return (
        "<h2>White-box audit of the privacy configuration</h2>"
        f"<div class='box {level}'>"
        + "".join(f"<p>{html.escape(x)}</p>" for x in words)
        + "</div>"
        + _whitebox_table(w)
        + "<p class=note>The canaries are records whose per-sample gradients the auditor chose "
        "(clipped in every group), each trained on with probability 1/2 and Poisson-sampled like "
        "any record, injected into the run's own engine; the auditor scores each by the "
        "likelihood ratio of the subsampled Gaussian mechanism on the released updates. This is "
        "the threat model the accountant covers, so a bound above the claim is a bug, not a "
        "loose analysis. The ceiling is what the canary count allows at this confidence whatever "
        "training did; the perfect attacker shows what any attacker could certify against a "
        "correct run with these canaries. The sampling check tests what the bounds cannot see: "
        "under Poisson sampling a member's inclusions are independent across steps, so its "
        "projections are uncorrelated; a sampler that takes each record once per epoch makes "
        "them negatively correlated within an epoch. The noise check reads coordinates no canary "
        "touches, which in a canary-only audit carry noise alone: their variance, their tails "
        "and their freshness across steps must be those of the claimed Gaussian.</p>"
    )


def write_whitebox(out_dir: Path, w: dict[str, Any]) -> None:
    """Write ``whitebox.json`` and a self-contained ``whitebox.html`` into ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(out_dir / "whitebox.json", lambda f: json.dump(_jsonable(w), f, indent=2))
    page = (
        "<!doctype html><html><head><meta charset='utf-8'><title>White-box privacy audit</title>"
        f"<style>{_CSS}</style></head><body><h1>White-box privacy audit</h1>"
        f"<p class=note>{html.escape(str(w.get('run_dir', '')))}</p>"
        + whitebox_section(w)
        + "</body></html>"
    )
    atomic_write(out_dir / "whitebox.html", lambda f: f.write(page))


# -- terminal ----------------------------------------------------------------------------------


def print_table(s: dict[str, Any], out: TextIO) -> None:
    lines = [
        "",
        f"audit of            {s['run_dir']}",
        f"accountant epsilon  {_eps(s['accountant_epsilon'])} at delta {s['delta']:.3g} ({s['accountant']})",
        "",
        f"{'attack':<18}{'AUC':>7}{'TPR@0.1%':>10}{'TPR@1%':>9}",
    ]
    for a in s["attacks"].values():
        lines.append(
            f"{a['label']:<18}{a['auc']:>7.3f}{a['tpr_at_fpr_0.001']:>10.3f}{a['tpr_at_fpr_0.01']:>9.3f}"
        )
    u = s["records"].get("unscored") or {}
    if any(u.values()):
        lines.append(
            f"left out           {u['members']} members, {u['non_members']} non-members, "
            f"{u['population']} population records: no scored token within data.max_length"
        )
    lines.append("")
    c = s.get("canaries")
    if c and c.get("exposure_by_repetitions"):
        exp = ", ".join(f"x{k}: {v:.1f}" for k, v in c["exposure_by_repetitions"].items())
        lines.append(f"canary exposure     {exp} bits (max {c['max_exposure']:.1f})")
    for key, label in (("one_run", "one run"), ("clopper_pearson", "Clopper-Pearson")):
        b = s["epsilon_lower_bounds"].get(key)
        if b:
            lines.append(
                f"epsilon >= ({label:<15}) {_eps(b['epsilon'])} at {b['confidence']:.0%} confidence"
            )
    w = s.get("whitebox")
    if w:
        lines.append(
            f"epsilon >= (white box      ) {_eps(w['bounds']['ledger']['epsilon'])} "
            f"(f-DP {_eps(w['bounds']['fdp']['epsilon'])}, ceiling {_eps(w['ceiling']['ledger'])}, "
            f"{w['canaries']} canaries)"
        )
        samp = w.get("sampling") or {}
        if samp.get("applicable"):
            lines.append(
                f"sampling check      Z = {samp['z']:.2f}, p = {samp['p_value']:.3g}: "
                + ("NOT Poisson sampling" if samp["flagged"] else "consistent with Poisson")
            )
    level, words = verdict(s)
    lines += ["", {"bug": "!! ", "none": "!  ", "ok": ""}[level] + words[0]]
    if level != "none" and "false_alarm" in s:
        lines.append(false_alarm_sentence(s["false_alarm"]))
    lines += [f"report              {Path(s['run_dir']) / 'audit' / 'report.html'}"]
    lines += [f"audit time          {s['seconds']['total']:.0f} s (mostly {s['dominated_by']})", ""]
    print("\n".join(lines), file=out, flush=True)


# -- plots -------------------------------------------------------------------------------------


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _roc_plot(s: dict[str, Any], attacks: dict[str, dict[str, Any]]) -> str:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.6, 4.6), layout="constrained")
    floor = 1.0
    for i, (_, a) in enumerate(attacks.items()):
        r = a["roc"]
        floor = min(floor, 0.5 / r.negatives)
        ax.plot(
            np.maximum(r.fpr, floor), np.maximum(r.tpr, floor), color=_COLORS[i % 7],
            label=f"{a['label']} (AUC {a['auc']:.3f})", drawstyle="steps-post",
        )  # fmt: skip
    grid = np.logspace(math.log10(floor), 0, 200)
    ax.plot(grid, grid, ":", color="gray", label="random guessing")
    eps, delta = s["accountant_epsilon"], s.get("delta_total", s["delta"])  # the guarantee's
    if math.isfinite(eps):
        bound = np.minimum.reduce(
            [
                np.ones_like(grid),
                math.exp(eps) * grid + delta,
                1 - math.exp(-eps) * (1 - delta - grid),
            ]
        )
        ax.plot(grid, bound, "--", color="black", label=f"limit of ({_eps(eps)}, {delta:.2g})-DP")
    ax.set(xscale="log", yscale="log", xlim=(floor, 1), ylim=(floor, 1.05))
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title="ROC (log-log)")
    ax.legend(fontsize=7, loc="lower right")
    ax.grid(alpha=0.3, which="both")
    return _png(fig)


def _histograms(attacks: dict[str, dict[str, Any]], is_member: np.ndarray) -> str:
    import matplotlib.pyplot as plt

    items = list(attacks.items())
    cols = min(len(items), 4)
    rows = math.ceil(len(items) / cols)
    fig, axes = plt.subplots(
        rows, cols, figsize=(3.2 * cols, 2.5 * rows), squeeze=False, layout="constrained"
    )
    for ax in axes.flat[len(items) :]:
        ax.axis("off")
    for ax, (_, a) in zip(axes.flat, items, strict=False):
        sc = a["scores"]
        bins = np.histogram_bin_edges(sc, bins=30)
        for mask, color, label in (
            (~is_member, "#1f77b4", "non-members"),
            (is_member, "#d62728", "members"),
        ):
            style = {"alpha": 0.55, "density": True, "histtype": "stepfilled"}
            ax.hist(sc[mask], bins=bins, color=color, label=label, **style)
        ax.set_title(a["label"], fontsize=9)
        ax.tick_params(labelsize=7)
    axes.flat[0].legend(fontsize=7)
    fig.suptitle("membership scores (higher = more likely a member)", fontsize=10)
    return _png(fig)


def _exposure_plot(c: dict[str, Any]) -> str:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.2, 3.6), layout="constrained")
    ks = sorted({r["repetitions"] for r in c["exposure"]})
    pos = {k: i for i, k in enumerate(ks)}
    xs = [pos[r["repetitions"]] for r in c["exposure"]]
    ys = [r["exposure"] for r in c["exposure"]]
    ax.scatter(xs, ys, color="#d62728", zorder=3, label="canary")
    means = [np.mean([r["exposure"] for r in c["exposure"] if r["repetitions"] == k]) for k in ks]
    ax.plot(range(len(ks)), means, "-", color="#d62728", alpha=0.5)
    ax.axhline(
        c["max_exposure"], ls="--", color="black", label=f"maximum ({c['max_exposure']:.1f} bits)"
    )
    ax.axhline(c["random_exposure"], ls=":", color="gray", label="unseen secret (~1.4 bits)")
    ax.set_xticks(range(len(ks)), ["not inserted" if k == 0 else f"x{k}" for k in ks])
    ax.set(xlabel="times the canary was in the training data", ylabel="exposure (bits)")
    ax.set(ylim=(0, c["max_exposure"] * 1.08), title="canary exposure by repetition count")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    return _png(fig)


def _canary_scores_plot(c: dict[str, Any]) -> str:
    import matplotlib.pyplot as plt

    inc, exc = c["one_run_scores"]["included"], c["one_run_scores"]["excluded"]
    fig, ax = plt.subplots(figsize=(5.2, 3.2), layout="constrained")
    bins = np.histogram_bin_edges(np.r_[inc, exc], bins=30)
    ax.hist(exc, bins=bins, alpha=0.55, color="#1f77b4", label="not trained on")
    ax.hist(inc, bins=bins, alpha=0.55, color="#d62728", label="trained on")
    ax.set(xlabel="log-likelihood gained in training (nats)", ylabel="canaries")
    ax.set_title("single canaries: the one-run audit's scores", fontsize=10)
    ax.legend(fontsize=7)
    return _png(fig)


# -- html --------------------------------------------------------------------------------------

_CSS = """
body { font-family: -apple-system, Segoe UI, Helvetica, Arial, sans-serif; max-width: 980px;
       margin: 2em auto; color: #222; line-height: 1.45; padding: 0 1em; }
h1 { font-size: 1.5em; } h2 { font-size: 1.15em; margin-top: 1.8em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: .6em 0; font-size: .92em; }
td, th { border: 1px solid #ddd; padding: 3px 9px; text-align: right; }
th { background: #f4f4f4; } td:first-child, th:first-child { text-align: left; }
.box { padding: .8em 1em; border-radius: 6px; margin: 1em 0; }
.bug { background: #fde8e8; border: 2px solid #c00; color: #a00; }
.none { background: #fff4e0; border: 2px solid #e08a00; color: #7a4a00; }
.ok { background: #eaf6ea; border: 1px solid #4a4; }
.note { color: #555; font-size: .9em; }
img { max-width: 100%; }
"""


def _attack_table(s: dict[str, Any]) -> str:
    rows = "".join(
        f"<tr><td>{html.escape(a['label'])}</td><td>{a['auc']:.3f}</td>"
        f"<td>{a['tpr_at_fpr_0.001']:.3f}</td><td>{a['tpr_at_fpr_0.01']:.3f}</td>"
        f"<td>{_eps(a.get('clopper_pearson', 0.0))}</td></tr>"
        for a in s["attacks"].values()
    )
    skipped = "".join(
        f"<li>{html.escape(k)}: {html.escape(v)}</li>" for k, v in s["skipped_attacks"].items()
    )
    return (
        "<table><tr><th>attack</th><th>AUC</th><th>TPR at FPR 0.1%</th><th>TPR at FPR 1%</th>"
        "<th>ε ≥ (Clopper-Pearson)</th></tr>"
        + rows
        + "</table>"
        + (f"<div class=note>Not run:<ul>{skipped}</ul></div>" if skipped else "")
    )


def _bounds_table(s: dict[str, Any]) -> str:
    b = s["epsilon_lower_bounds"]
    rows = [
        f"<tr><td>accountant ({html.escape(s['accountant'])}), the claim</td><td>{_eps(s['accountant_epsilon'])}</td><td>upper bound</td><td>—</td></tr>"
    ]
    if "one_run" in b:
        o = b["one_run"]
        rows.append(
            f"<tr><td>one training run (Steinke, Nasr, Jagielski 2023)</td><td>{_eps(o['epsilon'])}</td>"
            f"<td>{o['correct']} of {o['guesses']} guesses right on {o['canaries']} canaries "
            f"(ceiling {_eps(o['ceiling'])})</td><td>{o['confidence']:.0%}</td></tr>"
        )
    if "clopper_pearson" in b:
        o = b["clopper_pearson"]
        rows.append(
            f"<tr><td>attack TPR/FPR, Clopper-Pearson (Jagielski et al. 2020)</td><td>{_eps(o['epsilon'])}</td>"
            f"<td>{html.escape(o['attack'])}: TPR {o['tpr']:.3f}, FPR {o['fpr']:.3f} on "
            f"{o['members']} + {o['non_members']} held-back records</td><td>{o['confidence']:.0%}</td></tr>"
        )
    return (
        "<table><tr><th>epsilon at delta "
        + f"{s['delta']:.3g}"
        + "</th><th>ε</th><th>evidence</th>"
        "<th>confidence</th></tr>" + "".join(rows) + "</table>"
    )


def render_figures(
    s: dict[str, Any],
    attacks: dict[str, dict[str, Any]],
    is_member: np.ndarray,
    canaries: dict[str, Any] | None,
) -> dict[str, str]:
    """The report's plots as PNG data URIs."""
    import matplotlib

    matplotlib.use("Agg")
    figs = {"roc": _roc_plot(s, attacks), "histograms": _histograms(attacks, is_member)}
    if canaries and canaries.get("exposure"):
        figs["exposure"] = _exposure_plot(canaries)
    if canaries and "one_run_scores" in canaries:
        figs["canary_scores"] = _canary_scores_plot(canaries)
    return figs


def _unscored_note(s: dict[str, Any]) -> str:
    """The records left out of the attacks for having no scored token (or nothing)."""
    u = s["records"].get("unscored") or {}
    if not any(u.values()):
        return ""
    return (
        f" Left out: {u['members']} training, {u['non_members']} held-out and "
        f"{u['population']} population records with no scored token within data.max_length "
        "(their responses are cut off, so they have no loss to score; training gave them a "
        "zero gradient)."
    )


def write_report(
    out_dir: Path, s: dict[str, Any], figures: dict[str, str], canaries: dict[str, Any] | None
) -> None:
    """Write ``summary.json`` and ``report.html`` into ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(out_dir / "summary.json", lambda f: json.dump(_jsonable(s), f, indent=2))
    level, words = verdict(s)
    parts = [
        f"<h1>Privacy audit of {html.escape(s['name'])}</h1>",
        f"<p class=note>{html.escape(s['run_dir'])} · {html.escape(s['model'])} · "
        f"{s['dataset_size']} training records · claim: ({_eps(s['accountant_epsilon'])}, "
        f"{s['delta']:.3g})-DP per record by the {html.escape(s['accountant'])} accountant</p>",
        f"<div class='box {level}'>"
        + "".join(f"<p>{html.escape(w)}</p>" for w in words)
        + "</div>",
        "<h2>Empirical epsilon</h2>",
        "<p>An audit can only show that privacy is <em>at least this bad</em> (a lower bound); the "
        "accountant shows it is <em>at most this bad</em> (an upper bound). A lower bound above the "
        "upper bound is impossible for a correct run.</p>",
        _bounds_table(s),
        "<p class=note>The one-run bound is rigorous: canaries are included independently with "
        "probability 1/2, and the guess counts are fixed in advance (Bonferroni over "
        f"{s['epsilon_lower_bounds'].get('one_run', {}).get('plans', 0)} of them). The "
        "Clopper-Pearson bound treats records as independent trials, which holds across "
        "independent training runs but only approximately among the records of one run: "
        "read it as indicative.</p>",
        "<h2>Membership inference</h2>",
        f"<p>{s['records']['n_members']} training records against {s['records']['n_non_members']} "
        f"records the run never saw (RMIA population: {s['records']['n_population']}). Reference "
        f"models: {html.escape(s['reference_models'])}.{_unscored_note(s)}</p>",
        _attack_table(s),
        f"<img src='{figures['roc']}' alt='ROC curves'>",
        "<p class=note>"
        + (
            "Dashed: the best any attack can do against a run that really is "
            f"({_eps(s['accountant_epsilon'])}, {s['delta']:.3g})-DP. "
            if math.isfinite(s["accountant_epsilon"])
            else "No dashed DP limit: this run has no guarantee. "
        )
        + "With "
        f"{s['records']['n_non_members']} non-members, false positive rates below "
        f"{1 / s['records']['n_non_members']:.2%} cannot be resolved (TPR at FPR 0.1% then means "
        "TPR with no false positive at all).</p>",
        f"<img src='{figures['histograms']}' alt='score histograms'>",
    ]
    if canaries:
        parts += [
            "<h2>Canaries</h2>",
            f"<p>{canaries['count']} secret canaries, {canaries['inserted']} of them inserted into "
            f"the training data (single canaries with probability 1/2, repeated ones always). Secret space: {canaries['secret_space']:,} "
            f"numbers, so exposure is at most {canaries['max_exposure']:.1f} bits. Exposure method: "
            f"{html.escape(canaries.get('exposure_method', ''))}.</p>",
        ]
        if "exposure" in figures:
            parts.append(f"<img src='{figures['exposure']}' alt='exposure by repetition count'>")
        if "canary_scores" in figures:
            parts.append(f"<img src='{figures['canary_scores']}' alt='canary scores'>")
        parts.append(
            "<p class=note>A canary inserted k times is k training records: the per-record "
            "guarantee protects it only through group privacy (roughly k times epsilon), so "
            "exposure growing with k is expected even for a private run. The one-run bound uses "
            "only single canaries.</p>"
        )
    if s.get("whitebox"):
        parts.append(whitebox_section(s["whitebox"]))
    secs = ", ".join(f"{k} {v:.0f} s" for k, v in s["seconds"].items() if k != "total")
    parts += [
        "<h2>About this report</h2>",
        f"<p class=note>Audit time {s['seconds']['total']:.0f} s ({secs}). This report holds "
        "statistics of private training records and the canary answers: keep it with the private "
        "data, like <code>private/metrics.jsonl</code> and <code>canaries.secret.json</code>; do not "
        "publish it with the model.</p>",
    ]
    page = (
        "<!doctype html><html><head><meta charset='utf-8'><title>Privacy audit</title>"
        f"<style>{_CSS}</style></head><body>" + "\n".join(parts) + "</body></html>"
    )
    atomic_write(out_dir / "report.html", lambda f: f.write(page))
