"""The paper's figures 1b, 2, 3, 4a-c, 7 and 8 redrawn from the runs of one preset (PNG, 800 x 500 pixels).

Each ``figure_*`` draws one figure into ``path`` and returns whether it had data; without data the figure
still exists and says so ("no runs yet"). Every curve names what it measures (extractor and sample count of the
periodic evaluation). An arm with several training seeds (Figs. 1b, 3) is drawn as the seed mean with a band from
the lowest to the highest seed (min-max: with K = 3 a standard deviation is too unstable to draw)."""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

from tcm_core.io.atomic import write_bytes_atomic
from tcm_core.report.claims import stage1_at_split
from tcm_core.report.measurements import (
    ablation_baseline,
    ablation_runs,
    ablation_slice,
    curve,
    dfid_curve,
    final_fid,
    mean_band,
    seed_curves,
    seed_dfid_curves,
)
from tcm_core.report.mid_t_sweep import sweeps
from tcm_core.report.paper import PAPER_DEFAULTS, PAPER_FIG4A_SIGMA_NU
from tcm_core.report.results import Measured, Results, TrainingRun
from tcm_core.report.values import MISSING, fmt, fmt_g, is_finite
from tcm_core.schedules import T_MAX

FIGURES = {
    "fig1b_fid_stages": "Fig. 1b: 1-step FID vs iteration, Stage 1 continued vs Stage 2",
    "fig2_dfid_stage1": "Fig. 2: dFID_t during Stage 1",
    "fig3_dfid_stage2": "Fig. 3: dFID_t, Stage 1 continued vs Stage 2",
    "fig4a_time_density": "Fig. 4a: densities of the Stage-2 time distribution",
    "fig4b_fid_sigma_nu": "Fig. 4b: FID vs iteration for the (sigma, nu) grid",
    "fig4c_fid_rho_wb": "Fig. 4c: FID over the rho x w_b grid",
    "fig7_grad_norm": "Fig. 7: gradient norm, Stages 1 and 2",
    "fig8_dfid_vs_t": "Fig. 8: dFID_t vs t at several Stage-1 iterations",
    "fig_mid_t_sweep": "2-step FID vs the middle time t_mid, per arm (the sweep the paper tuned t_mid by)",
}
FIG_SIZE_IN = (8.0, 5.0)
FIG_DPI = 100  # -> every figure is 800 x 500 pixels
# Fig. 7: a gradient norm above SPIKE_FACTOR x the median of the run's norms so far is circled. (The paper circles
# norms above 100 on ImageNet; norms grow as 1/Δt, so at this scale every Stage-2 step exceeds 100.)
SPIKE_FACTOR = 10.0
MAIN_STAGES = (("stage1", "Stage 1"), ("stage1_continued", "Stage 1 continued"), ("stage2", "Stage 2 (TCM)"))
ITERATION_AXIS = "training iteration (global)"


# ----------------------------------------------------------------------------------------------------------------
# Canvas: one size, one "no data" note, atomic PNG


def _new_figure(ncols: int = 1):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, ncols, figsize=FIG_SIZE_IN, dpi=FIG_DPI, squeeze=False, layout="constrained")
    return fig, list(axes[0])


def _new_axes(title: str, xlabel: str, ylabel: str, **title_style):
    """A one-panel figure with its title and axis labels."""
    fig, (ax,) = _new_figure()
    ax.set_title(title, **title_style)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    return fig, ax


def _empty_message(runs: Sequence[TrainingRun | None], what: str) -> str:
    return f"no {what} in the runs yet" if any(r is not None for r in runs) else "no runs yet"


def _no_data(ax, message: str = "no runs yet") -> None:
    ax.text(0.5, 0.5, message, ha="center", va="center", transform=ax.transAxes, fontsize=13, color="0.35")


def _save(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=FIG_DPI)
    plt.close(fig)
    write_bytes_atomic(path, buffer.getvalue())


def _plot_points(ax, points: Sequence[tuple[float, float]], **style) -> None:
    """A curve with a small marker at every point."""
    ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", markersize=3, **style)


def _t_prime(results: Results) -> float | None:
    """t' of the main Stage-2 run (the dividing time the dFID figures mark)."""
    stage2 = results.main_run("stage2")
    return stage2.param("t_prime") if stage2 else None


# ----------------------------------------------------------------------------------------------------------------
# FID and gradient norm vs iteration: Figs. 1b, 4b, 7


def figure_fig1b(results: Results, path: Path) -> bool:
    """Stage 1 from its start, then the control and Stage 2 side by side from the split point (seed means)."""
    fig, ax = _new_axes(f"Fig. 1b analogue: 1-step FID vs iteration — preset {results.preset}", ITERATION_AXIS,
                        "1-step FID (lower is better)")
    drawn, sources = False, set()
    for stage, name in MAIN_STAGES:
        curves, source = seed_curves(results, results.main_run(stage), "fid_1step")
        if curves:
            _plot_seed_mean(ax, list(curves.values()), name)
            drawn, sources = True, sources | {source}
    regime = stage1_at_split(results)
    if drawn and regime is not None:  # the S1 regime check: how much Stage 1 still gained before the split
        ax.axvspan(regime.tail_start, regime.split, color="0.88", zorder=0,
                   label=f"Stage 1's last {regime.tail_share:.0%}: 1-step FID improved {regime.improvement:.1%}")
    if drawn:
        ax.set_title(f"Fig. 1b analogue: 1-step FID vs iteration — preset {results.preset}\n"
                     f"({'; '.join(sorted(sources))})", fontsize=10)
    return _finish_fid_curves(fig, ax, path, drawn, [results.main_run(s) for s, _ in MAIN_STAGES])


def _plot_seed_mean(ax, curves: list, name: str, say_seeds: bool = True, **style) -> None:
    """One curve per arm: the mean over its training seeds, with a min-max band when there are several (the
    legend says so unless ``say_seeds`` is off: the panel's title says it)."""
    if len(curves) == 1:
        _plot_points(ax, curves[0], label=name, **style)
        return
    rows = mean_band(curves)
    steps = [r[0] for r in rows]
    label = f"{name}, mean of {len(curves)} seeds (band: min-max)" if say_seeds else name
    line = ax.plot(steps, [r[1] for r in rows], marker="o", markersize=3, label=label, **style)[0]
    ax.fill_between(steps, [r[2] for r in rows], [r[3] for r in rows], color=line.get_color(), alpha=0.2)


def figure_fig4b(results: Results, path: Path) -> bool:
    axes = ["student_sigma", "student_nu"]
    slice_ = sorted(ablation_slice(results, axes), key=lambda r: tuple(r.param(a) for a in axes))
    runs = [(run, f"sigma = {fmt_g(run.param(axes[0]))}, nu = {fmt_g(run.param(axes[1]))}") for run in slice_]
    title = f"Fig. 4b analogue: 1-step FID vs iteration for (sigma, nu), seed 0 — preset {results.preset}"
    return _fid_curves_figure(results, path, runs, title, "1-step FID (lower is better)", fontsize=10)


def _fid_curves_figure(
    results: Results, path: Path, runs: list[tuple[TrainingRun | None, str]], title: str, ylabel: str, **title_style
) -> bool:
    """The 1-step FID vs iteration of each (run, name), in one panel."""
    fig, ax = _new_axes(title, ITERATION_AXIS, ylabel, **title_style)
    drawn = False
    for run, name in runs:
        points, source = curve(results, run, "fid_1step")
        if points:
            _plot_points(ax, points, label=f"{name} ({source})")
            drawn = True
    return _finish_fid_curves(fig, ax, path, drawn, [run for run, _ in runs])


def _finish_fid_curves(fig, ax, path: Path, drawn: bool, runs) -> bool:
    """Legend and plain y ticks for FID-vs-iteration curves, or the "no runs yet" note; then save."""
    if drawn:
        ax.ticklabel_format(axis="y", useOffset=False)
        ax.legend()
    else:
        _no_data(ax, _empty_message(runs, "1-step FID"))
    _save(fig, path)
    return drawn


def figure_fig7(results: Results, path: Path) -> bool:
    fig, ax = _new_axes(
        f"Fig. 7 analogue: gradient norm (grad_norm, mean per log window, seed 0) — preset {results.preset}\n"
        f"circles: > {SPIKE_FACTOR:g}x the run's running median (the paper's absolute > 100 marks every step here)",
        ITERATION_AXIS,
        "gradient norm ||g||_2 (log scale)",
        fontsize=10,
    )
    drawn = False
    for stage, name in MAIN_STAGES:
        run = results.main_run(stage)
        points = [p for p in (run.histories.get("grad_norm") or []) if is_finite(p[1])] if run else []
        if points:
            _plot_grad_norm(ax, points, name)
            drawn = True
    if drawn:
        ax.set_yscale("log")
        ax.legend(fontsize=8)
    else:
        runs = [results.main_run(s) for s, _ in MAIN_STAGES]
        _no_data(ax, _empty_message(runs, "grad_norm history"))
    _save(fig, path)
    return drawn


def grad_spikes(points: Sequence[tuple[int, float]], factor: float = SPIKE_FACTOR) -> list[tuple[int, float]]:
    """The points whose norm exceeds ``factor`` x the median of the run's norms up to and including them."""
    import statistics

    return [p for i, p in enumerate(points) if p[1] > factor * statistics.median(v for _, v in points[: i + 1])]


def _plot_grad_norm(ax, points: list[tuple[int, float]], name: str) -> None:
    """One stage's gradient norms, with the spikes (``grad_spikes``) circled."""
    ax.plot([p[0] for p in points], [p[1] for p in points], linewidth=0.8, label=name)
    spikes = grad_spikes(points)
    if spikes:
        ax.scatter(
            [p[0] for p in spikes],
            [p[1] for p in spikes],
            s=80,
            facecolors="none",
            edgecolors="red",
            linewidths=1.5,
            label=f"{name}: {len(spikes)} spike(s) > {SPIKE_FACTOR:g}x running median",
            zorder=3,
        )


# ----------------------------------------------------------------------------------------------------------------
# dFID: Figs. 2, 3, 8


def _t_colours(ts: Sequence[float]):
    import matplotlib.colors as mcolors
    import matplotlib.pyplot as plt

    positive = [t for t in ts if t > 0] or [1.0]
    lo, hi = min(positive), max(positive)
    norm = mcolors.LogNorm(vmin=lo, vmax=hi if hi > lo else lo * 10)
    return norm, plt.get_cmap("viridis")


def _plot_dfid(
    fig, ax, series: dict[float, list[list[tuple[int, float]]]], t_prime: float | None, title: str, empty: str
) -> bool:
    """dFID_t vs iteration, one curve per t coloured by t (dashed below t'), with a t colour bar; several curves
    per t (training seeds) are drawn as their mean with a min-max band."""
    ax.set_title(title, fontsize=9)
    ax.set_xlabel(ITERATION_AXIS)
    ax.set_ylabel("dFID_t (lower is better)")
    if not series:
        _no_data(ax, empty)
        return False
    norm, cmap = _t_colours(list(series))
    for t, curves in series.items():
        below = t_prime is not None and t < t_prime
        style = dict(color=cmap(norm(t)) if t > 0 else "k", linestyle="--" if below else "-")
        _plot_seed_mean(ax, curves, f"t = {t:g}" + (" (< t')" if below else ""), say_seeds=False, **style)
    ax.set_yscale("log")
    ax.legend(fontsize=7, ncols=2)
    _t_colour_bar(fig, ax, norm, cmap, t_prime)
    return True


def _by_t(seed_series: dict[int, dict[float, list[tuple[int, float]]]]) -> dict[float, list]:
    """{seed: {t: curve}} -> {t: [curve of each seed]} (the ts every seed has)."""
    if not seed_series:
        return {}
    ts = sorted(set.intersection(*(set(series) for series in seed_series.values())))
    return {t: [series[t] for series in seed_series.values()] for t in ts}


def _t_colour_bar(fig, ax, norm, cmap, t_prime: float | None) -> None:
    """The colour bar of t, with t' marked in red when it lies in the bar's range."""
    import matplotlib.cm as cm

    bar = fig.colorbar(cm.ScalarMappable(norm=norm, cmap=cmap), ax=ax)
    bar.set_label("t (noise level)")
    if t_prime is not None and norm.vmin <= t_prime <= norm.vmax:
        bar.ax.axhline(t_prime, color="red", linewidth=2)
        bar.ax.text(-0.15, t_prime, "t'", color="red", va="center", ha="right", transform=bar.ax.get_yaxis_transform())


def figure_fig2(results: Results, path: Path) -> bool:
    fig, (ax,) = _new_figure()
    run = results.main_run("stage1")
    series, source = dfid_curve(results, run)
    drawn = _plot_dfid(
        fig,
        ax,
        {t: [points] for t, points in series.items()},
        _t_prime(results),
        f"Fig. 2 analogue: dFID_t during Stage 1 (dashed: t < t') — preset {results.preset}\n({source})",
        _empty_message([run], "dFID_t"),
    )
    _save(fig, path)
    return drawn


def figure_fig3(results: Results, path: Path) -> bool:
    fig, axes = _new_figure(2)
    t_prime = _t_prime(results)
    drawn = False
    for ax, (stage, name) in zip(axes, MAIN_STAGES[1:]):
        run = results.main_run(stage)
        seed_series, source = seed_dfid_curves(results, run)
        seeds = f"\nmean of {len(seed_series)} seeds, band min-max" if len(seed_series) > 1 else ""
        title = f"{name}{seeds}\n({source})" if seed_series else name
        drawn |= _plot_dfid(fig, ax, _by_t(seed_series), t_prime, title, _empty_message([run], "dFID_t"))
    suffix = f", t' = {t_prime:g} in red" if t_prime is not None else ""
    fig.suptitle(f"Fig. 3 analogue: dFID_t vs iteration{suffix} — preset {results.preset}", fontsize=11)
    _save(fig, path)
    return drawn


def figure_fig8(results: Results, path: Path) -> bool:
    series, source = dfid_curve(results, results.main_run("stage1"))
    fig, ax = _new_axes(
        f"Fig. 8 analogue: dFID_t vs t at several Stage-1 iterations — preset {results.preset}\n({source})",
        "t (noise level, log scale)",
        "dFID_t (lower is better)",
        fontsize=10,
    )
    by_step: dict[int, list[tuple[float, float]]] = {}
    for t, points in series.items():
        for step, value in points:
            by_step.setdefault(step, []).append((t, value))
    drawn = bool(by_step)
    if drawn:
        _plot_dfid_by_step(ax, by_step, _t_prime(results))
    else:
        _no_data(ax, _empty_message([results.main_run("stage1")], "dFID_t"))
    _save(fig, path)
    return drawn


def _plot_dfid_by_step(ax, by_step: dict[int, list[tuple[float, float]]], t_prime: float | None) -> None:
    """dFID_t vs t, one curve per iteration (plasma colours, early to late), t' marked."""
    import matplotlib.pyplot as plt

    cmap = plt.get_cmap("plasma")
    steps = sorted(by_step)
    for i, step in enumerate(steps):
        colour = cmap(i / max(len(steps) - 1, 1) * 0.9)
        _plot_points(ax, sorted(by_step[step]), color=colour, label=f"iteration {step}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    if t_prime is not None:
        ax.axvline(t_prime, color="red", linestyle=":", label=f"t' = {t_prime:g}")
    ax.legend(fontsize=7, ncols=2)


# ----------------------------------------------------------------------------------------------------------------
# The Stage-2 time distribution and the (rho, w_b) grid: Figs. 4a, 4c


def _sigma_nu_pairs(results: Results) -> list[tuple[float, float]]:
    pairs = {(r.param("student_sigma"), r.param("student_nu")) for r in ablation_runs(results)}
    return sorted({(s, n) for s, n in pairs if s is not None and n is not None})


def figure_fig4a(results: Results, path: Path) -> bool:
    runs = ablation_runs(results) or results.runs_of("stage2")
    baseline = ablation_baseline(results)
    t_prime = baseline["t_prime"] if baseline["t_prime"] is not None else PAPER_DEFAULTS["t_prime"]
    # without a run that sets t_max: the paper's T
    t_max = next((v for r in runs if (v := r.param("t_max")) is not None), T_MAX)
    mu = next((v for r in runs if (v := r.param("student_mu")) is not None), 0.0)
    pairs = _sigma_nu_pairs(results) or list(PAPER_FIG4A_SIGMA_NU)
    source = "grid of this preset" if _sigma_nu_pairs(results) else "paper's three cases (no grid runs yet)"
    fig, ax = _new_axes(
        f"Fig. 4a: density of t ~ truncated log-Student-t on [{t_prime:g}, {t_max:g}], mu = {mu:g} "
        f"({source}) — preset {results.preset}",
        "t (noise level, log scale)",
        "density p(t) (per unit t, log scale)",
        fontsize=9,
    )
    try:
        import numpy as np

        from tcm_core.schedules import TruncatedLogStudentT
    except ImportError as error:
        _no_data(ax, f"schedules not available ({error})")
        _save(fig, path)
        return False
    ts = np.geomspace(t_prime, t_max, 400)
    for sigma, nu in pairs:
        dist = TruncatedLogStudentT(mu=mu, sigma=sigma, nu=nu, t_min=t_prime, t_max=t_max)
        ax.plot(ts, dist.pdf(ts), label=f"sigma = {sigma:g}, nu = {nu:g}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.legend()
    _save(fig, path)
    return True


def figure_fig4c(results: Results, path: Path) -> bool:
    runs = ablation_slice(results, ["rho", "w_b"])
    cells = {}
    for run in runs:
        m = final_fid(results, run)
        rho, w_b = run.param("rho"), run.param("w_b")
        if m is not None and rho is not None and w_b is not None:
            cells[(round(rho, 9), round(w_b, 9))] = m
    label = sorted({m.label for m in cells.values()})
    fig, ax = _new_axes(
        f"Fig. 4c analogue: final 1-step FID over rho x w_b ({'; '.join(label) or 'no evaluation'}) — "
        f"preset {results.preset}",
        "w_b (boundary-loss weight)",
        "rho (boundary batch fraction)",
        fontsize=9,
    )
    if cells:
        _draw_fid_grid(fig, ax, cells)
    else:
        _no_data(ax, _empty_message(runs, "final 1-step FID"))
    _save(fig, path)
    return bool(cells)


def _draw_fid_grid(fig, ax, cells: dict[tuple[float, float], Measured]) -> None:
    """A heat map of the FID by (rho, w_b), each cell labelled with its value (grey: not run / not finite)."""
    import matplotlib.pyplot as plt
    import numpy as np

    rhos = sorted({k[0] for k in cells})
    wbs = sorted({k[1] for k in cells})
    grid = np.full((len(rhos), len(wbs)), np.nan)
    for (rho, w_b), m in cells.items():
        grid[rhos.index(rho), wbs.index(w_b)] = m.value if is_finite(m.value) else np.nan
    masked = np.ma.masked_invalid(grid)
    cmap = plt.get_cmap("viridis_r").with_extremes(bad="0.85")
    image = ax.imshow(masked, origin="lower", cmap=cmap, aspect="auto")
    ax.set_xticks(range(len(wbs)), [f"{v:g}" for v in wbs])
    ax.set_yticks(range(len(rhos)), [f"{v:g}" for v in rhos])
    for i, rho in enumerate(rhos):
        for j, w_b in enumerate(wbs):
            m = cells.get((rho, w_b))
            colour = "white" if m and is_finite(m.value) else "black"
            ax.text(j, i, fmt(m.value) if m else MISSING, ha="center", va="center", fontsize=9, color=colour)
    fig.colorbar(image, ax=ax).set_label("1-step FID (grey: not run / not finite)")


def figure_mid_t_sweep(results: Results, path: Path) -> bool:
    """Each arm's 2-step FID against t_mid (log axis), its best point ringed, t' and eval.mid_t marked."""
    found = sweeps(results)
    fig, ax = _new_axes(f"2-step FID vs the middle time t_mid (training seed 0) — preset {results.preset}",
                        "middle time t_mid (log scale)", "2-step FID (lower is better)")
    for sweep in found:
        line = ax.plot(sweep.mid_ts, sweep.fids, marker="o", markersize=3, label=sweep.arm)[0]
        ax.plot([sweep.best_mid_t], [sweep.best], marker="o", markersize=10, fillstyle="none",
                color=line.get_color())
    t_prime = _t_prime(results)
    if found:
        ax.set_xscale("log")
        if t_prime is not None:
            ax.axvline(t_prime, color="0.5", linestyle="--", label=f"t' = {t_prime:g} (Stage 2 is swept from here)")
        ax.legend(fontsize=8)
        ax.set_title(f"2-step FID vs t_mid (training seed 0; rings: each arm's best) — preset {results.preset}\n"
                     f"({found[0].label})", fontsize=10)
    else:
        _no_data(ax, "no sweep yet (eval.mid_t_sweep)")
    _save(fig, path)
    return bool(found)


FIGURE_BUILDERS = {
    "fig1b_fid_stages": figure_fig1b,
    "fig2_dfid_stage1": figure_fig2,
    "fig3_dfid_stage2": figure_fig3,
    "fig4a_time_density": figure_fig4a,
    "fig4b_fid_sigma_nu": figure_fig4b,
    "fig4c_fid_rho_wb": figure_fig4c,
    "fig7_grad_norm": figure_fig7,
    "fig8_dfid_vs_t": figure_fig8,
    "fig_mid_t_sweep": figure_mid_t_sweep,
}
