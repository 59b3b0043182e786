"""The downstream encoder comparison behind ``scripts/compare_encoders.py``.

For each encoder ("arm") and each repeat: train the autoencoder (same decoder, loss and steps) or take a
pretrained one as is (a diffusers folder, stage-1 run folder or checkpoint), cache its latents, train the same
LDM on them, sample, and evaluate (PSNR/SSIM/LPIPS/rFID; FID/KID and the class accuracy of the samples); with
``photos`` set, also train and evaluate stage 1 on natural photos. Repeat r trains with seed ``r`` and samples
seeds shifted by ``r * SEED_STRIDE``. Every stage is a public command run through
``lab.pipeline.Pipeline``, so a re-run resumes where it stopped. ``lab.compare_report`` writes the
report (verdict, tables with mean ± std and Welch's t-tests, plots, grids).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

from lab.compare_report import write_report
from lab.pipeline import Pipeline, curve
from lab.stages import CacheLatents, EvalAutoencoder, EvalSamples, Sample, Train

log = logging.getLogger(__name__)


# A stage-1 config is a YAML file; anything else ``ldm.checkpoints.load_first_stage`` reads is a trained first stage.
PRETRAINED_SUFFIXES = (".ckpt", ".safetensors")
# Sample seeds of repeat r are the requested ones plus r * SEED_STRIDE: disjoint across repeats, and a multiple
# of every class count up to 10 so seed % classes (the conditioning class) stays balanced.
SEED_STRIDE = 100_000


@dataclass
class Arm:
    """One encoder under comparison: its stage-1 config (trained here) or a pretrained first stage (used as is:
    a diffusers folder, a stage-1 run folder, a ``.ckpt`` or ``.safetensors``), the stage-2 config trained on its
    latents, and config overrides for its stage-1 runs (e.g. another encoder width)."""

    key: str  # short name used for folders and stage names
    label: str  # shown in the report
    ae_config: str
    ldm_config: str
    ae_overrides: list[str] = field(default_factory=list)

    @property
    def pretrained(self) -> bool:
        path = Path(self.ae_config).expanduser()
        return path.is_dir() or path.suffix in PRETRAINED_SUFFIXES


# The paper's question: LiteVAE against an SD-layout encoder (ch_mult [1,2,4,4]) with ~5x its parameters, as
# SD-VAE's 34.16M encoder has 5.06x LiteVAE-B's 6.75M; same decoder, loss and steps.
PAPER_RATIO_ARMS = [
    Arm("litevae", "LiteVAE", "configs/autoencoder/litevae_tiny.yaml", "configs/ldm/fmnist_litevae_tiny.yaml"),
    Arm("sd_vae", "SD-VAE (5x encoder)", "configs/autoencoder/sd_vae_tiny.yaml",
        "configs/ldm/fmnist_sd_vae_tiny.yaml"),
]
# The paper's other claim (LiteVAE-S: 33x fewer encoder parameters than SD-VAE, within 0.13 dB): the tiny LiteVAE
# with the S model's relative widths (feature extractor and aggregator 16 channels, multipliers [1, 2, 2]).
LITE_S_ARM = Arm("lite_s", "LiteVAE-S widths", "configs/autoencoder/litevae_tiny.yaml",
                 "configs/ldm/fmnist_litevae_tiny.yaml",
                 [f"model.params.autoencoder.params.encoder_config.params.{key}={value}"
                  for key, value in (("extractor_channels", 16), ("extractor_mult", "[1,2,2]"),
                                     ("aggregator_channels", 16), ("aggregator_mult", "[1,2,2]"))])
# A different question: latent quality at equal encoder cost (an SD-layout encoder of LiteVAE's size).
EQUAL_SIZE_ARM = Arm("sd_vae_equal", "SD-VAE (equal size)", "configs/autoencoder/sd_vae_tiny.yaml",
                     "configs/ldm/fmnist_sd_vae_tiny.yaml",
                     ["model.params.autoencoder.params.encoder_config.params.ch=16",
                      "model.params.autoencoder.params.encoder_config.params.ch_mult=[1,2,2,4]"])
# The arms --arms picks by key (the first is the reference of the plots; the report tests every pair).
KNOWN_ARMS = {arm.key: arm for arm in (*PAPER_RATIO_ARMS, LITE_S_ARM, EQUAL_SIZE_ARM)}


@dataclass
class CompareOptions:
    """What to compare and with which budget. ``*_steps`` / ``*_minutes`` of None keep the configs' values."""

    out_dir: str = "outputs/compare_fmnist"
    data: str = "configs/data/fmnist64_compare.yaml"  # cached for stage 2; its validation split is evaluated
    photos: str | None = "configs/data/photos64.yaml"  # stage 1 again on natural photos (None: skip)
    arms: list[Arm] = field(default_factory=lambda: list(PAPER_RATIO_ARMS))
    repeats: int = 2
    ldm_config: str | None = None  # one stage-2 config for every arm (e.g. a DiT + flow model), else the arms'
    ae_steps: int | None = 300  # per stage-1 run (Fashion-MNIST and photos), discriminator from step 150
    ae_minutes: float | None = None
    ldm_steps: int | None = 600
    ldm_minutes: float | None = None
    seeds: str = "0-299"  # 30 per class; Inception runs at ~5 img/s on 2 CPU cores, so counts stay small
    sample_batch: int = 100
    detector: str = "auto"  # see ldm.evaluation.detectors: real Inception features unless told otherwise
    eval_samples: int = 200  # validation images for PSNR/SSIM/rFID (all 220 photo tiles have 4 crops/photo)
    max_ref: int = 500  # validation images for the FID/KID reference
    classifier: bool = True  # class accuracy of the samples (needs a labelled --data)
    jobs: int = 2  # (arm, repeat) chains run at once, each command with cpu_count // jobs threads
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


# Evaluation points along each run's step budget: a verdict never rests on a single point (the convergence check
# of compare_report judges the last half of the budget).
STAGE1_POINTS, STAGE2_POINTS = 4, 2


def evaluation_steps(budget: int | None, points: int) -> list[int]:
    """The steps at which a run of ``budget`` steps is evaluated: the ends of ``points`` equal parts (none for a
    wall-clock budget, whose step count is not known in advance)."""
    return [] if budget is None else [budget * k // points for k in range(1, points + 1)]


def tracking_overrides(budget: int | None, points: int, eval_samples: int | None = None) -> list[str]:
    """A checkpoint at every evaluation step; with ``eval_samples`` (stage 1) also a validation there on the
    evaluation's first images in one batch, so the PSNR/SSIM curves are measured on the evaluated images."""
    if budget is None:
        return []
    every = max(1, budget // points)
    out = [f"lightning.checkpoint.every_n_train_steps={every}"]
    if eval_samples:
        out += [f"lightning.trainer.val_check_interval={every}", "lightning.trainer.check_val_every_n_epoch=null",
                "lightning.trainer.limit_val_batches=1", f"data.params.val_batch_size={eval_samples}"]
    return out


def checkpoint_at(run: Path, step: int | None, budget: int | None) -> Path:
    """The run itself (its last.ckpt) at the end of the budget, else its periodic checkpoint of ``step``."""
    return run if step is None or step == budget else run / "checkpoints" / f"step={step:07d}.ckpt"


def threads_per_job(jobs: int) -> int | None:
    """OMP threads per command when ``jobs`` commands share the machine (None: leave the environment's)."""
    return None if jobs == 1 else max(1, (os.cpu_count() or 1) // jobs)


def downstream_suffix(opts: CompareOptions) -> str:
    """Names of the stage-2 stages and outputs of a ``--ldm-config`` variant: ``_<config stem>``, so that variants
    share one folder's stage-1 runs and latents (and only train their own downstream models)."""
    return "" if opts.ldm_config is None else "_" + Path(opts.ldm_config).stem


def repeat_seeds(spec: str, repeat: int) -> str:
    """The sample seeds of one repeat: ``spec`` shifted by ``repeat * SEED_STRIDE``, as inclusive ranges."""
    from ldm.generate import parse_seeds

    seeds = [s + repeat * SEED_STRIDE for s in parse_seeds(spec)]
    ranges: list[list[int]] = []
    for s in seeds:
        if ranges and s == ranges[-1][1] + 1:
            ranges[-1][1] = s
        else:
            ranges.append([s, s])
    return ",".join(f"{a}-{b}" if b > a else str(a) for a, b in ranges)


def resolve_detector(spec: str) -> str:
    """``auto`` → ``inception`` or ``fid-helper`` (``ldm.evaluation.detectors.resolve_detector_spec``); no
    Inception at all is an error, never a silent switch to random features."""
    from ldm.evaluation.detectors import resolve_detector_spec

    return resolve_detector_spec(spec)


# ------------------------------------------------------------------------------------------ stages
def stage1(pipe: Pipeline, arm: Arm, opts: CompareOptions, repeat: int, data: str | None = None) -> Path:
    """Train (or, for a pretrained arm, take) the arm's autoencoder; ``data`` replaces the config's data."""
    if arm.pretrained:  # nothing to train: its own weights, not the stage-1 budget, define this encoder
        return Path(arm.ae_config).expanduser()
    kind = "photos_stage1" if data else "stage1"
    return pipe.train(f"{arm.key}/r{repeat}/{kind}", Train(
        bases=(arm.ae_config, *([data] if data else [])), logdir=Path(opts.out_dir) / "runs",
        name=f"{arm.key}_r{repeat}_{'photos_ae' if data else 'ae'}", seed=repeat,
        overrides=(*budget_overrides(opts.ae_steps, opts.ae_minutes, disc_start=True),
                   *tracking_overrides(opts.ae_steps, STAGE1_POINTS, opts.eval_samples), *arm.ae_overrides,
                   *opts.ae_overrides)))


def eval_autoencoder(pipe: Pipeline, name: str, ae_run: Path, data: str, opts: CompareOptions, detector: str,
                     out: Path) -> Path:
    real = Path(opts.out_dir) / "eval" / f"real_{Path(data).stem}_{detector}_{opts.eval_samples}.npz"
    pipe.command(name, EvalAutoencoder(ae=ae_run, data=data, split="validation", weights="ema",
                                       max_samples=opts.eval_samples, detector=detector, real_features_cache=real,
                                       out=out),
                 outputs=lambda _: [out])
    return out


def stage1_evaluations(pipe: Pipeline, arm: Arm, opts: CompareOptions, detector: str, repeat: int, run: Path,
                       data: str, kind: str) -> dict[int, Path]:
    """``{step: eval JSON}``: the reconstruction metrics (rFID included) at the last two evaluation points of a
    trained arm, at its end only for a pretrained one (key 0); the end's file keeps the name it always had."""
    out, name = Path(opts.out_dir) / "eval", f"{arm.key}_r{repeat}_{'photos_' if kind == 'photos' else ''}ae"
    steps = [None] if arm.pretrained else (evaluation_steps(opts.ae_steps, STAGE1_POINTS)[-2:] or [None])
    stage = f"{arm.key}/r{repeat}/{'photos_' if kind == 'photos' else ''}eval_ae"
    return {step or 0: eval_autoencoder(pipe, stage + ("" if step in (None, opts.ae_steps) else f"_step{step}"),
                                        checkpoint_at(run, step, opts.ae_steps), data, opts, detector,
                                        out / f"{name}{'' if step in (None, opts.ae_steps) else f'_step{step}'}.json")
            for step in steps}


def arm_stages(pipe: Pipeline, arm: Arm, opts: CompareOptions, detector: str, repeat: int) -> dict[str, Any]:
    """Run (or skip, when recorded) every stage of one arm in one repeat; returns the paths the report needs."""
    out, tag = Path(opts.out_dir), f"{arm.key}/r{repeat}"
    ae_run = stage1(pipe, arm, opts, repeat)
    latents = out / "latents" / arm.key / f"r{repeat}"
    for split in ("train", "validation"):
        pipe.command(f"{tag}/cache_{split}",
                     CacheLatents(ae=ae_run, data=opts.data, split=split, out=latents, workers=0),
                     outputs=lambda _: [latents / "manifest.json"])
    variant = downstream_suffix(opts)
    ldm_run = pipe.train(f"{tag}/stage2{variant}", Train(
        bases=(opts.ldm_config or arm.ldm_config,), logdir=out / "runs", name=f"{arm.key}_r{repeat}_ldm{variant}",
        seed=repeat, overrides=(f"latents={latents}", *budget_overrides(opts.ldm_steps, opts.ldm_minutes),
                                *tracking_overrides(opts.ldm_steps, STAGE2_POINTS), *opts.ldm_overrides)))
    # Samples (the same seeds) at every evaluation point; the end's folder and file keep their names.
    ldm_points = {}
    for step in evaluation_steps(opts.ldm_steps, STAGE2_POINTS) or [None]:
        end = step in (None, opts.ldm_steps)
        suffix = "" if end else f"_step{step}"
        samples = out / "samples" / arm.key / f"r{repeat}{variant}{suffix}"
        pipe.command(f"{tag}/sample{variant}{suffix}",
                     Sample(source=checkpoint_at(ldm_run, step, opts.ldm_steps), seeds=repeat_seeds(opts.seeds, repeat),
                            batch_size=opts.sample_batch, out=samples),
                     outputs=lambda _, samples=samples: [samples / "samples.npz", samples / "grid.png"])
        ldm_points[step or 0] = {"samples": samples, "stage": f"{tag}/eval_ldm{variant}{suffix}",
                                 "eval": out / "eval" / f"{arm.key}_r{repeat}_ldm{variant}{suffix}.json"}
    ae_evals = stage1_evaluations(pipe, arm, opts, detector, repeat, ae_run, opts.data, "fmnist")
    final = ldm_points[max(ldm_points)]
    paths = {"ae_run": ae_run, "ldm_run": ldm_run, "samples": final["samples"], "ae_eval": ae_evals[max(ae_evals)],
             "ae_evals": ae_evals, "ldm_eval": final["eval"], "ldm_points": ldm_points}
    if opts.photos and not arm.pretrained:
        paths["photo_run"] = stage1(pipe, arm, opts, repeat, data=opts.photos)
        paths["photo_evals"] = stage1_evaluations(pipe, arm, opts, detector, repeat, paths["photo_run"], opts.photos,
                                                  "photos")
        paths["photo_eval"] = paths["photo_evals"][max(paths["photo_evals"])]
    return paths


def eval_samples(pipe: Pipeline, arm: Arm, opts: CompareOptions, detector: str, repeat: int,
                 paths: Mapping[str, Any]) -> None:
    """FID/KID/class accuracy of one arm's samples. Run one at a time: the first call writes the reference
    statistics and the classifier that the others reuse."""
    out = Path(opts.out_dir)
    classifier = {"classifier_data": opts.data, "classifier_cache": out / "eval" / "classifier.pt"} \
        if opts.classifier else {}
    for point in paths["ldm_points"].values():
        pipe.command(point["stage"],
                     EvalSamples(samples=Path(point["samples"]) / "samples.npz", ref=opts.data, ref_split="validation",
                                 max_ref=opts.max_ref, detector=detector,
                                 ref_stats_cache=out / "eval" / f"ref_{detector}_{opts.max_ref}.npz", kid=True,
                                 kid_subset_size=100, kid_subsets=50, precision_recall=True, out=point["eval"],
                                 **classifier),
                     outputs=lambda _, point=point: [point["eval"]])


def measure_encoders(ae_runs: Mapping[str, str], batch_size: int = 32, repeats: int = 5,
                     size: int = 64) -> dict[str, dict]:
    """Encoder parameters, FLOPs per image, CPU inference throughput (timed interleaved) and peak inference
    memory (bytes of tensors allocated during one batch's encode), EMA weights, ``size`` x ``size`` inputs."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from ldm.checkpoints import load_first_stage
    from lab.bench.measure import peak_memory_growth, time_round_robin
    from ldm.util import count_params

    models = {k: load_first_stage(run, use_ema=True, device="cpu")[0] for k, run in ae_runs.items()}
    x = torch.randn(batch_size, 3, size, size, generator=torch.Generator().manual_seed(0)).clamp(-1, 1)

    def encode(model, images=x):
        with torch.no_grad():
            return model.encode(images).mode()

    secs = time_round_robin({k: (lambda m=m: encode(m)) for k, m in models.items()}, repeats=repeats)
    out = {}
    for key, model in models.items():
        quant = getattr(model, "quant_conv", None)  # SD's 1x1 moments conv belongs to the encoder side
        params = count_params(model.encoder) + (count_params(quant) if quant is not None else 0)
        with FlopCounterMode(display=False) as counter:
            encode(model, x[:1])
        out[key] = {"encoder_params": params, "encoder_flops": counter.get_total_flops(),
                    "encoder_images_per_s": batch_size / secs[key],
                    "encoder_peak_bytes": peak_memory_growth(lambda m=model: encode(m), "cpu"),
                    "throughput_setting": f"CPU, batch {batch_size}, {size}x{size}, {torch.get_num_threads()} "
                                          f"threads, median of {repeats} interleaved runs; memory: peak bytes of "
                                          f"tensors allocated during one batch's encode"}
    return out


# ------------------------------------------------------------------------------------------ results
def _read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())


def _feature_metric(result: Mapping[str, Any], key: str) -> float | None:
    """An Inception metric, or the random network's counterpart (written under another name, never "fid")."""
    from ldm.evaluation.detectors import RANDOM_METRIC_NAMES

    return result.get(key, result.get(RANDOM_METRIC_NAMES[key]))


def ae_metrics(path: Path) -> dict:
    """PSNR/SSIM/LPIPS/rFID of the evaluated weights (EMA where present) from an eval_autoencoder.py result."""
    result = next(r for r in _read_json(path)["results"] if r["weights"] in ("ema", "raw", "as stored"))
    return {"psnr": result.get("psnr"), "ssim": result.get("ssim"), "lpips": result.get("lpips"),
            "rfid": _feature_metric(result, "rfid")}


def downstream_metrics(path: Path) -> dict:
    ldm = _read_json(path)
    return {"fid": _feature_metric(ldm, "fid"), "kid": _feature_metric(ldm, "kid_mean"),
            "precision": ldm.get("precision"), "recall": ldm.get("recall"), "accuracy": ldm.get("class_accuracy")}


def stage1_curve(run: Path | None, evals: Mapping[int, Path], budget: int | None) -> dict[int, dict]:
    """``{step: {metric: value}}`` of one stage-1 run: PSNR/SSIM (EMA weights) of its validations at every
    evaluation point, and every metric of the evaluations (rFID included) at theirs."""
    points: dict[int, dict] = {}
    if run is not None and budget:
        every = max(1, budget // STAGE1_POINTS)
        for key, name in (("val/psnr_ema", "psnr"), ("val/ssim_ema", "ssim")):
            for step, value in curve(run, key):  # logged at the step's index: 0-based
                points.setdefault(round((step + 1) / every) * every, {})[name] = value
    for step, path in evals.items():
        points.setdefault(step, {}).update({k: v for k, v in ae_metrics(path).items() if v is not None})
    return points


def repeat_record(arm: Arm, paths: Mapping[str, Any], pipe: Pipeline, repeat: int, variant: str = "",
                  opts: CompareOptions | None = None) -> dict:
    """Every number of one arm in one repeat: ``{section: {metric: value}, "curves": {section: {step: {metric:
    value}}}, "minutes": {stage: minutes}}`` (the sections hold the end of the budget)."""
    opts = opts or CompareOptions()
    secs = pipe.seconds()

    def minutes(*names: str) -> float | None:
        found = [secs[f"{arm.key}/r{repeat}/{n}"] for n in names if f"{arm.key}/r{repeat}/{n}" in secs]
        return sum(found) / 60 if found else None
    record = {"fmnist": ae_metrics(paths["ae_eval"]), "downstream": downstream_metrics(paths["ldm_eval"]),
              "curves": {"fmnist": stage1_curve(None if arm.pretrained else paths["ae_run"],
                                                paths.get("ae_evals", {}), opts.ae_steps),
                         "downstream": {step: downstream_metrics(p["eval"])
                                        for step, p in paths.get("ldm_points", {}).items()}},
              "minutes": {"stage 1": minutes("stage1"), "cache": minutes("cache_train", "cache_validation"),
                          "stage 2": minutes(f"stage2{variant}"), "sampling": minutes(f"sample{variant}"),
                          "eval": minutes("eval_ae", f"eval_ldm{variant}"),
                          "photos stage 1": minutes("photos_stage1"), "photos eval": minutes("photos_eval_ae")}}
    if "photo_eval" in paths:
        record["photos"] = ae_metrics(paths["photo_eval"])
        record["curves"]["photos"] = stage1_curve(paths["photo_run"], paths["photo_evals"], opts.ae_steps)
    record["minutes"] = {k: v for k, v in record["minutes"].items() if v is not None}
    return record


def run_comparison(opts: CompareOptions, pipe: Pipeline | None = None,
                   measure: Callable[[Mapping[str, str]], dict] = measure_encoders, command: str | None = None) -> Path:
    """Every stage of every arm and repeat (resumable), the encoder measurement, then the report; returns report.md."""
    pipe = pipe or Pipeline(opts.out_dir, threads=threads_per_job(opts.jobs))
    check_options(pipe, opts)
    detector = pipe.step("detector", lambda: {"detector": resolve_detector(opts.detector)})["detector"]
    # Each (arm, repeat) chain is independent until the sample evaluation: run `jobs` chains at once (tiny models
    # use two cores better as two one-thread processes than as one two-thread process).
    chains = [(arm, r) for r in range(opts.repeats) for arm in opts.arms]
    with ThreadPoolExecutor(max_workers=opts.jobs) as pool:
        done = list(pool.map(lambda chain: arm_stages(pipe, chain[0], opts, detector, chain[1]), chains))
    paths = {arm.key: [p for (a, _), p in zip(chains, done) if a.key == arm.key] for arm in opts.arms}
    for arm in opts.arms:
        for r, p in enumerate(paths[arm.key]):
            eval_samples(pipe, arm, opts, detector, r, p)
    encoders = pipe.step("encoder_cost", lambda: measure({k: str(reps[0]["ae_run"]) for k, reps in paths.items()}))
    records = {arm.key: [repeat_record(arm, p, pipe, r, downstream_suffix(opts), opts)
                         for r, p in enumerate(paths[arm.key])] for arm in opts.arms}
    settings = {k: v for k, v in dataclasses.asdict(opts).items() if k != "arms"}
    arms_text = "; ".join(f"{a.label}: `{a.ae_config}`{' ' + ' '.join(a.ae_overrides) if a.ae_overrides else ''}"
                          f"{' (pretrained, used as is)' * a.pretrained} + `{opts.ldm_config or a.ldm_config}`"
                          for a in opts.arms)
    return write_report(Path(opts.out_dir), records, encoders, paths, {a.key: a.label for a in opts.arms}, detector,
                        settings, arms_text, command, name=f"report{downstream_suffix(opts)}")


def check_options(pipe: Pipeline, opts: CompareOptions) -> None:
    """A folder holds one comparison: resuming it with other settings would mix budgets, so refuse."""
    settings = json.loads(json.dumps(dataclasses.asdict(opts)))
    # Where and how fast are not what (a resume may change them); a --ldm-config variant shares stage 1 and latents.
    for key in ("out_dir", "jobs", "ldm_config"):
        settings.pop(key)
    recorded = pipe.state.setdefault("options", settings)
    if recorded != settings:
        changed = sorted(k for k in settings.keys() | recorded.keys() if settings.get(k) != recorded.get(k))
        raise ValueError(f"{pipe.state_path} was made with other settings ({', '.join(changed)}); "
                         f"use another --out (or the same settings to resume)")
