"""Stage-1 ablations behind ``scripts/ablate_stage1.py``: variants of an autoencoder config trained on one data
config at an equal budget and seeds, evaluated on its validation split, reported as mean ± std with Welch's t-test
against the first variant. The stages and their names are the encoder comparison's photo stages
(``lab.compare``): a run resumes, and run in a comparison's folder it reuses the arms' photo runs (variants
keyed like the arms, e.g. ``litevae`` and ``sd_vae``, with the same steps and evaluation size).
"""
from __future__ import annotations

import json
import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from omegaconf import OmegaConf

from ldm.io import markdown_table
from lab.compare import Arm, CompareOptions, ae_metrics, eval_autoencoder, stage1, threads_per_job
from lab.compare_report import Metric, cell, label
from lab.plots import plot_curves
from lab.compare_stats import Spread, spread, welch
from lab.pipeline import Pipeline

METRICS = [Metric("photos", "psnr", "PSNR", True), Metric("photos", "ssim", "SSIM", True),
           Metric("photos", "lpips", "LPIPS", False), Metric("photos", "rfid", "rFID", False, True)]


@dataclass
class AblationOptions:
    plan: str  # YAML: data + variants [{key, label, config, overrides}]
    out_dir: str = "outputs/ablate_photos"
    repeats: int = 2
    steps: int | None = field(default_factory=lambda: CompareOptions().ae_steps)  # make compare's stage-1 budget
    detector: str = "auto"
    eval_samples: int = 200
    only: list[str] = field(default_factory=list)  # variant keys to run (default: all)
    jobs: int = 2  # runs at once, each with cpu_count // jobs threads


def read_plan(path: str) -> tuple[str, list[Arm]]:
    """The plan's data config and its variants as comparison arms (stage 1 only: no LDM config)."""
    plan = OmegaConf.to_container(OmegaConf.load(path))
    variants = [Arm(v["key"], v["label"], v["config"], "", list(v.get("overrides", []))) for v in plan["variants"]]
    keys = [v.key for v in variants]
    if len(set(keys)) != len(keys):
        raise ValueError(f"{path}: duplicate variant keys {keys}")
    return plan["data"], variants


def run_ablation(opts: AblationOptions, pipe: Pipeline | None = None, command: str | None = None) -> Path:
    """Train and evaluate every variant ``repeats`` times (seed = repeat), then write ``report.md``."""
    from ldm.evaluation.detectors import resolve_detector_spec

    data, variants = read_plan(opts.plan)
    if opts.only:
        variants = [v for v in variants if v.key in opts.only]
    pipe = pipe or Pipeline(opts.out_dir, threads=threads_per_job(opts.jobs))
    detector = pipe.step("detector", lambda: {"detector": resolve_detector_spec(opts.detector)})["detector"]
    settings = CompareOptions(out_dir=opts.out_dir, data=data, ae_steps=opts.steps, eval_samples=opts.eval_samples)

    def train_and_evaluate(chain: tuple[Arm, int]) -> tuple[Path, Path]:
        v, r = chain
        run = stage1(pipe, v, settings, r, data=data)
        return run, eval_autoencoder(pipe, f"{v.key}/r{r}/photos_eval_ae", run, data, settings, detector,
                                     Path(opts.out_dir) / "eval" / f"{v.key}_r{r}_photos_ae.json")
    chains = [(v, r) for r in range(opts.repeats) for v in variants]
    with ThreadPoolExecutor(max_workers=opts.jobs) as pool:
        done = list(pool.map(train_and_evaluate, chains))
    records = {v.key: [{"photos": ae_metrics(res)} for (w, _), (_, res) in zip(chains, done) if w is v]
               for v in variants}
    runs = {v.label: [{"photo_run": run} for (w, _), (run, _) in zip(chains, done) if w is v] for v in variants}
    return write_report(opts, variants, records, runs, detector, command)


def write_report(opts: AblationOptions, variants: Sequence[Arm], records: Mapping[str, Sequence[Mapping]],
                 runs: Mapping[str, Sequence[Mapping[str, Any]]], detector: str, command: str | None) -> Path:
    out = Path(opts.out_dir)
    # Named after the plan: the ablation usually shares make compare's folder, whose report.md it must not replace.
    tag = f"ablation_{Path(opts.plan).stem}"
    ref = variants[0]
    metrics = [m for m in METRICS if any(spread([r["photos"].get(m.key) for r in reps]).n for reps in records.values())]
    names = [label(m, detector != "random") for m in metrics]
    head = ["variant", "repeats", *names, *(f"Δ{n} vs first (Welch p)" for n in names[:2])]
    lines = [f"# Stage-1 ablation: {opts.plan}", "", f"Command: `{command or 'python scripts/ablate_stage1.py'}`", ""]
    spreads = {v.key: {m.key: spread([r["photos"].get(m.key) for r in records[v.key]]) for m in metrics}
               for v in variants}
    rows = []
    for v in variants:
        tests = []
        for m in metrics[:2]:
            t = welch(spreads[v.key][m.key], spreads[ref.key][m.key])
            test = f"p = {t.p:.3f}" if math.isfinite(t.p) else "no test: 1 repeat"
            tests.append("—" if v is ref else f"{t.difference:+.3g} ({test})")
        rows.append([v.label, len(records[v.key]), *(cell(m, spreads[v.key][m.key]) for m in metrics), *tests])
    lines.append(markdown_table(rows, head).rstrip("\n"))
    first = metrics[0]  # per-repeat values of the headline metric, in seed order (repeat r = seed r)
    lines += ["", f"Per-repeat {names[0]}: " + "; ".join(
        f"{v.label}: " + ", ".join(cell(first, Spread((x,))) for x in spreads[v.key][first.key].values)
        for v in variants) + "."]
    lines += ["", f"Features: `{detector}`. Every variant: same data, decoder, loss, steps and seeds (repeat r: "
                  f"`main.py -s r`); validation: the data config's validation split.", "",
              "Variants: " + "; ".join(f"`{v.key}`: `{v.ae_config}` {' '.join(v.ae_overrides)}" for v in variants), ""]
    figure = plot_curves(runs, [("photo_run", "val/psnr_ema", "val PSNR (EMA) [dB]"),
                                ("photo_run", "train/rec", "reconstruction loss")], out / f"plots_{tag}" / "curves.png")
    lines.append(f"![curves]({figure.relative_to(out).as_posix()})")
    report = out / f"report_{tag}.md"
    report.write_text("\n".join(lines) + "\n")
    (out / f"results_{tag}.json").write_text(json.dumps({"records": records, "detector": detector}, indent=1, default=str))
    return report
