"""The probe study: do cheap latent probes predict what a full diffusion run measures?

First stages that differ in reconstruction and in latent quality (``STUDY_ARMS``: the tiny LiteVAE, its old group
setting, the LiteVAE-S widths, the 5x and the equal-size SD encoders, KL weight x0.1 and x10, the scale-equivariance
regulariser; plus early checkpoints of the reference run) each get the comparison's full downstream result
(``lab.compare``: stage 2, samples, FID/KID/class accuracy, with repeats) and every latent probe
(``scripts/probe_latents.py``). The report gives each signal's Spearman rank correlation with each downstream
metric across first stages, with a bootstrap 95 % interval, for the probes and for reconstruction PSNR/rFID alike,
so it shows what a probe adds beyond reconstruction quality. Resumable like the comparison (``state.json``).
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
from scipy.stats import spearmanr

from ldm.io import markdown_table, write_json_atomic
from lab import compare
from lab.compare import Arm, CompareOptions, checkpoint_at, measure_encoders, run_comparison
from lab.plots import pyplot, save_figure
from lab.pipeline import Pipeline
from lab.stages import ProbeLatents

_TINY, _LDM = "configs/autoencoder/litevae_tiny.yaml", "configs/ldm/fmnist_litevae_tiny.yaml"
_ENCODER = "model.params.autoencoder.params.encoder_config.params"
STUDY_ARMS = [
    compare.KNOWN_ARMS["litevae"], compare.KNOWN_ARMS["lite_s"], compare.KNOWN_ARMS["sd_vae"],
    compare.KNOWN_ARMS["sd_vae_equal"],
    Arm("litevae_g8", "LiteVAE, 1 channel per group", _TINY, _LDM, [f"{_ENCODER}.norm_groups=8"]),
    Arm("litevae_kl01", "LiteVAE, KL weight x0.1", _TINY, _LDM, ["model.params.loss.params.kl_weight=1.0e-7"]),
    Arm("litevae_kl10", "LiteVAE, KL weight x10", _TINY, _LDM, ["model.params.loss.params.kl_weight=1.0e-5"]),
    Arm("litevae_eq", "LiteVAE + scale equivariance", _TINY, _LDM, ["model.params.loss.params.equivariance_weight=0.5"]),
]
SIGNALS = {  # what the report correlates with downstream quality: (section, key) -> label
    ("probes", "hf_ratio"): "spectrum: HF fraction latents / images",
    ("probes", "eq_image_2"): "equivariance error x2 (image)",
    ("probes", "eq_image_1.33"): "equivariance error x4/3 (image)",
    ("probes", "eq_latent_2"): "equivariance error x2 (latent)",
    ("probes", "mmd_100"): "MMD² to N(0, I), σ=100",
    ("probes", "linear_accuracy"): "linear-probe accuracy",
    ("probes", "probe_loss"): "diffusion probe: validation loss",
    ("probes", "probe_kid"): "diffusion probe: sample KID",
    ("probes", "probe_class_accuracy"): "diffusion probe: sample class accuracy",
    ("fmnist", "psnr"): "reconstruction PSNR",
    ("fmnist", "rfid"): "reconstruction rFID",
}
TARGETS = {"fid": "FID", "kid": "KID", "accuracy": "class accuracy"}  # downstream metrics (comparison records)


@dataclass
class StudyOptions:
    out_dir: str = "outputs/probe_study"
    compare: CompareOptions = field(default_factory=lambda: CompareOptions(arms=list(STUDY_ARMS), photos=None))
    checkpoint_fractions: tuple[float, ...] = (0.25, 0.5)  # early checkpoints of the reference arm, repeat 0
    probe_samples: int = 512
    diffusion_steps: int = 300
    bootstrap: int = 2000
    seed: int = 0


# ------------------------------------------------------------------------------------------ statistics
def spearman_with_interval(x: Sequence[float], y: Sequence[float], resamples: int = 2000, seed: int = 0
                           ) -> dict[str, float]:
    """Spearman's ρ and a percentile bootstrap 95 % interval over the (x, y) pairs. Written out rather than
    ``scipy.stats.bootstrap`` because a resample of few points can repeat one pair only (ρ undefined); those
    resamples are dropped here instead of turning the whole interval into NaN."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    rho = float(spearmanr(x, y).statistic)
    rng = np.random.default_rng(seed)
    draws = []
    for _ in range(resamples):
        idx = rng.integers(0, len(x), len(x))
        if len(np.unique(x[idx])) > 1 and len(np.unique(y[idx])) > 1:
            draws.append(spearmanr(x[idx], y[idx]).statistic)
    low, high = np.nanpercentile(draws, [2.5, 97.5]) if draws else (float("nan"), float("nan"))
    return {"rho": rho, "low": float(low), "high": float(high), "n": len(x)}


def predicts(c: Mapping[str, float], threshold: float = 0.7) -> bool:
    """The study's bar: the interval excludes 0 and |ρ| >= 0.7."""
    return abs(c["rho"]) >= threshold and (c["low"] > 0 or c["high"] < 0)


# ------------------------------------------------------------------------------------------ the study
def first_stages(pipe: Pipeline, opts: CompareOptions) -> dict[str, list[Path]]:
    """Each arm's first stage per repeat, as the comparison recorded it (a pretrained arm's is its path)."""
    return {arm.key: [compare.stage1(pipe, arm, opts, r) for r in range(opts.repeats)] for arm in opts.arms}


def checkpoint_arms(reference: Arm, run: Path, opts: StudyOptions) -> list[Arm]:
    """Early checkpoints of the reference arm's repeat-0 run, used as pretrained first stages."""
    steps = [round(opts.compare.ae_steps * f) for f in opts.checkpoint_fractions] if opts.compare.ae_steps else []
    return [Arm(f"{reference.key}_step{s}", f"{reference.label} at step {s}",
                str(checkpoint_at(run, s, opts.compare.ae_steps)), reference.ldm_config) for s in steps]


def probe(pipe: Pipeline, key: str, repeat: int, source: Path, opts: StudyOptions, detector: str) -> Path:
    out = Path(opts.out_dir) / "probes" / f"{key}_r{repeat}.json"
    classifier = {"class_accuracy": True, "classifier_cache": Path(opts.out_dir) / "classifier.pt"} \
        if opts.compare.classifier else {}
    pipe.command(f"{key}/r{repeat}/probes",
                 ProbeLatents(ae=source, data=opts.compare.data, split="validation", max_samples=opts.probe_samples,
                              diffusion_steps=opts.diffusion_steps, detector=detector, out=out, **classifier),
                 outputs=lambda _: [out])
    return out


def _mean(values: Sequence[float | None]) -> float | None:
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None


def repeat_rows(records: Sequence[Mapping[str, Any]], probe_files: Sequence[Path]) -> list[dict[str, Any]]:
    """One first stage's numbers per repeat (probes of repeat r's first stage, repeat r's reconstruction and
    downstream metrics); a checkpoint arm has one first stage, so its later repeats carry no probes."""
    probes = [_probe_values(json.loads(Path(p).read_text())["results"]) for p in probe_files]
    rows = []
    for r in range(max(len(records), len(probes))):
        row = {f"probes.{k}": v for k, v in (probes[r] if r < len(probes) else {}).items()}
        record = records[r] if r < len(records) else {}
        for section in ("fmnist", "downstream"):
            row.update({f"{section}.{k}": v for k, v in record.get(section, {}).items()})
        rows.append(row)
    return rows


def mean_row(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """One first stage's numbers (``repeat_rows``), each the mean over repeats."""
    return {k: _mean([r.get(k) for r in rows]) for k in dict.fromkeys(k for r in rows for k in r)}  # first-seen order


def repeat_agreement(per_repeat: Mapping[str, Sequence[Mapping[str, Any]]], resamples: int, seed: int
                     ) -> list[dict[str, Any]]:
    """Each signal's and downstream metric's Spearman ρ between repeat 0 and repeat 1 across first stages. A
    downstream metric whose repeats do not agree on the order of the first stages (ρ >= 0.7 with the interval above
    0) cannot be shown to be predicted by anything at this budget: its agreement bounds what a correlation means."""
    metrics = {**{f"{s}.{k}": label for (s, k), label in SIGNALS.items()},
               **{f"downstream.{t}": f"downstream {label}" for t, label in TARGETS.items()}}
    out = []
    for key, label in metrics.items():
        pairs = [(rows[0].get(key), rows[1].get(key)) for rows in per_repeat.values() if len(rows) >= 2]
        pairs = [(a, b) for a, b in pairs if a is not None and b is not None]
        if len(pairs) >= 4:
            c = spearman_with_interval(*zip(*pairs), resamples=resamples, seed=seed)
            out.append({"metric": label, **c, "agrees": c["rho"] >= 0.7 and c["low"] > 0})
    return out


def _probe_values(results: Mapping[str, Any]) -> dict[str, float]:
    """Scalar probe results; the random detector's kernel distance stands in for KID (named so in the report)."""
    out = {k: float(v) for k, v in results.items() if isinstance(v, (int, float))}
    if "probe_random_kernel_distance" in out:
        out["probe_kid"] = out.pop("probe_random_kernel_distance")
    return out


def correlations(rows: Mapping[str, Mapping[str, Any]], resamples: int, seed: int) -> list[dict[str, Any]]:
    out = []
    for (section, key), label in SIGNALS.items():
        for target, target_label in TARGETS.items():
            pairs = [(r.get(f"{section}.{key}"), r.get(f"downstream.{target}")) for r in rows.values()]
            pairs = [(a, b) for a, b in pairs if a is not None and b is not None]
            if len(pairs) < 4:
                continue
            c = spearman_with_interval(*zip(*pairs), resamples=resamples, seed=seed)
            out.append({"signal": label, "downstream": target_label, **c, "predicts": predicts(c)})
    return out


def run_study(opts: StudyOptions, make_pipeline: Callable[[Path, int], Pipeline] | None = None,
              measure: Callable[[Mapping[str, str]], dict] = measure_encoders, command: str | None = None) -> Path:
    """Both comparisons (trained arms, then early checkpoints), the probes, the correlations; returns report.md."""
    out = Path(opts.out_dir)
    make_pipeline = make_pipeline or (lambda d, jobs: Pipeline(d, threads=compare.threads_per_job(jobs)))
    trained = replace(opts.compare, out_dir=str(out / "trained"))
    pipe_trained = make_pipeline(Path(trained.out_dir), trained.jobs)
    run_comparison(trained, pipe_trained, measure, command)
    sources = first_stages(pipe_trained, trained)
    checkpoints = replace(trained, out_dir=str(out / "checkpoints"),
                          arms=checkpoint_arms(trained.arms[0], sources[trained.arms[0].key][0], opts))
    if checkpoints.arms:
        run_comparison(checkpoints, make_pipeline(Path(checkpoints.out_dir), checkpoints.jobs), measure, command)
        sources.update({arm.key: [Path(arm.ae_config)] for arm in checkpoints.arms})
    records = {**_records(trained), **(_records(checkpoints) if checkpoints.arms else {})}
    pipe = make_pipeline(out, 1)
    detector = pipe_trained.result("detector")["detector"]
    probe_files = {key: [probe(pipe, key, r, src, opts, detector) for r, src in enumerate(srcs)]
                   for key, srcs in sources.items()}
    labels = {a.key: a.label for a in (*trained.arms, *checkpoints.arms)}
    per_repeat = {labels[k]: repeat_rows(records[k], probe_files[k]) for k in sources}
    rows = {name: mean_row(reps) for name, reps in per_repeat.items()}
    # Each probed first stage as its own point (a trained arm's repeats are different autoencoders; a checkpoint
    # arm's repeats share one): its probes against the downstream result of its own latents.
    instances = {f"{labels[k]} r{r}": per_repeat[labels[k]][r] for k in sources for r in range(len(probe_files[k]))}
    # Agreement across repeats only where the repeats are different autoencoders (not a checkpoint arm's shared one).
    retrained = {labels[k]: per_repeat[labels[k]] for k in sources if len(probe_files[k]) >= 2}
    return write_study_report(out, rows, correlations(rows, opts.bootstrap, opts.seed), opts, command, detector,
                              repeat_agreement(retrained, opts.bootstrap, opts.seed),
                              correlations(instances, opts.bootstrap, opts.seed))


def _records(opts: CompareOptions) -> dict[str, list[dict]]:
    return json.loads((Path(opts.out_dir) / "results.json").read_text())["records"]


def plot_signals(rows: Mapping[str, Mapping[str, Any]], path: Path) -> Path | None:
    """One scatter per signal: the signal (x) against downstream FID (y), a dot per first stage, with its ρ."""
    plt = pyplot()
    signals = [(f"{s}.{k}", label) for (s, k), label in SIGNALS.items()
               if sum(r.get(f"{s}.{k}") is not None and r.get("downstream.fid") is not None for r in rows.values()) >= 3]
    if not signals:
        return None
    fig, axes = plt.subplots(1, len(signals), figsize=(2.6 * len(signals), 2.8), squeeze=False)
    for ax, (key, label) in zip(axes[0], signals):
        pairs = [(r[key], r["downstream.fid"]) for r in rows.values()
                 if r.get(key) is not None and r.get("downstream.fid") is not None]
        x, y = zip(*pairs)
        ax.scatter(x, y, s=14)
        ax.set_title(f"{label}\nρ = {spearmanr(x, y).statistic:+.2f}", fontsize=7)
        ax.set_ylabel("downstream FID" if ax is axes[0][0] else "", fontsize=7)
        ax.tick_params(labelsize=6)
    return save_figure(fig, path)


def write_study_report(out: Path, rows: Mapping[str, Mapping[str, Any]], corr: Sequence[Mapping[str, Any]],
                       opts: StudyOptions, command: str | None, detector: str,
                       agreement: Sequence[Mapping[str, Any]] = (),
                       per_instance: Sequence[Mapping[str, Any]] = ()) -> Path:
    fmt = lambda v: f"{v:.3g}" if isinstance(v, float) else v  # noqa: E731
    table = [{"first stage": name, **{label: fmt(row.get(f"{s}.{k}")) for (s, k), label in SIGNALS.items()},
              **{label: fmt(row.get(f"downstream.{t}")) for t, label in TARGETS.items()}} for name, row in rows.items()]
    rho = lambda c: {"ρ": f"{c['rho']:+.2f}", "95 % CI": f"[{c['low']:+.2f}, {c['high']:+.2f}]",  # noqa: E731
                     "n": c["n"]}
    corr_table = lambda cs: [{"signal": c["signal"], "downstream": c["downstream"], **rho(c),  # noqa: E731
                              "predicts": "yes" if c["predicts"] else "no"} for c in cs]
    corr_rows, instance_rows = corr_table(corr), corr_table(per_instance)
    agree_rows = [{"metric": a["metric"], **rho(a), "agrees": "yes" if a["agrees"] else "no"} for a in agreement]
    figure = plot_signals(rows, out / "plots" / "signals_vs_fid.png")
    random_note = ("" if detector != "random" else "\n**Feature distances use a random network: FID/KID columns "
                   "are random-feature distances, comparable within this study only.**\n")
    lines = ["# Do latent probes predict downstream quality?", "",
             f"Command: `{command or 'python scripts/probe_study.py'}`", random_note,
             "A signal *predicts* a downstream metric when |ρ| >= 0.7 and its bootstrap 95 % interval excludes 0 "
             "(Spearman over first stages; each value the mean over the comparison's repeats).", "",
             "## Correlations", "", markdown_table(corr_rows, list(corr_rows[0]) if corr_rows else ["signal"]), "",
             *(["## Correlations per first stage (each probed autoencoder its own point)", "",
                "A trained arm's repeats are different autoencoders (other training seeds); here each is one point, "
                "its probes against the downstream result of its own latents (a checkpoint arm: repeat 0).", "",
                markdown_table(instance_rows, list(instance_rows[0])), ""] if instance_rows else []),
             *(["## Does each metric agree with itself across repeats?", "",
                "Spearman ρ between repeat 0 and repeat 1 over the retrained recipes (other training and sample "
                "seeds; the checkpoint arms, one autoencoder each, are left out). A downstream metric that does not "
                "agree with itself (ρ >= 0.7 with the interval above 0) does not order the recipes at this budget, "
                "so no signal can be shown to predict its per-recipe mean.", "",
                markdown_table(agree_rows, list(agree_rows[0])), ""] if agree_rows else []),
             "## Every first stage", "", markdown_table(table, list(table[0]) if table else ["first stage"]), "",
             *([f"![signals against downstream FID]({figure.relative_to(out).as_posix()})", ""] if figure else []),
             f"Settings: `{json.dumps(dataclasses.asdict(opts), default=str)}`", ""]
    report = out / "report.md"
    report.write_text("\n".join(lines))
    write_json_atomic(out / "results.json", {"rows": rows, "correlations": list(corr),
                                             "per_first_stage_correlations": list(per_instance),
                                             "repeat_agreement": list(agreement), "detector": detector},
                      indent=1, default=str)
    return report
