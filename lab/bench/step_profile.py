"""Where a tiny config's training step spends its time: ``scripts/benchmark.py --suite step-profile``.

The step is replayed part by part outside Lightning with the module's own objects (encoder, decoder, loss terms,
discriminator, optimizers, EMA), each part timed on its own and its FLOPs counted, so that every part's achieved
GFLOP/s can be set against the machine's dense rate (the LiteVAE-B encoder's inference, ``train_speed``). Backward
passes are split at marks placed between the parts (an identity whose backward records the time the gradient
arrives). Lightning's own cost is the real ``Trainer`` step (``train_speed``) minus the replay; the data pipeline is
timed by drawing batches from the same loader. A ``torch.profiler`` table of the replayed step gives the per-op view.
"""
from __future__ import annotations

import statistics
import time
from contextlib import nullcontext
from typing import Any, Callable

import torch
from torch.profiler import ProfilerActivity, profile
from torch.utils.flop_counter import FlopCounterMode

from ldm.io import markdown_table
from lab.bench.train_speed import Variant, fit, seconds_per_step
from ldm.util import step_generator


class _Mark(torch.autograd.Function):
    """Identity; its backward records when the gradient reaches this point."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, name: str, arrivals: dict) -> torch.Tensor:
        ctx.name, ctx.arrivals = name, arrivals
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        ctx.arrivals.setdefault(ctx.name, time.perf_counter())
        return grad, None, None


def _autocast(variant: Variant) -> Any:
    bf16 = any(o.endswith("precision=bf16-mixed") for o in variant.overrides)
    return (lambda: torch.autocast("cpu", torch.bfloat16)) if bf16 else nullcontext


class _Laps:
    """``laps(name)`` records the seconds since the previous lap under ``name``."""

    def __init__(self) -> None:
        self.parts: dict[str, float] = {}
        self.last = time.perf_counter()

    def __call__(self, name: str) -> float:
        now = time.perf_counter()
        self.parts[name], self.last = now - self.last, now
        return now


def _stage1_parts(module: Any, batch: dict, autocast: Callable) -> Callable[[], dict[str, float]]:
    """One stage-1 step (discriminator on) as named parts; returns a function giving each part's seconds."""
    ae, loss = module.autoencoder, module.loss
    opt_ae, opt_d = (getattr(o, "optimizer", o) for o in module.trainer.optimizers)
    x = module.get_input(batch, train=True)

    def step() -> dict[str, float]:
        arrivals: dict[str, float] = {}
        laps = _Laps()
        with autocast():
            posterior = ae.encode(x)
            laps("encoder forward")
            xrec = ae.decode(_Mark.apply(posterior.sample(step_generator(0, 0)), "z", arrivals))
            laps("decoder forward")
            marked = _Mark.apply(xrec, "xrec", arrivals)
            loss.discriminator.requires_grad_(False)
            g_loss, _ = loss.generator_loss(x, marked, posterior, -1)  # every term but the adversarial one
            laps("loss terms forward (pixel, LPIPS, KL, wavelet, Gaussian)")
            g_adv = loss._g_adv(loss._run_discriminator(_Mark.apply(marked, "d_in", arrivals)))
            loss.discriminator.requires_grad_(True)
            total = g_loss + loss.disc_weight * g_adv
            start = laps("discriminator forward, generator side (batch 8)")
        total.backward()
        end = laps("backward")
        opt_ae.step()  # the EMA hook on the optimizer runs inside step()
        opt_ae.zero_grad(set_to_none=True)
        laps("autoencoder optimizer step + EMA update")
        with autocast():
            d_loss, _ = loss.discriminator_loss(x, xrec.detach(), 1 << 30)
        laps("discriminator forward, its own step (batch 16)")
        d_loss.backward()
        laps("discriminator backward, its own step")
        opt_d.step()
        opt_d.zero_grad(set_to_none=True)
        laps("discriminator optimizer step")
        del laps.parts["backward"]
        return {**laps.parts, "discriminator backward, generator side": arrivals["d_in"] - start,
                "loss terms backward": arrivals["xrec"] - arrivals["d_in"],
                "decoder backward": arrivals["z"] - arrivals["xrec"], "encoder backward": end - arrivals["z"]}
    return step


def _stage2_parts(module: Any, batch: dict, autocast: Callable) -> Callable[[], dict[str, float]]:
    optimizer = getattr(module.trainer.optimizers[0], "optimizer", module.trainer.optimizers[0])

    def step() -> dict[str, float]:
        laps, gen = _Laps(), step_generator(0, 0)
        with autocast():
            z, cond = module.get_input(batch, train=True, generator=gen)
            laps("inputs and conditioning (CFG dropout)")
            loss, _ = module.loss(module.unet, z, cond, gen)
            laps("backbone forward + loss")
        loss.backward()
        laps("backward")
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        laps("optimizer step + EMA update")
        return laps.parts
    return step


def _median_parts(step: Callable[[], dict[str, float]], repeats: int) -> dict[str, float]:
    for _ in range(3):
        step()
    runs = [step() for _ in range(repeats)]
    return {name: statistics.median(r[name] for r in runs) for name in runs[0]}


def _flops_by_root(step: Callable[[], dict[str, float]]) -> dict[str, float]:
    """FLOPs (forward + backward) of one step by top-level module class (``"Global"``: all)."""
    with FlopCounterMode(display=False, depth=1) as counter:
        step()
    return {name: float(sum(c.values())) for name, c in counter.get_flop_counts().items() if "." not in name}


def _groups(module: Any, variant: Variant) -> dict[str, tuple[list[str], list[str]]]:
    """``{group: (its parts, the module classes whose FLOPs it does)}``; ``[]`` = what no module does."""
    if variant.stage == 2:
        return {"backbone (forward + loss + backward)": (["backbone forward + loss", "backward"],
                                                         [type(module.unet).__name__])}
    name = lambda m: [type(m).__name__]  # noqa: E731
    return {"encoder": (["encoder forward", "encoder backward"], name(module.autoencoder.encoder)),
            "decoder": (["decoder forward", "decoder backward"], name(module.autoencoder.decoder)),
            "discriminator (both sides)": ([p for p in _STAGE1_DISC_PARTS], name(module.loss.discriminator)),
            "loss terms": (["loss terms forward (pixel, LPIPS, KL, wavelet, Gaussian)", "loss terms backward"], [])}


_STAGE1_DISC_PARTS = ("discriminator forward, generator side (batch 8)", "discriminator backward, generator side",
                      "discriminator forward, its own step (batch 16)", "discriminator backward, its own step")


def profile_step(variant: Variant, reference_gflops: float, repeats: int = 15, top_ops: int = 15) -> dict:
    """Per-part milliseconds (and their share of the Lightning step), the step's FLOPs and top ops."""
    module = fit(variant, 2)  # a real Trainer run builds the optimizers and their EMA hook
    module.train()
    loader = module.trainer.train_dataloader
    batch = next(iter(loader))
    autocast = _autocast(variant)
    step = (_stage1_parts if variant.stage == 1 else _stage2_parts)(module, batch, autocast)
    parts = _median_parts(step, repeats)
    flops = _flops_by_root(step)
    modules = []
    for group, (names, roots) in _groups(module, variant).items():
        group_flops = sum(flops.get(r, 0.0) for r in roots) if roots else \
            flops["Global"] - sum(v for k, v in flops.items() if k != "Global")
        seconds = sum(parts[n] for n in names)
        modules.append((group, seconds * 1e3, group_flops / 1e9, group_flops / seconds / 1e9))
    iterator = iter(loader)
    t0 = time.perf_counter()
    for _ in range(repeats):
        next(iterator)
    parts["data pipeline (one batch from the loader)"] = (time.perf_counter() - t0) / repeats
    replay = sum(parts.values())
    lightning = seconds_per_step(variant, steps=repeats, warmup=3)
    parts["Lightning's own work (Trainer step minus the replay)"] = lightning - replay
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(5):
            step()
    ops = [(e.key, e.self_cpu_time_total / 5e3, e.count // 5) for e in
           sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:top_ops]]
    return {"variant": variant.name, "step_s": lightning, "gflop": flops["Global"] / 1e9,
            "reference_gflop_per_s": reference_gflops, "parts_ms": {k: v * 1e3 for k, v in parts.items()},
            "modules": modules, "top_ops_ms": ops}


def markdown(report: dict) -> str:
    """The report as the tables docs/benchmarks.md holds."""
    step_ms, ref = report["step_s"] * 1e3, report["reference_gflop_per_s"]
    rate = report["gflop"] / report["step_s"]
    head = (f"**{report['variant']}**: {step_ms:.0f} ms per Lightning step, {report['gflop']:.2f} GFLOP "
            f"({rate:.0f} GFLOP/s, {rate / ref:.2f} of the reference's {ref:.0f})")
    parts = markdown_table([[name, f"{ms:.1f}", f"{ms / step_ms:.0%}"] for name, ms in report["parts_ms"].items()],
                           ["part", "ms", "share of the step"])
    networks = markdown_table([[name, f"{ms:.1f}", f"{gflop:.2f}", f"{r:.0f}", f"{r / ref:.2f}"]
                               for name, ms, gflop, r in report["modules"]],
                              ["network (forward + backward)", "ms", "GFLOP", "GFLOP/s", "of the dense rate"])
    ops = markdown_table([[f"`{name}`", f"{ms:.1f}", calls] for name, ms, calls in report["top_ops_ms"]],
                         ["op (self time, replayed step)", "ms per step", "calls per step"])
    return "\n".join([head, "", parts, networks, ops])
