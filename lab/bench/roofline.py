"""FLOPs and minimum activation bytes per image, and the H200's roofline bound (counted on the CPU)."""
from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from lab.bench.common import H200_PEAK_BYTES_PER_S, H200_PEAK_FLOPS, build_encoder


def activation_bytes(encoder: nn.Module, x: torch.Tensor, bytes_per_element: int = 2) -> dict[str, float]:
    """Per image, the activation bytes a forward moves under three models (one call each):

    - ``conv``: every convolution reads its input once and writes its output once; GroupNorm, SiLU, residual
      adds and concatenations are fused into them (the ideal fusion; a lower bound for layer-by-layer
      execution). Counted by forward hooks.
    - ``conv+gn``: as ``conv`` plus one more read of every GroupNorm input for its statistics (what a fused
      GroupNorm+SiLU kernel in front of each convolution needs at the least).
    - ``every op``: every tensor operation reads its inputs and writes its output once (unfused eager
      execution, all in bf16; under CUDA autocast GroupNorm's output is fp32, so eager moves more still).
      Counted by a dispatch mode over the aten operations.

    Weights are left out (read once per batch, amortised over batch 32); ``bytes_per_element`` 2 is bf16.
    """
    from torch.utils._python_dispatch import TorchDispatchMode

    weights = {p.data_ptr() for p in encoder.parameters()}
    totals = {"conv": 0, "gn": 0, "ops": 0}

    def hook(kind):
        def count(module, inputs, output):
            totals[kind] += inputs[0].numel() + (output.numel() if kind == "conv" else 0)
        return count

    class CountOps(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func.overloadpacket not in (torch.ops.aten.view, torch.ops.aten._unsafe_view, torch.ops.aten.detach,
                                           torch.ops.aten.t, torch.ops.aten.permute, torch.ops.aten.unsqueeze):
                flat = torch.utils._pytree.tree_leaves((args, kwargs, out))
                totals["ops"] += sum(t.numel() for t in flat
                                     if isinstance(t, torch.Tensor) and t.data_ptr() not in weights)
            return out
    handles = [m.register_forward_hook(hook("conv" if isinstance(m, nn.Conv2d) else "gn"))
               for m in encoder.modules() if isinstance(m, (nn.Conv2d, nn.GroupNorm))]
    try:
        with torch.inference_mode():
            encoder(x)
        handles, old = [], handles
        for h in old:
            h.remove()
        with torch.inference_mode(), CountOps():
            encoder(x)
    finally:
        for h in handles:
            h.remove()
    conv = totals["conv"] * bytes_per_element / len(x)
    return {"conv": conv, "conv+gn": conv + totals["gn"] * bytes_per_element / len(x),
            "every op": totals["ops"] * bytes_per_element / len(x)}


def suite_roofline(args, ratios: dict) -> list[dict]:
    """FLOPs and minimum activation bytes per image (counted on CPU, one forward each), and the H200's
    upper bound on images/s: min(peak FLOP/s / FLOPs, bandwidth / bytes). Docs: docs/benchmarks.md."""
    x = torch.rand(1, 3, args.resolution, args.resolution) * 2 - 1
    ridge = H200_PEAK_FLOPS / H200_PEAK_BYTES_PER_S
    rows = []
    for n in ("LiteVAE-B", "SD-VAE"):
        enc = build_encoder(n).eval()
        counter = FlopCounterMode(display=False)
        with counter, torch.inference_mode():
            enc(x)
        flops = counter.get_total_flops()
        for model, nbytes in activation_bytes(enc, x).items():
            intensity = flops / nbytes
            bound = min(H200_PEAK_FLOPS / flops, H200_PEAK_BYTES_PER_S / nbytes)
            rows.append({"suite": "roofline", "name": n, "bytes_model": model, "gflop_per_image": round(flops / 1e9, 2),
                         "min_mbytes_per_image": round(nbytes / 1e6, 1), "flop_per_byte": round(intensity, 1),
                         "h200_ridge_flop_per_byte": round(ridge, 1),
                         "binding_limit": "compute" if intensity >= ridge else "memory",
                         "h200_bound_images_per_s": round(bound), "resolution": args.resolution})
            ratios[f"roofline_bound_images_per_s_{n}_{model.replace(' ', '_')}"] = round(bound)
    return rows
