"""The fast Haar DWT pyramid against ptwt.wavedec2: speed forward and forward+backward, and the error."""
from __future__ import annotations

import torch

from autoencoder.wavelets import haar_dwt_pyramid
from lab.bench.common import batch_for, timed


def suite_dwt(args, ratios: dict) -> list[dict]:
    import ptwt

    batch = batch_for(args, 4, 16)
    x = torch.randn(batch, 3, args.resolution, args.resolution, device=args.device)

    def ptwt_levels(inp):  # the paper's way: one wavedec2 per level, bands scaled by 1/2^level
        out = []
        for level in (1, 2, 3):
            coeffs = ptwt.wavedec2(inp, "haar", level=level, mode="symmetric")
            out.append(torch.cat([coeffs[0], *coeffs[1]], dim=1) / 2**level)
        return out

    xg = x.clone().requires_grad_(True)
    fns = {
        "fast fwd": lambda: haar_dwt_pyramid(x, 3),
        "ptwt fwd": lambda: ptwt_levels(x),
        "fast fwd+bwd": lambda: sum(t.sum() for t in haar_dwt_pyramid(xg, 3)).backward(),
        "ptwt fwd+bwd": lambda: sum(t.sum() for t in ptwt_levels(xg)).backward(),
    }
    secs = timed(fns, args, 7, 20)
    err = max((a - b).abs().max().item() for a, b in zip(haar_dwt_pyramid(x, 3), ptwt_levels(x)))
    ratios["dwt_max_abs_err"] = err
    rows = []
    for mode, key in (("fwd", "dwt_fwd_speedup_vs_ptwt"), ("fwd+bwd", "dwt_fwdbwd_speedup_vs_ptwt")):
        ratios[key] = round(secs[f"ptwt {mode}"] / secs[f"fast {mode}"], 3)
        rows.append({"suite": "dwt", "name": f"fast DWT {mode}", "ms": round(1e3 * secs[f"fast {mode}"], 2),
                     "ptwt_ms": round(1e3 * secs[f"ptwt {mode}"], 2), "speedup_vs_ptwt": ratios[key],
                     "max_abs_err": err, "batch": batch, "resolution": args.resolution})
    return rows
