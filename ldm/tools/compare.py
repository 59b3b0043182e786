"""The downstream encoder comparison behind ``scripts/compare_encoders.py``.

For each encoder ("arm"): train the autoencoder (same decoder, loss and steps) or take a pretrained one as is
(a diffusers folder, stage-1 run folder or checkpoint), cache its latents, train the same LDM on them, sample
the same seeds, and evaluate (PSNR/SSIM/rFID; FID/KID and the class accuracy of the samples). Every stage is
a public command run through ``ldm.tools.pipeline.Pipeline``, so a re-run resumes where it stopped. The report
(``report.md``, ``plots/``, ``grids/``) is rebuilt from the recorded results.
"""
from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
from PIL import Image, ImageDraw

from ldm.tools.pipeline import PY, Pipeline, curve
from ldm.util import image_grid

log = logging.getLogger(__name__)


# A stage-1 config is a YAML file; anything else ``ldm.checkpoints.load_first_stage`` reads is a trained first stage.
PRETRAINED_SUFFIXES = (".ckpt", ".safetensors")


@dataclass
class Arm:
    """One encoder under comparison: its stage-1 config (trained here) or a pretrained first stage (used as is:
    a diffusers folder, a stage-1 run folder, a ``.ckpt`` or ``.safetensors``), and the stage-2 config trained
    on its latents."""

    key: str  # short name used for folders and stage names
    label: str  # shown in the report
    ae_config: str
    ldm_config: str

    @property
    def pretrained(self) -> bool:
        path = Path(self.ae_config).expanduser()
        return path.is_dir() or path.suffix in PRETRAINED_SUFFIXES


TINY_FMNIST_ARMS = [
    Arm("litevae", "LiteVAE", "configs/autoencoder/litevae_tiny.yaml", "configs/ldm/fmnist_litevae_tiny.yaml"),
    Arm("sd_vae", "SD-VAE", "configs/autoencoder/sd_vae_tiny.yaml", "configs/ldm/fmnist_sd_vae_tiny.yaml"),
]


@dataclass
class CompareOptions:
    """What to compare and with which budget. ``*_steps`` / ``*_minutes`` of None keep the configs' values."""

    out_dir: str = "outputs/compare_fmnist"
    data: str = "configs/data/fmnist64_cache.yaml"  # cached for stage 2; its validation split is evaluated
    arms: list[Arm] = field(default_factory=lambda: list(TINY_FMNIST_ARMS))
    ae_steps: int | None = None
    ae_minutes: float | None = None
    ldm_steps: int | None = None
    ldm_minutes: float | None = None
    seeds: str = "0-499"
    sample_batch: int = 100
    detector: str = "auto"  # auto: Inception when its weights are present, else random features
    eval_samples: int = 1000  # validation images for PSNR/SSIM/rFID
    classifier: bool = True  # class accuracy of the samples (needs a labelled --data)
    ae_overrides: list[str] = field(default_factory=list)
    ldm_overrides: list[str] = field(default_factory=list)


# ------------------------------------------------------------------------------------------ budgets
def budget_overrides(steps: int | None, minutes: float | None, disc_start: bool = False) -> list[str]:
    """Trainer overrides for a step and/or wall-clock budget (whichever ends first stops the run).

    With a step budget the stage-1 discriminator starts halfway, so the full loss always runs partway.
    """
    out = []
    if steps is not None:
        out.append(f"lightning.trainer.max_steps={steps}")
        if disc_start:
            out.append(f"model.params.loss.params.disc_start={steps // 2}")
    if minutes is not None:
        out.append(f"lightning.trainer.max_time.seconds={round(minutes * 60)}")
    return out


def resolve_detector(spec: str) -> str:
    """``auto`` → ``inception`` when its weights can be loaded, else ``random`` (labelled not comparable)."""
    if spec != "auto":
        return spec
    from ldm.evaluation import build_detector

    try:
        build_detector("inception")
        return "inception"
    except (FileNotFoundError, RuntimeError, OSError) as err:
        log.warning("no Inception weights (%s): FID/KID use random features and are only comparable within "
                    "this report", err)
        return "random"


# ------------------------------------------------------------------------------------------ stages
def arm_stages(pipe: Pipeline, arm: Arm, opts: CompareOptions, detector: str) -> dict[str, Any]:
    """Run (or skip, when recorded) every stage of one arm; returns the paths the report needs."""
    out = Path(opts.out_dir)
    if arm.pretrained:  # nothing to train: its own weights, not the stage-1 budget, define this encoder
        ae_run = Path(arm.ae_config).expanduser()
    else:
        ae_run = pipe.train(f"{arm.key}/stage1", [arm.ae_config], out / "runs", f"{arm.key}_ae",
                            budget_overrides(opts.ae_steps, opts.ae_minutes, disc_start=True) + opts.ae_overrides)
    latents = out / "latents" / arm.key
    for split in ("train", "validation"):
        pipe.command(f"{arm.key}/cache_{split}",
                     [PY, "scripts/cache_latents.py", "--ae", ae_run, "--data", opts.data, "--split", split,
                      "--out", latents, "--workers", "0"],
                     outputs=lambda _: [latents / "manifest.json"])
    ldm_run = pipe.train(f"{arm.key}/stage2", [arm.ldm_config], out / "runs", f"{arm.key}_ldm",
                         [f"latents={latents}"] + budget_overrides(opts.ldm_steps, opts.ldm_minutes)
                         + opts.ldm_overrides)
    samples = out / "samples" / arm.key
    pipe.command(f"{arm.key}/sample", [PY, "scripts/sample.py", ldm_run, "--seeds", opts.seeds,
                                       "--batch", opts.sample_batch, "--out", samples],
                 outputs=lambda _: [samples / "samples.npz", samples / "grid.png"])
    ae_eval = out / "eval" / f"{arm.key}_ae.json"
    pipe.command(f"{arm.key}/eval_ae", [PY, "scripts/eval_autoencoder.py", "--ae", ae_run, "--data", opts.data,
                                        "--split", "validation", "--weights", "ema", "--max-samples",
                                        opts.eval_samples, "--detector", detector, "--out", ae_eval],
                 outputs=lambda _: [ae_eval])
    ldm_eval = out / "eval" / f"{arm.key}_ldm.json"
    classifier = (["--classifier-data", opts.data, "--classifier-cache", out / "eval" / "classifier.pt"]
                  if opts.classifier else [])
    pipe.command(f"{arm.key}/eval_ldm", [PY, "scripts/eval_fid.py", "--samples", samples / "samples.npz",
                                         "--ref", opts.data, "--ref-split", "validation", "--detector", detector,
                                         "--ref-stats-cache", out / "eval" / f"ref_{detector}.npz", "--kid",
                                         "--kid-subset-size", 100, "--kid-subsets", 50, *classifier,
                                         "--out", ldm_eval],
                 outputs=lambda _: [ldm_eval])
    return {"ae_run": ae_run, "ldm_run": ldm_run, "samples": samples, "ae_eval": ae_eval, "ldm_eval": ldm_eval}


def measure_encoders(ae_runs: Mapping[str, str], batch_size: int = 32, repeats: int = 5) -> dict[str, dict]:
    """Encoder parameters and CPU inference throughput (images/s, 64x64, EMA weights), timed interleaved."""
    import torch

    from ldm.tools.benchmarking import time_round_robin
    from ldm.checkpoints import load_first_stage
    from ldm.util import count_params

    models = {k: load_first_stage(run, use_ema=True, device="cpu")[0] for k, run in ae_runs.items()}
    size = 64
    x = torch.randn(batch_size, 3, size, size, generator=torch.Generator().manual_seed(0)).clamp(-1, 1)

    def encode(model):
        with torch.no_grad():
            return model.encode(x).mode()

    secs = time_round_robin({k: (lambda m=m: encode(m)) for k, m in models.items()}, repeats=repeats)
    out = {}
    for key, model in models.items():
        quant = getattr(model, "quant_conv", None)  # SD's 1x1 moments conv belongs to the encoder side
        params = count_params(model.encoder) + (count_params(quant) if quant is not None else 0)
        out[key] = {"encoder_params": params, "encoder_images_per_s": batch_size / secs[key],
                    "throughput_setting": f"CPU, batch {batch_size}, {size}x{size}, {torch.get_num_threads()} threads"}
    return out


def run_comparison(opts: CompareOptions, pipe: Pipeline | None = None,
                   measure: Callable[[Mapping[str, str]], dict] = measure_encoders, command: str | None = None) -> Path:
    """Every stage of every arm (resumable), the encoder measurement, then the report; returns report.md."""
    pipe = pipe or Pipeline(opts.out_dir)
    check_options(pipe, opts)
    detector = pipe.step("detector", lambda: {"detector": resolve_detector(opts.detector)})["detector"]
    paths = {arm.key: arm_stages(pipe, arm, opts, detector) for arm in opts.arms}
    encoders = pipe.step("encoder_throughput", lambda: measure({k: str(p["ae_run"]) for k, p in paths.items()}))
    rows = [summary_row(arm, paths[arm.key], encoders[arm.key], pipe) for arm in opts.arms]
    return write_report(opts, rows, paths, detector, command)


def check_options(pipe: Pipeline, opts: CompareOptions) -> None:
    """A folder holds one comparison: resuming it with other settings would mix budgets, so refuse."""
    settings = json.loads(json.dumps(dataclasses.asdict(opts)))
    settings.pop("out_dir")
    recorded = pipe.state.setdefault("options", settings)
    if recorded != settings:
        changed = sorted(k for k in settings.keys() | recorded.keys() if settings.get(k) != recorded.get(k))
        raise ValueError(f"{pipe.state_path} was made with other settings ({', '.join(changed)}); "
                         f"use another --out (or the same settings to resume)")


# ------------------------------------------------------------------------------------------ results
def _read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())


def _stage_minutes(pipe: Pipeline, prefix: str, names: Sequence[str]) -> float:
    secs = pipe.seconds()
    return sum(secs.get(f"{prefix}/{n}", 0.0) for n in names) / 60


def summary_row(arm: Arm, paths: Mapping[str, Any], encoder: Mapping[str, Any], pipe: Pipeline) -> dict:
    """One row of the report table from the recorded results of one arm."""
    ae = next(r for r in _read_json(paths["ae_eval"])["results"] if r["weights"] in ("ema", "raw", "as stored"))
    ldm = _read_json(paths["ldm_eval"])
    return {
        "encoder": arm.label,
        "encoder params": encoder["encoder_params"],
        "encoder img/s": encoder["encoder_images_per_s"],
        "PSNR": ae.get("psnr"), "SSIM": ae.get("ssim"), "LPIPS": ae.get("lpips"), "rFID": ae.get("rfid"),
        "FID": ldm.get("fid"), "KID": ldm.get("kid_mean"), "accuracy": ldm.get("class_accuracy"),
        "stage 1 min": None if arm.pretrained else _stage_minutes(pipe, arm.key, ["stage1"]),
        "cache min": _stage_minutes(pipe, arm.key, ["cache_train", "cache_validation"]),
        "stage 2 min": _stage_minutes(pipe, arm.key, ["stage2"]),
        "sampling min": _stage_minutes(pipe, arm.key, ["sample"]),
        "eval min": _stage_minutes(pipe, arm.key, ["eval_ae", "eval_ldm"]),
    }


def markdown_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """GitHub table; floats with 4 significant digits, parameter counts with thousands separators."""
    def cell(key: str, value: Any) -> str:
        if value is None:
            return "—"
        if key == "encoder params":
            return f"{int(value):,}"
        if isinstance(value, float):
            if key == "accuracy":
                return f"{100 * value:.1f}%"
            return f"{value:.1f}" if key.endswith(" min") else f"{value:.4g}"
        return str(value)
    columns = list(rows[0])
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(c, row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------ figures
def _save_figure(fig, path: str | Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_curves(runs: Mapping[str, Mapping[str, str | Path]], panels: Sequence[tuple[str, str, str]],
                path: str | Path) -> Path:
    """One subplot per ``(run kind, metric key, title)``; one line per arm. ``runs[label][kind]`` = run folder."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.2), squeeze=False)
    for ax, (kind, key, title) in zip(axes[0], panels):
        for label, run in runs.items():
            points = curve(run[kind], key)
            if points:
                ax.plot(*zip(*points), label=label, marker="." if len(points) < 20 else None)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return _save_figure(fig, path)


def plot_bars(rows: Sequence[Mapping[str, Any]], metrics: Sequence[str], path: str | Path) -> Path:
    """One bar subplot per metric (skipping metrics no row has), one bar per encoder."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [m for m in metrics if any(r.get(m) is not None for r in rows)]
    fig, axes = plt.subplots(1, len(metrics), figsize=(2.6 * len(metrics), 3), squeeze=False)
    labels = [r["encoder"] for r in rows]
    for ax, metric in zip(axes[0], metrics):
        values = [float("nan") if r.get(metric) is None else float(r[metric]) for r in rows]
        ax.bar(labels, values, color=[f"C{i}" for i in range(len(rows))])
        ax.set_title(metric, fontsize=10)
        ax.tick_params(axis="x", labelsize=8)
    return _save_figure(fig, path)


def side_by_side(images: Mapping[str, str | Path], path: str | Path, gap: int = 8, caption: int = 16) -> Path:
    """The images next to each other, each with its label above, on a white background."""
    tiles = {label: Image.open(p).convert("RGB") for label, p in images.items()}
    height = max(t.height for t in tiles.values()) + caption
    width = sum(t.width for t in tiles.values()) + gap * (len(tiles) - 1)
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    x = 0
    for label, tile in tiles.items():
        draw.text((x + 2, 2), label, fill="black")
        canvas.paste(tile, (x, caption))
        x += tile.width + gap
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path


def class_grid(npz: str | Path, path: str | Path, per_class: int = 10) -> Path:
    """Row c of the grid = the first samples of class c (``samples.npz`` with labels), up to ``per_class``
    and the same number in every row."""
    with np.load(npz) as data:
        images, labels = data["arr_0"], data["labels"]
    classes = np.unique(labels)
    per_class = min(per_class, min(int((labels == c).sum()) for c in classes))
    rows = [images[labels == c][:per_class] for c in classes]
    grid = image_grid(np.concatenate(rows), nrow=per_class)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid.squeeze(-1) if grid.shape[-1] == 1 else grid).save(path)
    return path


def last_image(run_dir: str | Path, prefix: str, split: str = "val") -> Path | None:
    """The newest ``images/<split>/<prefix>_gs-*.png`` grid of a run (the highest step)."""
    files = sorted(Path(run_dir, "images", split).glob(f"{prefix}_gs-*.png"))
    return files[-1] if files else None


# ------------------------------------------------------------------------------------------ report
CURVE_PANELS = [("ae_run", "train/rec", "stage 1: reconstruction loss"),
                ("ae_run", "train/loss", "stage 1: total loss"),
                ("ae_run", "val/psnr_ema", "stage 1: val PSNR (EMA) [dB]"),
                ("ldm_run", "train/loss", "stage 2: diffusion loss"),
                ("ldm_run", "val/loss_ema", "stage 2: val loss (EMA)")]
BAR_METRICS = ["encoder img/s", "PSNR", "SSIM", "rFID", "FID", "KID", "accuracy"]


def _sample_grid(samples: Path, path: Path) -> Path:
    """The class-sorted grid of a class-conditional run, else sample.py's own grid.png."""
    with np.load(samples / "samples.npz") as data:
        labelled = "labels" in data.files
    return class_grid(samples / "samples.npz", path) if labelled else samples / "grid.png"


def make_grids(paths: Mapping[str, Mapping[str, Any]], labels: Mapping[str, str], grids: Path) -> list[Path]:
    """Class-sorted samples side by side (one row per class, the same seeds for every arm), and the last
    stage-1 validation reconstructions side by side (inputs first) when the runs logged them."""
    samples = {labels[k]: _sample_grid(Path(p["samples"]), grids / f"samples_{k}.png") for k, p in paths.items()}
    out = [side_by_side(samples, grids / "samples.png")]
    recs = {labels[k]: last_image(p["ae_run"], "reconstructions_ema") or last_image(p["ae_run"], "reconstructions")
            for k, p in paths.items()}
    inputs = last_image(next(iter(paths.values()))["ae_run"], "inputs")
    if inputs is not None and all(recs.values()):
        out.append(side_by_side({"input": inputs, **recs}, grids / "reconstructions.png"))
    return out


def write_report(opts: CompareOptions, rows: Sequence[Mapping[str, Any]], paths: Mapping[str, Mapping[str, Any]],
                 detector: str, command: str | None = None) -> Path:
    """``report.md`` with the table, the plots and the grids (all paths relative to the report)."""
    out = Path(opts.out_dir)
    labels = {arm.key: arm.label for arm in opts.arms}
    runs = {labels[k]: p for k, p in paths.items()}
    figures = [plot_curves(runs, CURVE_PANELS, out / "plots" / "curves.png"),
               plot_bars(rows, BAR_METRICS, out / "plots" / "metrics.png")]
    grids = make_grids(paths, labels, out / "grids")
    settings = {k: v for k, v in dataclasses.asdict(opts).items() if k != "arms"}
    comparable = detector != "random"
    lines = [
        "# Encoder comparison: " + " vs ".join(labels.values()), "",
        f"Command: `{command or 'python scripts/compare_encoders.py'}`", "",
        markdown_table(rows),
        "Same decoder, loss and steps in stage 1 (pretrained arms are used as they are); the same LDM config, "
        "steps and sample seeds in stage 2. PSNR/SSIM/rFID: EMA weights where present, on the validation split; "
        "FID/KID: samples vs the validation split; "
        "accuracy: a small classifier trained on the real training images, on the samples under their "
        "conditioning class (seed s has class s % classes). Minutes are wall-clock per stage on this machine.",
        "",
        ("FID/KID/rFID use Inception features." if comparable else
         "**FID/KID/rFID use a random feature network (no Inception weights found): they compare the two "
         "encoders within this report only and are not comparable with published numbers.** The class "
         "accuracy is the comparable downstream number here."), "",
        *[f"![{p.stem}]({p.relative_to(out).as_posix()})" for p in figures + grids], "",
        "Arms: " + "; ".join(f"{a.label}: `{a.ae_config}`{' (pretrained, used as is)' * a.pretrained} + "
                             f"`{a.ldm_config}`" for a in opts.arms), "",
        f"Settings: `{json.dumps(settings)}`", "",
    ]
    report = out / "report.md"
    report.write_text("\n".join(lines))
    (out / "results.json").write_text(json.dumps({"rows": list(rows), "detector": detector, "settings": settings},
                                                 indent=1, default=str))
    return report
