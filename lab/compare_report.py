"""The encoder comparison's report: the verdict on the paper's claims, tables with run-to-run spread, plots, grids.

Everything here is rebuilt from recorded results (``results.json`` holds them all), so a report can be
redrawn without re-running a stage. ``compare_stats`` does the statistics.
"""
from __future__ import annotations

import itertools
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from ldm.io import markdown_table
from lab.compare_stats import ALPHA, Convergence, Spread, convergence, detectable_difference, spread, welch
from lab.plots import class_grid, last_image, plot_curves, pyplot, save_figure, side_by_side

# The paper's encoder cost (Table 3: batch 32, one Quadro RTX 6000): LiteVAE-B vs the SD-VAE encoder.
PAPER_COST = {"params": 34.16 / 6.75, "throughput": 129 / 68, "memory": 3155 / 8860}


@dataclass(frozen=True)
class Metric:
    """One reported number: where it is recorded (``section``/``key``), how it is named, which way is better."""

    section: str  # "fmnist" (stage-1 reconstruction on --data), "photos" (stage-1 on photos), "downstream"
    key: str
    label: str
    higher_is_better: bool
    feature_based: bool = False  # FID-like: named for what the detector is (never "FID" for random features)


METRICS = [
    Metric("fmnist", "psnr", "PSNR", True), Metric("fmnist", "ssim", "SSIM", True),
    Metric("fmnist", "lpips", "LPIPS", False), Metric("fmnist", "rfid", "rFID", False, True),
    Metric("photos", "psnr", "PSNR", True), Metric("photos", "ssim", "SSIM", True),
    Metric("photos", "lpips", "LPIPS", False), Metric("photos", "rfid", "rFID", False, True),
    Metric("downstream", "fid", "FID", False, True), Metric("downstream", "kid", "KID", False, True),
    Metric("downstream", "precision", "precision", True, True), Metric("downstream", "recall", "recall", True, True),
    Metric("downstream", "accuracy", "class accuracy", True),
]
SECTION_TITLES = {"fmnist": "reconstruction, {data}", "photos": "reconstruction, natural photos (endless-sky)",
                  "downstream": "downstream LDM samples, {data}"}
# What a random feature network's numbers are called: a distance between random features, never an FID.
RANDOM_LABELS = {"rFID": "rec. RFD", "FID": "sample RFD", "KID": "sample RKD", "precision": "precision (random net)",
                 "recall": "recall (random net)"}


def label(metric: Metric, comparable: bool) -> str:
    return metric.label if comparable or not metric.feature_based else RANDOM_LABELS[metric.label]


# ------------------------------------------------------------------------------------------ reading results
def metric_spreads(records: Mapping[str, Sequence[Mapping[str, Any]]], metric: Metric) -> dict[str, Spread]:
    """``{arm key: Spread}`` of one metric over the repeats (``records[arm][repeat][section][key]``)."""
    return {arm: spread([r.get(metric.section, {}).get(metric.key) for r in reps]) for arm, reps in records.items()}


def metric_points(reps: Sequence[Mapping[str, Any]], metric: Metric) -> dict[int, Spread]:
    """``{step: Spread}`` of one arm's metric at each evaluation point (``repeat["curves"][section][step]``)."""
    curves = [r.get("curves", {}).get(metric.section, {}) for r in reps]
    steps = sorted({int(s) for c in curves for s, values in c.items() if metric.key in values})
    return {s: spread([next((v.get(metric.key) for k, v in c.items() if int(k) == s), None) for c in curves])
            for s in steps}


def budget_of(metric: Metric, settings: Mapping[str, Any]) -> int | None:
    return settings.get("ldm_steps" if metric.section == "downstream" else "ae_steps")


def metric_convergence(records: Mapping[str, Sequence[Mapping]], metric: Metric, ref: str, other: str,
                       settings: Mapping[str, Any]) -> Convergence | None:
    """How the ``ref`` − ``other`` difference behaves over the last half of the step budget (None: too few points)."""
    budget = budget_of(metric, settings)
    a, b = metric_points(records[ref], metric), metric_points(records[other], metric)
    points = [(s, welch(a[s], b[s])) for s in sorted(set(a) & set(b)) if a[s].n and b[s].n]
    return convergence(points, budget) if budget else None


def present(records: Mapping[str, Sequence[Mapping[str, Any]]], metric: Metric) -> bool:
    return any(s.n for s in metric_spreads(records, metric).values())


# ------------------------------------------------------------------------------------------ tables
def cell(metric: Metric, s: Spread) -> str:
    if metric.key == "accuracy":
        return Spread(tuple(100 * v for v in s.values)).format("{:.1f}") + (" %" if s.n else "")
    return s.format("{:.2f}" if metric.key == "psnr" else "{:.3g}" if metric.key != "ssim" else "{:.3f}")


def section_table(records: Mapping[str, Sequence[Mapping]], labels: Mapping[str, str], section: str,
                  comparable: bool) -> str:
    """Rows = arms, columns = the section's metrics as mean ± std over repeats; then the per-repeat values."""
    metrics = [m for m in METRICS if m.section == section and present(records, m)]
    if not metrics:
        return ""
    head = ["encoder", "repeats", *(label(m, comparable) for m in metrics)]
    table = markdown_table([[labels[arm], len(reps), *(cell(m, metric_spreads(records, m)[arm]) for m in metrics)]
                            for arm, reps in records.items()], head)
    per_repeat = "; ".join(
        f"{labels[arm]} {label(m, comparable)}: " + ", ".join(cell(m, Spread((v,))) for v in spreads[arm].values)
        for m in metrics for arm, spreads in [(a, metric_spreads(records, m)) for a in records])
    return table + f"\nPer-repeat values: {per_repeat}.\n"


def cost_table(encoders: Mapping[str, Mapping[str, Any]], labels: Mapping[str, str]) -> str:
    head = ["encoder", "encoder params", "GFLOPs / image", "img/s", "peak inference memory (MiB)"]
    rows = [[labels[arm], f"{int(e['encoder_params']):,}",
             None if e.get("encoder_flops") is None else f"{e['encoder_flops'] / 1e9:.3f}",
             f"{e['encoder_images_per_s']:.0f}",
             None if e.get("encoder_peak_bytes") is None else f"{e['encoder_peak_bytes'] / 2**20:.1f}"]
            for arm, e in encoders.items()]
    setting = next(iter(encoders.values())).get("throughput_setting", "")
    return markdown_table(rows, head) + (f"\nMeasured: {setting}.\n" if setting else "")


# ------------------------------------------------------------------------------------------ verdict
def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a in (None, 0) or b is None else b / a


def cost_verdict(encoders: Mapping[str, Mapping[str, Any]], ref: str, other: str, labels: Mapping[str, str]) -> list[str]:
    """The encoder-cost claim: other/ref parameters and FLOPs, ref/other throughput and other/ref memory."""
    a, b = encoders[ref], encoders[other]
    params = _ratio(a["encoder_params"], b["encoder_params"])
    flops = _ratio(a.get("encoder_flops"), b.get("encoder_flops"))
    speed = _ratio(b["encoder_images_per_s"], a["encoder_images_per_s"])
    memory = _ratio(b.get("encoder_peak_bytes"), a.get("encoder_peak_bytes"))

    def show(x: float | None, digits: str = ".2f") -> str:
        return "—" if x is None else f"{x:{digits}}x"
    return [f"- **Encoder cost** ({labels[other]} relative to {labels[ref]}): {show(params)} the parameters "
            f"(paper, SD vs LiteVAE-B: {PAPER_COST['params']:.2f}x), {show(flops)} the FLOPs; {labels[ref]} "
            f"encodes {show(speed)} as many images per second (paper: {PAPER_COST['throughput']:.2f}x on a GPU) "
            f"with {show(memory)} the peak inference memory (paper: "
            f"{PAPER_COST['memory']:.2f}x). One interleaved CPU measurement (no repeats: a property of the "
            f"architecture, not of training)."]


def metric_verdict(records: Mapping[str, Sequence[Mapping]], metric: Metric, ref: str, other: str,
                   labels: Mapping[str, str], comparable: bool,
                   settings: Mapping[str, Any] | None = None) -> tuple[str, str] | None:
    """``(outcome, sentence)``: outcome is "better" / "worse" (the reference arm, significant), "same", "untested",
    or "moving" when the difference has not settled over the last half of the budget (``metric_convergence``)."""
    spreads = metric_spreads(records, metric)
    a, b = spreads[ref], spreads[other]
    if not a.n or not b.n:
        return None
    test = welch(a, b)
    if test.significant:
        key = "better" if (test.difference > 0) == metric.higher_is_better else "worse"
        outcome = f"{labels[ref]} is {key}"
    elif math.isnan(test.p):
        key, outcome = "untested", "no test possible"
    else:
        key, outcome = "same", "no difference beyond the run-to-run spread"
    detectable = detectable_difference(a, b)
    scale, unit = (100, " pp") if metric.key == "accuracy" else (1, "")  # as cell() shows the metric
    text = (f"{label(metric, comparable)} {cell(metric, a)} vs {cell(metric, b)}: {outcome} — {test.describe()}"
            + ("" if math.isnan(detectable) else f"; detectable at this n: {detectable * scale:.3g}{unit}"))
    settled = metric_convergence(records, metric, ref, other, settings or {})
    if settled is not None:
        text += f"; over the last half of the budget: {settled.describe(scale=scale, unit=unit)}"
        if not settled.settled:
            key = "moving"
    elif settings is not None:
        text += "; one evaluation point only: no convergence check"
    return key, text


def verdict(records: Mapping[str, Sequence[Mapping]], encoders: Mapping[str, Mapping], labels: Mapping[str, str],
            data_name: str, comparable: bool, settings: Mapping[str, Any] | None = None) -> list[str]:
    """The report's opening: the paper's claims, point by point, for every pair of arms in their order (the first
    against each other arm, then the second against the later ones: e.g. LiteVAE-S vs SD-VAE, the paper's other
    claim, in a three-arm comparison)."""
    lines = ["## Verdict", "",
             f"The paper's claims (LiteVAE-B vs the SD-VAE encoder): a much cheaper encoder (Table 3), the same "
             f"reconstruction quality at an equal training budget (Table 1), and the same downstream quality "
             f"(Table 7). Here, each against this report's arms. Differences are tested with Welch's t-test at "
             f"p < {ALPHA} over the repeats (mean ± sample std; with few repeats only large, consistent "
             f"differences can reach significance; \"detectable at this n\" is the smallest true difference the "
             f"test would find with 80 % power). Every metric measured at several points of its run is also judged "
             f"along the budget: *settled* when the difference keeps its sign and its significance over the last "
             f"half, *still moving* otherwise, with its trend.", ""]
    for ref, other in itertools.combinations(records, 2):
        lines += cost_verdict(encoders, ref, other, labels)
        tally = {"better": 0, "worse": 0, "same": 0, "untested": 0, "moving": 0}
        for section in ("fmnist", "photos", "downstream"):
            found = [v for m in METRICS if m.section == section
                     if (v := metric_verdict(records, m, ref, other, labels, comparable, settings)) is not None]
            if found:
                title = SECTION_TITLES[section].format(data=data_name)
                lines.append(f"- **{title[0].upper() + title[1:]}** ({labels[ref]} vs {labels[other]}): "
                             + "; ".join(text for _, text in found) + ".")
                for key, _ in found:
                    tally[key] += 1
        lines += ["", f"**In one line:** {labels[ref]} vs {labels[other]}: significantly better on {tally['better']}, "
                      f"significantly worse on {tally['worse']}, not distinguishable on {tally['same']} of the "
                      f"quality metrics above" + (f", still moving on {tally['moving']}" if tally["moving"] else "")
                      + (f" ({tally['untested']} without a test)" if tally["untested"] else "") + ".", ""]
    if not comparable:
        lines += ["**The feature distances use a random network (`--detector random`): distances between random "
                  "features, comparable within this report only and with no published number.**", ""]
    return lines


# ------------------------------------------------------------------------------------------ figures




def plot_bars(records: Mapping[str, Sequence[Mapping]], labels: Mapping[str, str], comparable: bool,
              path: str | Path) -> Path:
    """One subplot per metric: a bar per arm at the mean, an error bar of ± one std, the repeats as dots."""
    plt = pyplot()

    metrics = [m for m in METRICS if present(records, m)]
    fig, axes = plt.subplots(1, len(metrics), figsize=(2.4 * len(metrics), 3.2), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        spreads = metric_spreads(records, metric)
        for i, (arm, s) in enumerate(spreads.items()):
            ax.bar(i, s.mean, yerr=0 if s.n < 2 else s.std, color=f"C{i}", capsize=4, alpha=0.7)
            ax.scatter([i] * s.n, s.values, color="black", s=8, zorder=3)
        ax.set_xticks(range(len(spreads)), [labels[a] for a in spreads], fontsize=7, rotation=20)
        ax.set_title(f"{label(metric, comparable)}\n{metric.section}", fontsize=9)
    return save_figure(fig, path)


def plot_differences(records: Mapping[str, Sequence[Mapping]], labels: Mapping[str, str], comparable: bool,
                     path: str | Path) -> Path | None:
    """One subplot per metric measured at several points: the first arm minus each other arm against training
    steps, the mean over repeats with ± one standard error of the difference (Welch's), and the zero line."""
    plt = pyplot()

    ref, *others = list(records)
    metrics = [m for m in METRICS if len(metric_points(records[ref], m)) >= 2]
    if not metrics or not others:
        return None
    fig, axes = plt.subplots(1, len(metrics), figsize=(2.8 * len(metrics), 3.0), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        a = metric_points(records[ref], metric)
        for i, other in enumerate(others, start=1):
            b = metric_points(records[other], metric)
            steps = [s for s in sorted(set(a) & set(b)) if a[s].n and b[s].n]
            diffs = [a[s].mean - b[s].mean for s in steps]
            errors = [math.sqrt((a[s].std ** 2 / a[s].n if a[s].n > 1 else 0) + (b[s].std ** 2 / b[s].n if b[s].n > 1
                                                                                  else 0)) for s in steps]
            ax.errorbar(steps, diffs, yerr=errors, color=f"C{i}", marker="o", capsize=3, label=f"− {labels[other]}")
        ax.axhline(0, color="grey", lw=0.8)
        ax.set_title(f"{label(metric, comparable)} ({metric.section})\n{labels[ref]} minus", fontsize=8)
        ax.set_xlabel("step")
        ax.legend(fontsize=6)
    return save_figure(fig, path)








def _sample_grid(samples: Path, path: Path) -> Path:
    """The class-sorted grid of a class-conditional run, else sample.py's own grid.png."""
    with np.load(samples / "samples.npz") as data:
        labelled = "labels" in data.files
    return class_grid(samples / "samples.npz", path) if labelled else samples / "grid.png"


def reconstruction_grid(paths: Mapping[str, Mapping[str, Any]], labels: Mapping[str, str], kind: str,
                        path: Path) -> Path | None:
    """The last stage-1 validation inputs and each arm's EMA reconstructions side by side, when logged."""
    recs = {labels[k]: last_image(p.get(kind), "reconstructions_ema") or last_image(p.get(kind), "reconstructions")
            for k, p in paths.items()}
    inputs = last_image(next(iter(paths.values())).get(kind), "inputs")
    if inputs is None or not all(recs.values()):
        return None
    return side_by_side({"input": inputs, **recs}, path)


def make_grids(paths: Mapping[str, Mapping[str, Any]], labels: Mapping[str, str], grids: Path) -> list[Path]:
    """Repeat 0 of each arm: class-sorted samples (the same seeds for every arm) and reconstructions."""
    samples = {labels[k]: _sample_grid(Path(p["samples"]), grids / f"samples_{k}.png") for k, p in paths.items()}
    out = [side_by_side(samples, grids / "samples.png")]
    for kind, name in (("ae_run", "reconstructions.png"), ("photo_run", "reconstructions_photos.png")):
        grid = reconstruction_grid(paths, labels, kind, grids / name)
        if grid is not None:
            out.append(grid)
    return out


# ------------------------------------------------------------------------------------------ report
CURVE_PANELS = [("ae_run", "train/rec", "stage 1: reconstruction loss"),
                ("ae_run", "val/psnr_ema", "stage 1: val PSNR (EMA) [dB]"),
                ("photo_run", "val/psnr_ema", "stage 1, photos: val PSNR (EMA) [dB]"),
                ("ldm_run", "train/loss", "stage 2: diffusion loss"),
                ("ldm_run", "val/loss_ema", "stage 2: val loss (EMA)")]


def minutes_table(records: Mapping[str, Sequence[Mapping]], labels: Mapping[str, str]) -> str:
    stages = list(dict.fromkeys(k for reps in records.values() for r in reps for k in r.get("minutes", {})))
    return markdown_table([[labels[arm], *(spread([r.get("minutes", {}).get(s) for r in reps]).format("{:.1f}")
                                           for s in stages)] for arm, reps in records.items()],
                          ["encoder", *(f"{s} min" for s in stages)])


def write_report(out: Path, records: Mapping[str, Sequence[Mapping]], encoders: Mapping[str, Mapping],
                 paths: Mapping[str, Sequence[Mapping[str, Any]]], labels: Mapping[str, str], detector: str,
                 settings: Mapping[str, Any], arms_text: str, command: str | None = None, name: str = "report") -> Path:
    """``<name>.md`` (verdict first, then tables, plots and grids) and ``results<tag>.json`` with every number;
    a variant's report (``report_<tag>``) keeps its figures in ``plots_<tag>/`` and ``grids_<tag>/``."""
    out = Path(out)
    tag = name.removeprefix("report")
    comparable = detector != "random"
    data_name = Path(str(settings.get("data", "data"))).stem
    runs = {labels[k]: reps for k, reps in paths.items()}
    figures = [plot_curves(runs, CURVE_PANELS, out / f"plots{tag}" / "curves.png"),
               plot_bars(records, labels, comparable, out / f"plots{tag}" / "metrics.png"),
               plot_differences(records, labels, comparable, out / f"plots{tag}" / "differences.png")]
    figures = [f for f in figures if f is not None]
    grids = make_grids({k: reps[0] for k, reps in paths.items()}, labels, out / f"grids{tag}")
    features = ("Feature distances use the Inception network "
                f"(`{detector}`)." if comparable else
                "**Feature distances use a random network (`--detector random`): RFD/RKD are Fréchet / kernel "
                "distances of random features, comparable within this report only and with no published number.**")
    lines = [f"# Encoder comparison: {' vs '.join(labels.values())}", "",
             f"Command: `{command or 'python scripts/compare_encoders.py'}`", "",
             *verdict(records, encoders, labels, data_name, comparable, settings),
             "## Encoder cost", "", cost_table(encoders, labels)]
    for section in ("fmnist", "photos", "downstream"):
        table = section_table(records, labels, section, comparable)
        if table:
            title = SECTION_TITLES[section].format(data=data_name)
            lines += [f"## {title[0].upper() + title[1:]}", "", table]
    lines += ["## Minutes per stage (wall clock, mean ± std over repeats)", "", minutes_table(records, labels),
              "Same decoder, loss and steps in stage 1 (pretrained arms are used as they are); the same LDM config, "
              "steps and sample seeds in stage 2; each repeat uses other training seeds (`main.py -s`) and other "
              "sample seeds for every stage. Reconstruction: EMA weights where present, validation split. "
              "Downstream: samples vs the validation split; class accuracy: a small classifier trained on the "
              "real training images, applied to the samples under their conditioning class (seed s has class "
              "s % classes).", "", features, "",
              *[f"![{p.stem}]({p.relative_to(out).as_posix()})" for p in figures + grids], "",
              f"Arms: {arms_text}", "", f"Settings: `{json.dumps(dict(settings), default=str)}`", ""]
    report = out / f"{name}.md"
    report.write_text("\n".join(lines))
    (out / f"results{tag}.json").write_text(json.dumps(
        {"records": records, "encoders": encoders, "labels": labels, "detector": detector,
         "settings": settings}, indent=1, default=str))
    return report
