"""A run's figures: report/privacy.png plots the accountant's epsilon of the ledger's prefixes
and reads only public files; private/training.png plots private/metrics.jsonl."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("matplotlib")
import matplotlib.image

from accountants import Event, Ledger, get_accountant
from dptrain.cli import main
from dptrain.commands.train import draw_figures
from dptrain.figures import (
    POINTS,
    curve_steps,
    headline,
    prefix,
    render_run,
    training_figure,
)
from dptrain.rundir import PUBLIC_FILES, README, RunDir

DELTA = 1e-5
EVENTS = [Event(0.02, 1.1, 90), Event(0.02, 1.6, 60), Event(0.04, 1.6, 30)]


def run_dir(tmp_path: Path, *, adaptive: bool = False, name: str = "r") -> RunDir:
    """A run directory as `dptrain train` leaves it: a real ledger, run.json through
    RunDir.write_meta, private metrics and stats, a key and a checkpoint."""
    run = RunDir(tmp_path / name)
    run.path.mkdir()
    run.write_readme()
    run.save_ledger(Ledger(EVENTS))
    run.write_meta(
        {"name": "fig", "delta": DELTA, "accountant": "rdp", "epsilon_budget": 4.0}
        | {"adaptive": adaptive, "status": "finished", "steps": 180}
    )
    for t in range(1, 181):
        rec = {"step": t, "loss": 3.0 * math.exp(-t / 90) + 0.05 * (t % 3), "batch_size": 9}
        rec |= {"epsilon": 0.0, "noise_multiplier": 1.1, "seconds": 0.01, "applied": True}
        if t % 30 == 0:
            rec |= {"val_perplexity": 30.0 - t / 10, "rl_reward": t / 180}
        if t == 7:
            rec["loss"] = math.nan  # a step whose every sample was non-finite
        run.log(rec)
    run.update_stats(validation_before={"perplexity": 31.0}, validation_after={"perplexity": 11.5})
    run.key.write_text("secret")
    (run.checkpoints).mkdir()
    (run.checkpoints / "step-00000180.pt").write_bytes(b"private state")
    return run


def decodes(path: Path) -> tuple[int, ...]:
    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and image.shape[0] > 200 and image.shape[1] > 200
    return image.shape


def test_curve_steps_are_bounded_and_end_at_the_last_step():
    assert curve_steps(0) == [0] and curve_steps(5) == [0, 1, 2, 3, 4, 5]
    steps = curve_steps(10_007)
    assert steps[0] == 0 and steps[-1] == 10_007 and len(steps) <= POINTS + 2
    assert steps == sorted(set(steps))
    assert [e.steps for e in prefix(EVENTS, 100)] == [90, 10]
    with pytest.raises(ValueError, match="fewer than"):
        prefix(EVENTS, 181)


def test_privacy_figure_plots_the_run_accountants_epsilon(tmp_path, capsys):
    run = run_dir(tmp_path)
    public, training = render_run(run.path)
    assert public.path == run.path / "report" / "privacy.png" and decodes(public.path)
    rdp, pld = get_accountant("rdp"), get_accountant("pld")
    assert public.steps.tolist() == curve_steps(180) and public.steps[-1] == 180
    expected = [rdp.epsilon(prefix(EVENTS, k), DELTA) if k else 0.0 for k in public.steps]
    assert public.epsilon.tolist() == expected  # the accountant's values, unchanged
    assert np.all(np.diff(public.epsilon) > 0) and public.budget == 4.0
    assert headline(public) == f"ε = {public.epsilon[-1]:.4g} at δ = 1e-05 after 180 steps (rdp)"
    # the last point is what `dptrain epsilon --run` reports for the run
    assert main(["epsilon", "--run", str(run.path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["epsilon"] == public.epsilon[-1]
    s, e = public.cross_checks["pld"]
    assert s.tolist() == curve_steps(180, 12) and e[-1] == pld.epsilon(EVENTS, DELTA)
    assert e.tolist() == [pld.epsilon(prefix(EVENTS, k), DELTA) if k else 0.0 for k in s]
    # three mechanisms: sigma and q per step
    assert public.edges.tolist() == [0, 90, 150, 180]
    assert public.noise_multiplier.tolist() == [1.1, 1.6, 1.6]
    assert public.sample_rate.tolist() == [0.02, 0.02, 0.04]
    assert training is not None and training.path == run.private / "training.png"
    decodes(training.path)


def test_a_slow_accountant_s_curve_is_thinned(tmp_path, monkeypatch):
    import dptrain.figures as figures

    monkeypatch.setattr(figures, "CURVE_SECONDS", 1e-9)  # as if every query were slow
    d = figures.privacy_figure(EVENTS, tmp_path / "p.png", delta=DELTA, accountant="rdp")
    # the last and the middle one (they time the rest), MIN_POINTS of the rest from step 0
    assert len(d.steps) == 2 + figures.MIN_POINTS and d.steps[0] == 0 and d.steps[-1] == 180
    assert set(d.steps) <= set(curve_steps(180))
    rdp = get_accountant("rdp")
    assert d.epsilon.tolist() == [
        rdp.epsilon(prefix(EVENTS, k), DELTA) if k else 0.0 for k in d.steps
    ]


def test_public_figure_reads_no_private_file(tmp_path):
    run = run_dir(tmp_path)
    public, _ = render_run(run.path)
    with_private = public.path.read_bytes()
    for private in (run.private, run.checkpoints):
        shutil.rmtree(private)
    run.key.unlink()
    public.path.unlink()
    public, training = render_run(run.path)
    assert training is None  # no private/metrics.jsonl: no private figure
    assert public.path.read_bytes() == with_private  # the same figure, byte for byte
    assert "report/privacy.png" in PUBLIC_FILES and "report/privacy.png" in README


def test_adaptive_run_plots_the_adaptive_conversion_against_the_filter_budget(tmp_path):
    run = run_dir(tmp_path, adaptive=True)
    public, _ = render_run(run.path, private=False)
    rdp = get_accountant("rdp")
    expected = [rdp.adaptive_epsilon(prefix(EVENTS, k), DELTA) if k else 0.0 for k in public.steps]
    assert public.adaptive and public.epsilon.tolist() == expected
    assert public.cross_checks == {}  # non-adaptive accountants do not hold for this run
    assert public.budget == 4.0
    assert not (run.private / "training.png").exists()
    # the certified guarantee is the budget: the spend is shown as an odometer only
    assert headline(public).startswith("guarantee ε = 4 (the privacy filter's budget) at δ")
    assert headline(public).endswith(f"spent so far {public.epsilon[-1]:.4g}")


def test_training_figure_plots_the_metrics(tmp_path):
    run = run_dir(tmp_path)
    d = training_figure(run.read_metrics(), run.private / "training.png", stats=run.read_stats())
    assert 7 not in d.steps and len(d.steps) == 179  # the non-finite loss is left out
    assert d.loss[0] == 3.0 * math.exp(-1 / 90) + 0.05 and len(d.smoothed) == len(d.loss)
    assert d.smoothed[0] == d.loss[0] and d.loss.min() <= d.smoothed[-1] <= d.loss.max()
    s, v = d.validation["perplexity"]
    assert s.tolist() == [0, 30, 60, 90, 120, 150, 180, 180]  # before, logged, after
    assert v[0] == 31.0 and v[-1] == 11.5 and v[1] == 27.0
    assert list(d.diagnostics) == ["rl_reward"]  # the standard keys are not diagnostics
    assert d.diagnostics["rl_reward"][1].tolist() == [t / 180 for t in range(30, 181, 30)]
    decodes(d.path)


def test_epsilon_plot_flag(tmp_path, capsys):
    run = run_dir(tmp_path)
    assert main(["epsilon", "--run", str(run.path), "--plot", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["figures"] == {
        "public": str(run.path / "report" / "privacy.png"),
        "private": str(run.private / "training.png"),
    }
    decodes(Path(out["figures"]["public"]))
    own = Path(out["figures"]["public"]).read_bytes()
    # another delta or accountant draws beside the run's figure, which keeps its guarantee
    args = ["epsilon", "--run", str(run.path), "--plot", "--json", "--delta", "1e-6"]
    assert main([*args, "--accountant", "pld"]) == 0
    other = Path(json.loads(capsys.readouterr().out)["figures"]["public"])
    assert other == run.path / "report" / "privacy-pld-delta1e-06.png"
    decodes(other)
    assert (run.path / "report" / "privacy.png").read_bytes() == own
    assert main(["epsilon", "--steps", "3", "--delta", "1e-5", "--plot"]) == 2
    assert "add --run RUN_DIR" in capsys.readouterr().err


def test_train_draws_figures_and_never_fails_on_them(tmp_path, capsys):
    run = run_dir(tmp_path)
    draw_figures(run.path)
    line = capsys.readouterr().out.strip()
    assert line.startswith("figures ") and "privacy.png (public)" in line
    assert "training.png (PRIVATE)" in line
    broken = RunDir(tmp_path / "broken")
    broken.path.mkdir()  # no ledger: the figure fails, the run does not
    draw_figures(broken.path)
    line = capsys.readouterr().out.strip()
    assert "not drawn (LedgerNotFoundError" in line and "--plot" in line
    assert "\n" not in line


def test_an_example_strategy_title_states_group_privacy_only_at_a_public_cap(tmp_path, monkeypatch):
    """Strategy example: the title gives the per-person k eps when k is the recipe's cap; an
    uncapped run of an older version (k the data's largest count, a private statistic) gets no
    per-person claim, as `dptrain epsilon --run` refuses one."""
    import dptrain.figures as figures

    titles: list[str] = []
    real = figures.privacy_figure
    monkeypatch.setattr(
        figures, "privacy_figure", lambda *a, **kw: titles.append(kw["title"]) or real(*a, **kw)
    )
    unit = {"unit": "patient", "field": "patient_id", "strategy": "example", "group_size": 8}
    for i, cap in enumerate((8, None)):
        run = run_dir(tmp_path, name=f"r{i}")
        meta = run.read_meta() | {"privacy_unit": unit | {"max_records_per_person": cap}}
        run.write_meta(meta)
        render_run(run.path, private=False)
    assert "per patient: 8ε, group privacy over 8" in titles[0]
    assert "no per-person claim" in titles[1] and "8ε" not in titles[1]
