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

from ldm.tools.train_speed import Variant, fit, seconds_per_step
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


def _stage1_parts(module: Any, batch: dict, autocast: Callable) -> Callable[[], dict[str, float]]:
    """One stage-1 step (discriminator on) as named parts; returns a function giving each part's seconds."""
    ae, loss = module.autoencoder, module.loss
    opt_ae, opt_d = (o.optimizer if hasattr(o, "optimizer") else o for o in module.trainer.optimizers)
    x = module.get_input(batch, train=True)

    def step() -> dict[str, float]:
        arrivals: dict[str, float] = {}
        t = [time.perf_counter()]
        with autocast():
            posterior = ae.encode(x)
            t.append(time.perf_counter())
            z = _Mark.apply(posterior.sample(step_generator(0, 0)), "z", arrivals)
            xrec = ae.decode(z)
            t.append(time.perf_counter())
            marked = _Mark.apply(xrec, "xrec", arrivals)
            loss.discriminator.requires_grad_(False)
            g_loss, _ = loss.generator_loss(x, marked, posterior, -1)  # every term but the adversarial one
            t.append(time.perf_counter())
            g_adv = loss._g_adv(loss._run_discriminator(_Mark.apply(marked, "d_in", arrivals)))
            loss.discriminator.requires_grad_(True)
            total = g_loss + loss.disc_weight * g_adv
            t.append(time.perf_counter())
        total.backward()
        t.append(time.perf_counter())
        opt_ae.step()
        opt_ae.zero_grad(set_to_none=True)  # the EMA hook on the optimizer runs inside step(): timed apart below
        t.append(time.perf_counter())
        with autocast():
            d_loss, _ = loss.discriminator_loss(x, xrec.detach(), 1 << 30)
        t.append(time.perf_counter())
        d_loss.backward()
        t.append(time.perf_counter())
        opt_d.step()
        opt_d.zero_grad(set_to_none=True)
        t.append(time.perf_counter())
        b0, b1 = t[4], t[5]
        return {"encoder forward": t[1] - t[0], "decoder forward": t[2] - t[1],
                "loss terms forward (pixel, LPIPS, KL, wavelet, Gaussian)": t[3] - t[2],
                "discriminator forward, generator side (batch 8)": t[4] - t[3],
                "discriminator backward, generator side": arrivals["d_in"] - b0,
                "loss terms backward": arrivals["xrec"] - arrivals["d_in"],
                "decoder backward": arrivals["z"] - arrivals["xrec"], "encoder backward": b1 - arrivals["z"],
                "autoencoder optimizer step + EMA update": t[6] - t[5],
                "discriminator forward, its own step (batch 16)": t[7] - t[6],
                "discriminator backward, its own step": t[8] - t[7], "discriminator optimizer step": t[9] - t[8]}
    return step


def _stage2_parts(module: Any, batch: dict, autocast: Callable) -> Callable[[], dict[str, float]]:
    optimizer = module.trainer.optimizers[0]
    optimizer = getattr(optimizer, "optimizer", optimizer)

    def step() -> dict[str, float]:
        t = [time.perf_counter()]
        gen = step_generator(0, 0)
        with autocast():
            z, cond = module.get_input(batch, train=True, generator=gen)
            t.append(time.perf_counter())
            loss, _ = module.loss(module.unet, z, cond, gen)
            t.append(time.perf_counter())
        loss.backward()
        t.append(time.perf_counter())
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        t.append(time.perf_counter())
        return {"inputs and conditioning (CFG dropout)": t[1] - t[0],
                "backbone forward + loss": t[2] - t[1], "backward": t[3] - t[2],
                "optimizer step + EMA update": t[4] - t[3]}
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
    step_ms = report["step_s"] * 1e3
    lines = [f"**{report['variant']}**: {step_ms:.0f} ms per Lightning step, {report['gflop']:.2f} GFLOP "
             f"({report['gflop'] / report['step_s']:.0f} GFLOP/s, {report['gflop'] / report['step_s'] / report['reference_gflop_per_s']:.2f} "
             f"of the reference's {report['reference_gflop_per_s']:.0f})", "", "| part | ms | share of the step |", "|---|---|---|"]
    lines += [f"| {name} | {ms:.1f} | {ms / step_ms:.0%} |" for name, ms in report["parts_ms"].items()]
    ref = report["reference_gflop_per_s"]
    lines += ["", "| network (forward + backward) | ms | GFLOP | GFLOP/s | of the dense rate |", "|---|---|---|---|---|"]
    lines += [f"| {name} | {ms:.1f} | {gflop:.2f} | {rate:.0f} | {rate / ref:.2f} |"
              for name, ms, gflop, rate in report["modules"]]
    lines += ["", "| op (self time, replayed step) | ms per step | calls per step |", "|---|---|---|"]
    lines += [f"| `{name}` | {ms:.1f} | {calls} |" for name, ms, calls in report["top_ops_ms"]]
    return "\n".join(lines)
