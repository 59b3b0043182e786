"""Per-kernel profile of one training forward+backward of LiteVAE-B and SD-VAE (meant for CUDA)."""
from __future__ import annotations

import torch

from lab.bench.common import (batch_for, build_encoder, fused_variants, images, prepare, ratio_tag,
                                   train_forward_backward_fused)
from lab.bench.measure import synchronize


def suite_profile(args, ratios: dict) -> list[dict]:
    """Per-kernel profile of one training forward+backward of LiteVAE-B and SD-VAE (and with the fused
    GroupNorm+SiLU kernel where it runs): the top kernels by self device time (CPU: self CPU time), printed
    in full and returned as rows."""
    from torch.profiler import ProfilerActivity, profile

    cuda = torch.device(args.device).type == "cuda"
    batch = batch_for(args, 1, 1)
    x = images(args, batch)
    rows = []
    for name in ("LiteVAE-B", "SD-VAE"):
        enc = prepare(build_encoder(name), args).train()
        for suffix, fused in fused_variants(args).items():
            def step(enc=enc, fused=fused):
                train_forward_backward_fused(enc, x, args, fused)
            step()  # warm-up: cuDNN autotuning, Triton JIT
            synchronize(args.device)
            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
            with profile(activities=activities) as prof:
                step()
                synchronize(args.device)
            events = prof.key_averages()
            attr = "self_device_time_total" if cuda else "self_cpu_time_total"
            # On CUDA the kernels themselves (device events), so that no time is counted twice through the
            # aten ops that launched them.
            kernels = [e for e in events if not cuda or e.device_type == torch.autograd.DeviceType.CUDA] or events
            total = sum(getattr(e, attr) for e in kernels)
            top = sorted(kernels, key=lambda e: getattr(e, attr), reverse=True)[:12]
            print(f"\n{name}{suffix}: forward+backward, batch {batch}, {args.resolution}², "
                  f"{total / 1e3:.1f} ms self time in all")
            print(events.table(sort_by=attr, row_limit=25))
            ratios[f"profile_fwd_bwd_ms_{name}{ratio_tag(args, fused)}"] = round(total / 1e3, 2)
            rows += [{"suite": "profile", "name": name + suffix, "kernel": e.key[:70],
                      "self_ms": round(getattr(e, attr) / 1e3, 3), "calls": e.count,
                      "share": round(getattr(e, attr) / total, 3)} for e in top]
        del enc
    return rows
