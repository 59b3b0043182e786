"""Where a tiny config's training step spends its time: ``scripts/benchmark.py --suite step-profile``.

The real step is measured, not a replay of it: a ``Trainer`` runs the module's own ``training_step`` (``train_speed.fit``)
while hooks time what it calls — each network's forward (module forward hooks) and backward (from the gradient
reaching its output, a backward pre-hook, to the gradient reaching its input, or to the end of that backward when its
input needs none), every backward pass (Lightning's ``on_before_backward`` / ``on_after_backward``), the optimizer steps
(with the EMA update, which hooks the same step; under automatic optimisation from the end of the closure's backward) — and a callback times each whole step and the gap to the next (the
data pipeline and the loop). What is left of a step is the loss terms and Lightning's own work. FLOPs by network come
from ``FlopCounterMode`` over one step, the per-op view from ``torch.profiler`` over a few.
"""
from __future__ import annotations

import statistics
import time
from collections import defaultdict
from typing import Any

import pytorch_lightning as pl
import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile
from torch.utils.flop_counter import FlopCounterMode

from ldm.io import markdown_table
from lab.bench.train_speed import Variant, fit


def _networks(module: pl.LightningModule) -> dict[str, nn.Module]:
    """The networks a step runs, by the name the report gives them."""
    if hasattr(module, "autoencoder"):
        nets = {"encoder": module.autoencoder.encoder, "decoder": module.autoencoder.decoder}
        if getattr(module.loss, "discriminator", None) is not None:
            nets["discriminator"] = module.loss.discriminator
        return nets
    return {"backbone": module.unet}


class StepTimer(pl.Callback):
    """Per-step seconds of each part of the real training step, recorded from step ``warmup`` on."""

    def __init__(self, warmup: int) -> None:
        self.warmup, self.steps = warmup, []
        self._part: dict[str, float] = defaultdict(float)
        self._open: dict[str, float] = {}
        self._waiting: list[str] = []  # networks whose backward started and whose input needs no gradient
        self._hooked, self._last_end, self._backward_end = False, None, None

    # -------------------------------------------------------------------------------------------- clock
    def _start(self, name: str) -> None:
        self._open[name] = time.perf_counter()

    def _stop(self, name: str) -> None:
        start = self._open.pop(name, None)
        if start is not None:
            self._part[name] += time.perf_counter() - start

    # -------------------------------------------------------------------------------------------- hooks
    def _hook_network(self, name: str, net: nn.Module) -> None:
        net.register_forward_pre_hook(lambda *_: self._start(f"{name} forward"))
        net.register_forward_hook(lambda *_: self._stop(f"{name} forward"))

        def backward_starts(_module, _grad_output):
            self._start(f"{name} backward")
            self._waiting.append(name)

        def backward_ends(_module, grad_input, _grad_output):
            if any(g is not None for g in grad_input):  # else its backward ends with the pass (on_after_backward)
                self._waiting.remove(name)
                self._stop(f"{name} backward")
        net.register_full_backward_pre_hook(backward_starts)
        net.register_full_backward_hook(backward_ends)

    def _hook_optimizer(self, index: int, optimizer: torch.optim.Optimizer) -> None:
        name = "autoencoder optimizer step + EMA" if index == 0 else "discriminator optimizer step"
        name = "optimizer step + EMA" if len(self._optimizers) == 1 else name
        optimizer.register_step_pre_hook(lambda *_: self._start(name))

        def step_ends(*_):
            # Under automatic optimisation the step evaluates Lightning's closure (forward and backward) first:
            # the optimizer's own time starts where that backward ended.
            if self._backward_end is not None and self._backward_end > self._open.get(name, float("inf")):
                self._open[name] = self._backward_end
            self._stop(name)
        optimizer.register_step_post_hook(step_ends)

    def _hook(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        """At the first batch, after the module's ``on_train_start`` hooked its EMA onto the optimizer, so that the
        optimizer's time includes the EMA update."""
        for name, net in _networks(module).items():
            self._hook_network(name, net)
        self._optimizers = [getattr(o, "optimizer", o) for o in trainer.optimizers]
        for i, optimizer in enumerate(self._optimizers):
            self._hook_optimizer(i, optimizer)
        self._hooked = True

    # -------------------------------------------------------------------------------------- Lightning hooks
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if not self._hooked:
            self._hook(trainer, pl_module)
        now = time.perf_counter()
        gap = now - self._last_end if self._last_end is not None else None
        self._part, self._open, self._step_start = defaultdict(float), {}, now
        if gap is not None:
            self._part["data pipeline and loop (between steps)"] = gap

    def on_before_backward(self, trainer, pl_module, loss) -> None:
        self._start("backward")

    def on_after_backward(self, trainer, pl_module) -> None:
        for name in self._waiting:
            self._stop(f"{name} backward")
        self._waiting.clear()
        self._stop("backward")
        self._backward_end = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._last_end = time.perf_counter()
        if trainer.global_step > self.warmup:
            self.steps.append({**self._part, "step": self._last_end - self._step_start})

    # ------------------------------------------------------------------------------------------ summary
    def parts(self) -> tuple[dict[str, float], float]:
        """Median seconds of each part, and of the whole step period (the step and the gap to the next). Backward
        passes minus the networks' backward are the loss terms' (and autograd's) backward; the step minus every
        measured part is the loss terms' forward and Lightning's own work."""
        median = {k: statistics.median(s.get(k, 0.0) for s in self.steps) for k in self.steps[0]}
        networks = [k for k in median if k.endswith((" forward", " backward")) and k != "backward"]
        backward_nets = sum(median[k] for k in networks if k.endswith(" backward"))
        out = {k: median[k] for k in networks}
        out["loss terms backward (every backward pass minus the networks')"] = median.pop("backward", 0.0) - backward_nets
        out.update({k: v for k, v in median.items() if "optimizer" in k})
        out["loss terms forward and Lightning's own work (the rest of the step)"] = median["step"] - sum(out.values())
        gap = median.get("data pipeline and loop (between steps)", 0.0)
        out["data pipeline and loop (between steps)"] = gap
        return out, median["step"] + gap


class _OneStep(pl.Callback):
    """Runs a context manager (a FLOP counter, a profiler) around training steps ``first`` .. ``first + n - 1``."""

    def __init__(self, context: Any, first: int, n: int = 1) -> None:
        self.context, self.first, self.last = context, first, first + n - 1

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.first:
            self.context.__enter__()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.last + 1:
            self.context.__exit__(None, None, None)


def _flops_by_network(variant: Variant, warmup: int) -> tuple[dict[str, float], float]:
    """FLOPs (forward + backward) of one real step by top-level network class, and the step's total."""
    counter = FlopCounterMode(display=False, depth=1)
    module = fit(variant, 1, warmup, [_OneStep(counter, warmup)])
    counts = {name: float(sum(c.values())) for name, c in counter.get_flop_counts().items() if "." not in name}
    by_network = {name: counts.get(type(net).__name__, 0.0) for name, net in _networks(module).items()}
    return by_network, counts["Global"]


def _top_ops(variant: Variant, warmup: int, steps: int, top: int) -> list[tuple[str, float, int]]:
    prof = profile(activities=[ProfilerActivity.CPU])
    fit(variant, steps, warmup, [_OneStep(prof, warmup, steps)])
    return [(e.key, e.self_cpu_time_total / (steps * 1e3), e.count // steps) for e in
            sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:top]]


def profile_step(variant: Variant, reference_gflops: float, repeats: int = 15, warmup: int = 3,
                 top_ops: int = 15) -> dict:
    """Per-part milliseconds of the real Lightning step (and their share of it), FLOPs per network and top ops."""
    timer = StepTimer(warmup)
    fit(variant, repeats, warmup, [timer])
    parts, step = timer.parts()
    flops, total = _flops_by_network(variant, warmup)
    modules = []
    for name, network_flops in flops.items():
        seconds = parts.get(f"{name} forward", 0.0) + parts.get(f"{name} backward", 0.0)
        modules.append((name, seconds * 1e3, network_flops / 1e9, network_flops / seconds / 1e9 if seconds else 0.0))
    return {"variant": variant.name, "step_s": step, "gflop": total / 1e9, "reference_gflop_per_s": reference_gflops,
            "parts_ms": {k: v * 1e3 for k, v in parts.items()}, "modules": modules,
            "top_ops_ms": _top_ops(variant, warmup, 5, top_ops)}


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
                         ["op (self time, measured steps)", "ms per step", "calls per step"])
    return "\n".join([head, "", parts, networks, ops])
