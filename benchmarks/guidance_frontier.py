"""Probabilistic guidance vs CFG where it can be measured exactly: the class-conditional checkerboard.

Trains (or reuses, from their workdirs) GMFlow (K = 64, `configs/checkerboard.py:classes`) and the
K = 1 flow-matching baseline with the same trunk, steps, batch and label dropout
(`configs/checkerboard.py:classes_baseline`), then, with the EMA weights and the same initial noise
for every setting, sweeps

==============================  ==============================================================
method                          guidance
==============================  ==============================================================
`gm_sde_2`, `gm_ode_2`          GMFlow, probabilistic guidance w in [0, 1) (GM-ODE 2 with
                                ceil(128 / NFE) substeps)
`gm_sde_2+cfg`                  GMFlow, classic CFG shifting every component mean (w in [1, 8];
                                `--gm_cfg`): the same model as the PG rows, other guidance
`euler`, `ddpm_small`,          the baseline, classic CFG (w in [1, 8])
`dpmpp_2m`
==============================  ==============================================================

at NFE 4, 8 and 32, `--per_class` samples of each of the 8 classes per setting, scored by the exact
metrics of `gmflow_jax/eval/guidance_checkerboard.py` (precision, within-cell TV / coverage,
over-shoot, concentration; the exact-sample floor alongside). No orthogonal projection (see
`configs/checkerboard.py`, `_class_conditional`).

Reports: per method and NFE the Pareto frontier of precision (up) against within-cell TV (down); at
NFE 4 and 8 the comparison of the probabilistic-guidance frontier (union of the GM rows) with CFG's
(union of the baseline rows, and GMFlow + CFG separately): precision at equal within-cell TV and
within-cell TV at equal precision on a grid of levels both frontiers reach, and the over-shoot of
each at its best-precision setting. Prints a markdown table; writes `<workdir>/benchmark.json` after
every setting (a rerun skips settings already there) and `<workdir>/guidance_frontier.png` (top: one
frontier panel per NFE; below: sample histograms of all 8 classes at each method's best-precision
setting, one column per NFE).

    python benchmarks/guidance_frontier.py --workdir=runs/guidance_frontier
    python benchmarks/guidance_frontier.py --workdir=DIR --gm_workdir=RUN1 --baseline_workdir=RUN2
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

import jax
import numpy as np
from flax import nnx
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from gmflow_jax import tasks
from gmflow_jax.atomic_file import write_atomic, write_json_atomic
from gmflow_jax.config_variant import load_config_file
from gmflow_jax.data.checkerboard import BOARD_HALF_WIDTH, CELL_SIZE, WHITE_CELLS
from gmflow_jax.eval.figures import histogram_image
from gmflow_jax.eval.guidance_checkerboard import (
    exact_floor,
    frontier_precision_at,
    frontier_tv_at,
    pareto_frontier,
)
from gmflow_jax.eval.guidance_checkerboard_sweep import (
    class_labels,
    guidance_settings,
    guidance_streams,
    method_name,
    score_settings,
)
from gmflow_jax.models.denoiser import network_functions
from gmflow_jax.sampling.driver import SamplingDriver
from gmflow_jax.train.loop import train
from gmflow_jax.train.task import run_keys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

RESULTS_FILE = "benchmark.json"
"""Per-setting results, rewritten atomically after every setting."""

FIGURE_FILE = "guidance_frontier.png"
"""The frontier panels and the best-precision sample grids."""

COMPARE_NFES = (4, 8)
"""NFEs of the PG vs CFG verdict."""

DEFAULT_STEPS = 4000
"""Training steps of each model (batch 512): the 20-minute budget of the whole benchmark on an idle
2-core machine (2 x 4000 steps at ~20 it/s, then the sweep)."""

PANEL_EXTENT = 5.0
"""Half-width of the sample-histogram panels (the board is 4: room to see over-shoot)."""


def load_config(variant: str):
    """`configs/checkerboard.py:<variant>` as an ml_collections ConfigDict."""
    return load_config_file(os.path.join(REPO, "configs", "checkerboard.py"), variant)


def train_or_reuse(config, workdir: str) -> tuple[Any, dict[str, Any]]:
    """(EMA params, train info) of `config`, trained in / resumed from `workdir`."""
    keys = run_keys(config.seed)
    task = tasks.make_task(config, keys)
    graphdef, state, info = train(config, workdir, task, keys)
    return graphdef, state.ema_params, info


def family(method: str) -> str:
    """ "PG" (GMFlow, probabilistic guidance), "GM+CFG" (GMFlow, CFG) or "CFG" (baseline)."""
    if method.endswith("+cfg"):
        return "GM+CFG"
    return "PG" if method.startswith("gm_") else "CFG"


def _arrays(results: list[dict[str, Any]]) -> tuple[np.ndarray, np.ndarray]:
    p = np.array([r["metrics"]["precision"] for r in results])
    t = np.array([r["metrics"]["within_cell_tv"] for r in results])
    return p, t


def best_precision(results: list[dict[str, Any]]) -> dict[str, Any]:
    """The setting with the highest precision (ties: the lower within-cell TV)."""
    return max(results, key=lambda r: (r["metrics"]["precision"], -r["metrics"]["within_cell_tv"]))


def compare_frontiers(a: list[dict[str, Any]], b: list[dict[str, Any]]) -> dict[str, Any]:
    """Settings A against settings B, at the points of each one's Pareto frontier.

    For every frontier point (t, p) of B: A's best precision among its settings with within-cell TV
    <= t (precision at equal TV; nan when A has no setting that low) and A's lowest TV among its
    settings with precision >= p (TV at equal precision; nan when A never reaches p); B's point is
    weakly dominated by A when A has a setting with TV <= t and precision >= p. A dominates B when
    every frontier point of B is dominated. The same the other way round.
    """
    pa, ta = _arrays(a)
    pb, tb = _arrays(b)

    def side(p_x, t_x, p_y, t_y) -> dict[str, Any]:
        front = pareto_frontier(p_y, t_y)
        tv_at = t_y[front]
        prec_at = p_y[front]
        other_prec = frontier_precision_at(p_x, t_x, tv_at)
        other_tv = frontier_tv_at(p_x, t_x, prec_at)
        dominated = [bool(p >= q) for p, q in zip(other_prec, prec_at, strict=True)]
        return {
            "frontier_tv": tv_at.tolist(),
            "frontier_precision": prec_at.tolist(),
            "other_precision_at_tv": other_prec.tolist(),
            "other_tv_at_precision": other_tv.tolist(),
            "dominated": dominated,
        }

    b_side, a_side = side(pa, ta, pb, tb), side(pb, tb, pa, ta)
    return {
        "b_frontier_vs_a": b_side,
        "a_frontier_vs_b": a_side,
        "a_dominates_b": all(b_side["dominated"]),
        "b_dominates_a": all(a_side["dominated"]),
        "a_best_precision": float(pa.max()),
        "b_best_precision": float(pb.max()),
        "a_best_tv": float(ta.min()),
        "b_best_tv": float(tb.min()),
    }


def _fmt_setting(r: dict[str, Any]) -> str:
    m = r["metrics"]
    return (
        f"{r['method']} w={r['w']:g}: precision {m['precision']:.4f}, cell TV "
        f"{m['within_cell_tv']:.4f}, over-shoot {m['overshoot_rate']:.4f} "
        f"(mean dist {m['overshoot_distance']:.3f}), concentration {m['concentration']:.3f}"
    )


def _fmt_side(name: str, other: str, side: dict[str, Any]) -> str:
    """One line: each frontier point of `name` with `other`'s precision at its TV and TV at its
    precision."""
    parts = []
    for t, p, op, ot in zip(
        side["frontier_tv"],
        side["frontier_precision"],
        side["other_precision_at_tv"],
        side["other_tv_at_precision"],
        strict=True,
    ):
        op_text = "none" if np.isnan(op) else f"{op:.3f}"
        ot_text = "none" if np.isnan(ot) else f"{ot:.3f}"
        parts.append(f"({t:.3f}, {p:.3f}): {other} prec {op_text}, TV {ot_text}")
    dominated = sum(side["dominated"])
    return (
        f"{name} frontier (TV, precision) -> {other} precision at <= that TV, {other} TV at >= "
        f"that precision: " + "; ".join(parts) + f" [{dominated} of {len(parts)} dominated by "
        f"{other}]"
    )


def verdict_lines(results: list[dict[str, Any]]) -> list[str]:
    """The issue's comparisons at NFE 4 and 8, as printed lines."""
    lines = []
    for nfe in COMPARE_NFES:
        at = [r for r in results if r["nfe"] == nfe]
        pg = [r for r in at if family(r["method"]) == "PG"]
        for other_name in ("CFG", "GM+CFG"):
            other = [r for r in at if family(r["method"]) == other_name]
            if not pg or not other:
                continue
            c = compare_frontiers(pg, other)
            if c["a_dominates_b"] and not c["b_dominates_a"]:
                verdict = "PG dominates"
            elif c["b_dominates_a"] and not c["a_dominates_b"]:
                verdict = f"{other_name} dominates"
            elif c["a_dominates_b"]:
                verdict = "the frontiers coincide"
            else:
                verdict = "neither dominates"
            lines.append(
                f"NFE {nfe}: PG vs {other_name}: {verdict}; best precision PG "
                f"{c['a_best_precision']:.4f} vs {c['b_best_precision']:.4f}, best cell TV PG "
                f"{c['a_best_tv']:.4f} vs {c['b_best_tv']:.4f}"
            )
            lines.append(f"NFE {nfe}:   " + _fmt_side("PG", other_name, c["a_frontier_vs_b"]))
            lines.append(f"NFE {nfe}:   " + _fmt_side(other_name, "PG", c["b_frontier_vs_a"]))
        for name in ("PG", "CFG", "GM+CFG"):
            group = [r for r in at if family(r["method"]) == name]
            if group:
                best = _fmt_setting(best_precision(group))
                lines.append(f"NFE {nfe}:   best-precision {name}: {best}")
    return lines


def markdown_table(results: list[dict[str, Any]], floor: dict[str, float]) -> str:
    """Per method and NFE: best precision (w), its cell TV, over-shoot, concentration; frontier."""
    header = (
        "| method | NFE | best precision (w) | cell TV @ best prec. | over-shoot rate @ best prec. "
        "| over-shoot dist. @ best prec. | concentration @ best prec. | best cell TV (w) | "
        "Pareto frontier (w: precision / cell TV) |"
    )
    lines = [header, "|" + "---|" * 9]
    methods = list(dict.fromkeys(r["method"] for r in results))
    nfes = sorted({r["nfe"] for r in results})
    for method in methods:
        for nfe in nfes:
            group = [r for r in results if r["method"] == method and r["nfe"] == nfe]
            if not group:
                continue
            bp = best_precision(group)
            bt = min(group, key=lambda r: r["metrics"]["within_cell_tv"])
            p, t = _arrays(group)
            front = pareto_frontier(p, t)
            front_text = ", ".join(f"{group[i]['w']:g}: {p[i]:.3f}/{t[i]:.3f}" for i in front)
            m = bp["metrics"]
            lines.append(
                f"| {method} | {nfe} | {m['precision']:.4f} ({bp['w']:g}) | "
                f"{m['within_cell_tv']:.4f} | {m['overshoot_rate']:.4f} | "
                f"{m['overshoot_distance']:.3f} | {m['concentration']:.3f} | "
                f"{bt['metrics']['within_cell_tv']:.4f} ({bt['w']:g}) | {front_text} |"
            )
    f = floor
    lines.append(
        f"| exact sample | - | {f['precision']:.4f} | {f['within_cell_tv']:.4f} | "
        f"{f['overshoot_rate']:.4f} | {f['overshoot_distance']:.3f} | {f['concentration']:.3f} | "
        f"{f['within_cell_tv']:.4f} | |"
    )
    return "\n".join(lines)


def write_figure(
    path: str,
    results: list[dict[str, Any]],
    samples: dict[tuple[str, int], np.ndarray],
    floor: dict[str, float],
) -> None:
    """Top: one frontier panel per NFE (all settings faint, frontiers as lines); below: sample
    histograms at each method's best-precision setting (rows = methods, columns = NFE)."""
    methods = list(dict.fromkeys(r["method"] for r in results))
    nfes = sorted({r["nfe"] for r in results})
    panel = 2.6
    fig = Figure(figsize=(panel * len(nfes) + 1.2, panel * (1.3 + len(methods)) + 0.4), dpi=100)
    FigureCanvasAgg(fig)
    rows = 1 + len(methods)
    gs = fig.add_gridspec(rows, len(nfes), height_ratios=[1.3] + [1.0] * len(methods))
    colors = {m: f"C{i}" for i, m in enumerate(methods)}
    styles = {"PG": "-", "CFG": "--", "GM+CFG": ":"}
    for c, nfe in enumerate(nfes):
        ax = fig.add_subplot(gs[0, c])
        on_front: list[tuple[float, float]] = []
        for method in methods:
            group = [r for r in results if r["method"] == method and r["nfe"] == nfe]
            if not group:
                continue
            p, t = _arrays(group)
            ax.scatter(t, p, s=8, color=colors[method], alpha=0.35)
            front = pareto_frontier(p, t)
            on_front += [(t[i], p[i]) for i in front]
            ax.plot(
                t[front],
                p[front],
                styles[family(method)],
                color=colors[method],
                label=method,
                marker="o",
                markersize=3,
            )
        ax.axvline(floor["within_cell_tv"], color="gray", lw=0.8, ls=":")
        if on_front:  # zoom on the frontiers; settings far below them fall outside the panel
            tv_max = max(t for t, _ in on_front)
            p_min = min(p for _, p in on_front)
            ax.set_xlim(0.9 * floor["within_cell_tv"], tv_max + 0.15 * (tv_max - 0.0) + 0.02)
            ax.set_ylim(max(0.0, p_min - 0.5 * (1.0 - p_min) - 0.01), 1.002)
        ax.set_title(f"NFE {nfe} (dotted: exact-sample TV)", fontsize=8)
        ax.set_xlabel("within-cell TV (lower is better)", fontsize=7)
        if c == 0:
            ax.set_ylabel("precision", fontsize=7)
            ax.legend(fontsize=6, loc="lower right")
        ax.tick_params(labelsize=6)
        for r, method in enumerate(methods):
            ax_s = fig.add_subplot(gs[1 + r, c])
            ax_s.set_xticks([])
            ax_s.set_yticks([])
            if (method, nfe) in samples:
                x, w = samples[(method, nfe)]
                ax_s.imshow(
                    histogram_image(x, bins=100, extent=PANEL_EXTENT),
                    cmap="viridis",
                    vmin=0.0,
                    vmax=1.0,
                    origin="lower",
                    extent=(-PANEL_EXTENT, PANEL_EXTENT, -PANEL_EXTENT, PANEL_EXTENT),
                )
                for patch in _cell_outlines():
                    ax_s.add_patch(patch)
                ax_s.set_title(f"w={w:g}", fontsize=7, pad=2)
            if c == 0:
                ax_s.set_ylabel(method, fontsize=7)
    fig.suptitle(
        "class-conditional checkerboard: precision vs within-cell TV; samples at best precision",
        fontsize=9,
        y=0.998,
    )
    fig.tight_layout(rect=(0, 0, 1, 0.985))
    write_atomic(path, lambda f: fig.savefig(f, format="png", dpi=100), ".png")


def _cell_outlines() -> list[Rectangle]:
    """The 8 white cells (thin) and the data's bounding box [-4, 4]^2 (dashed) as outlines."""
    cells = [
        Rectangle((x, y), CELL_SIZE, CELL_SIZE, fill=False, edgecolor="white", lw=0.3, alpha=0.6)
        for x, y in WHITE_CELLS * CELL_SIZE - BOARD_HALF_WIDTH
    ]
    box = 2 * BOARD_HALF_WIDTH
    edge = -BOARD_HALF_WIDTH
    return [
        *cells,
        Rectangle((edge, edge), box, box, fill=False, edgecolor="white", lw=0.6, ls="--"),
    ]


def main(argv: list[str]) -> None:
    """Train or reuse both models, sweep, print the table and the verdict, write JSON and PNG."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--gm_workdir", default=None, help="GMFlow run dir (default WORKDIR/gmflow)")
    ap.add_argument("--baseline_workdir", default=None, help="default WORKDIR/baseline")
    ap.add_argument("--size", default="small", choices=("small", "tiny", "full"))
    ap.add_argument(
        "--steps",
        type=int,
        default=None,
        help=f"training steps of each model (default: {DEFAULT_STEPS} for size small, else the "
        "config's own)",
    )
    ap.add_argument("--per_class", type=int, default=500, help="samples per class and setting")
    ap.add_argument("--nfes", default="4,8,32")
    ap.add_argument("--gm_cfg", default="gm_sde_2", help="GM rows also run with CFG ('' = none)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    os.makedirs(args.workdir, exist_ok=True)
    t_start = time.perf_counter()
    results_path = os.path.join(args.workdir, RESULTS_FILE)
    stored: dict[str, Any] = {}
    if os.path.exists(results_path):
        with open(results_path) as f:
            stored = json.load(f)
    done = {r["key"]: r for r in stored.get("results", [])}
    nfes = tuple(int(n) for n in args.nfes.split(","))
    sweep_key = jax.random.fold_in(jax.random.PRNGKey(args.seed), 16)

    payload: dict[str, Any] = {"args": vars(args), "train": {}, "results": list(done.values())}
    samples: dict[tuple[str, int], tuple[np.ndarray, float]] = {}
    drawn: dict[str, np.ndarray] = {}  # samples of every setting drawn by this invocation

    def save(result: dict[str, Any], x: np.ndarray) -> None:
        payload["results"].append(result)
        write_json_atomic(results_path, payload)
        drawn[result["key"]] = x

    for variant, sub in (("classes", args.gm_workdir), ("classes_baseline", args.baseline_workdir)):
        config = load_config(f"{args.size}_{variant}")
        config.seed = args.seed
        if args.steps is not None:
            config.train.num_steps = args.steps
        elif args.size == "small":
            config.train.num_steps = DEFAULT_STEPS
        config.sample.guidance_nfes = nfes
        config.sample.gm_cfg_rows = tuple(r for r in args.gm_cfg.split(",") if r)
        workdir = sub or os.path.join(
            args.workdir, "baseline" if "baseline" in variant else "gmflow"
        )
        graphdef, params, info = train_or_reuse(config, workdir)
        if info.get("preempted"):
            print(f"{variant}: training was stopped (preempted); rerun to resume", flush=True)
            sys.exit(1)
        payload["train"][variant] = {k: v for k, v in info.items() if k != "sessions"}
        print(
            f"{variant}: trained in {info.get('train_wall_time_s', float('nan')):.1f} s", flush=True
        )
        denoiser, _ = network_functions(nnx.merge(graphdef, params))
        driver = SamplingDriver(denoiser, params)
        settings = guidance_settings(config, bool(config.model.mean_only))
        todo = [
            s
            for s in settings
            if f"{method_name(s.row, s.cfg.guidance)}|{s.nfe}|{s.w:g}" not in done
        ]
        # The same noise for every setting of both models.
        streams = guidance_streams(sweep_key, args.per_class, int(config.sample.batch_size))
        score_settings(driver, todo, streams, args.per_class, on_result=save)
        # The figure's samples: each method's best-precision setting per NFE; settings scored by
        # an earlier invocation are drawn again (same noise and key, so the same samples).
        by_key = {f"{method_name(x.row, x.cfg.guidance)}|{x.nfe}|{x.w:g}": x for x in settings}
        mine = [r for r in payload["results"] if r["key"] in by_key]
        for method, nfe in dict.fromkeys((r["method"], r["nfe"]) for r in mine):
            best = best_precision([r for r in mine if (r["method"], r["nfe"]) == (method, nfe)])
            if best["key"] not in drawn:
                score_settings(
                    driver,
                    [by_key[best["key"]]],
                    streams,
                    args.per_class,
                    on_result=lambda r, x: drawn.__setitem__(r["key"], x),
                )
            samples[(method, nfe)] = (drawn[best["key"]], best["w"])
    results = payload["results"]
    labels = class_labels(args.per_class)
    floor = exact_floor(labels, jax.random.fold_in(jax.random.PRNGKey(args.seed), 17))
    payload["exact_sample_floor"] = floor
    payload["wall_time_s"] = time.perf_counter() - t_start + stored.get("wall_time_s", 0.0)
    write_json_atomic(results_path, payload)
    if samples:
        write_figure(os.path.join(args.workdir, FIGURE_FILE), results, samples, floor)
    print(markdown_table(results, floor))
    print()
    for line in verdict_lines(results):
        print(line)
    print(
        f"\nwall time {payload['wall_time_s']:.0f} s "
        f"(this invocation {time.perf_counter() - t_start:.0f} s)"
    )


if __name__ == "__main__":
    main(sys.argv[1:])
