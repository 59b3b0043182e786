"""The GPU path: bf16 autocast, channels_last, SDPA attention, torch.compile, Lightning on one CUDA device.

Marked ``cuda``: collected only where a CUDA device is visible (tests/conftest.py deselects them elsewhere)
and run by ``scripts/gpu_check.sh``. Each test compares the CUDA result with a CPU fp32 reference or with
a closed form, so a silent dtype or layout bug on the GPU path fails here.
"""
from __future__ import annotations

import io
import math
import tarfile

import numpy as np
import ptwt
import pytest
import pytorch_lightning as pl
import torch
from omegaconf import OmegaConf

from autoencoder.litevae_encoder import LiteVAEEncoder
from autoencoder.sd_vae import Encoder as SDEncoder
from autoencoder.wavelets import haar_dwt_pyramid
from conftest import LITEVAE_TINY, STAGE1_TEST_OVERRIDES
from ldm import cli
from ldm.cache.writer import CacheOptions, cache_rank
from ldm.checkpoints import load_first_stage
from helpers import build, image_dataset, perturb, stage2_config

pytestmark = pytest.mark.cuda
CUDA = torch.device("cuda")


@pytest.fixture(autouse=True)
def _exact_fp32():
    """TF32 would make 'fp32 on CUDA' differ from CPU by ~1e-3; the references below want real fp32."""
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def relative_error(got: torch.Tensor, ref: torch.Tensor) -> float:
    return ((got.float().cpu() - ref).norm() / ref.norm()).item()


@pytest.mark.parametrize("name", ["LiteVAE-B", "SD-VAE"])
def test_encoder_bf16_channels_last_matches_cpu_fp32(name):
    torch.manual_seed(0)
    enc = (LiteVAEEncoder(size="B", z_channels=4) if name == "LiteVAE-B" else SDEncoder(z_channels=4)).eval()
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    with torch.inference_mode():
        ref = enc(x)
        gpu = enc.to(CUDA, memory_format=torch.channels_last)
        fp32 = gpu(x.to(CUDA).contiguous(memory_format=torch.channels_last))
        with torch.autocast("cuda", dtype=torch.bfloat16):
            bf16 = gpu(x.to(CUDA).contiguous(memory_format=torch.channels_last))
    assert relative_error(fp32, ref) < 1e-4
    assert bf16.dtype == torch.bfloat16 and relative_error(bf16, ref) < 5e-2  # bf16 has 8 mantissa bits


def test_fast_dwt_on_cuda_matches_ptwt():
    x = torch.randn(2, 3, 64, 48)
    xg = x.to(CUDA).requires_grad_(True)
    bands = haar_dwt_pyramid(xg, 3)
    for level, got in enumerate(bands, start=1):
        coeffs = ptwt.wavedec2(x, "haar", level=level, mode="symmetric")
        ref = torch.cat([coeffs[0], *coeffs[1]], dim=1) / 2**level
        torch.testing.assert_close(got.cpu(), ref, atol=1e-5, rtol=1e-5)
    sum(b.square().sum() for b in bands).backward()
    assert xg.grad is not None and torch.isfinite(xg.grad).all()


def test_compiled_encoder_matches_eager():
    torch.manual_seed(1)
    enc = LiteVAEEncoder(size=None, z_channels=4, extractor_channels=16, extractor_mult=(1, 2),
                         aggregator_channels=16, aggregator_mult=(1, 2)).to(CUDA).eval()
    x = torch.rand(2, 3, 64, 64, device=CUDA) * 2 - 1
    compiled = torch.compile(enc)
    with torch.inference_mode():
        torch.testing.assert_close(compiled(x), enc(x), atol=1e-4, rtol=1e-4)


def test_stage1_training_bf16_mixed_through_cli(tmp_path, setup):
    """The real CLI on one GPU with bf16-mixed: every loss term finite, EMA and both optimizers stepped."""
    config = OmegaConf.load(LITEVAE_TINY)  # its Fashion-MNIST folder may not exist on a GPU machine
    folder = {"target": "ldm.data.ImageFolder", "params": {"root": str(setup["images"]), "size": 32}}
    config.data.params.train = config.data.params.validation = folder
    OmegaConf.save(config, tmp_path / "stage1.yaml")
    overrides = [o for o in STAGE1_TEST_OVERRIDES if not o.startswith(("data.params.train", "data.params.val"))]
    argv = ["--base", str(tmp_path / "stage1.yaml"), "-t", "-l", str(tmp_path / "logs"), *overrides,
            "lightning.trainer.max_steps=4", "lightning.trainer.accelerator=gpu", "lightning.trainer.devices=1",
            "lightning.trainer.precision=bf16-mixed"]
    assert cli.main(argv) == 0
    (run,) = [p for p in (tmp_path / "logs").iterdir() if p.is_dir()]
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 4
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values() if v.is_floating_point())
    metrics = (run / "csv" / "metrics.csv").read_text().splitlines()
    header = metrics[0].split(",")
    for line in metrics[1:]:
        for key, value in zip(header, line.split(",")):
            if key.startswith("train/") and value:
                assert math.isfinite(float(value)), key


def test_stage2_step_and_sampling_bf16(setup, tmp_path):
    model, data = build(stage2_config(setup["cache"], "class"))
    perturb(model)
    trainer = pl.Trainer(max_steps=2, accelerator="gpu", devices=1, precision="bf16-mixed", logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         limit_val_batches=0, default_root_dir=str(tmp_path))
    trainer.fit(model, datamodule=data)
    assert model.global_step == 2 and torch.isfinite(trainer.callback_metrics["train/loss"])
    model = model.to(CUDA).eval()
    seeds, labels = [0, 1, 2, 3], [0, 1, 0, 1]
    with torch.autocast("cuda", dtype=torch.bfloat16):
        z_bf16 = model.sample_latents(seeds, labels=labels, steps=4)
        images = model.decode(z_bf16)
    assert images.shape == (4, 3, 32, 32) and torch.isfinite(images).all()
    z = model.sample_latents(seeds, labels=labels, steps=4)
    assert z.device.type == "cuda" and relative_error(z_bf16, z.cpu()) < 5e-2
    # Noise is drawn per seed: the same seed gives the same latent inside another batch (fp32, no TF32).
    again = model.sample_latents([2, 0], labels=[0, 0], steps=4)
    torch.testing.assert_close(again[1], z[0], atol=1e-4, rtol=1e-4)


def read_means(folder) -> dict[str, np.ndarray]:
    means = {}
    for shard in sorted(folder.glob("*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                if member.name.endswith(".mean.npy"):
                    means[member.name[:-len(".mean.npy")]] = np.load(io.BytesIO(tar.extractfile(member).read()))
    return means


def test_caching_on_cuda_matches_cpu(setup, tmp_path):
    model, _ = load_first_stage(setup["stage1"])
    dataset = image_dataset(setup["images"], setup["captions"])
    means = {}
    for device in ("cpu", "cuda"):
        opts = CacheOptions(out_dir=str(tmp_path / device), batch_size=8, samples_per_shard=16, precision="fp32")
        cache_rank(model.to(device), dataset, opts, device=device)
        means[device] = read_means(tmp_path / device)
    assert len(means["cpu"]) == len(dataset) and means["cpu"].keys() == means["cuda"].keys()
    for key, ref in means["cpu"].items():  # stored as fp16: equal up to fp16 rounding
        np.testing.assert_allclose(means["cuda"][key].astype(np.float32), ref.astype(np.float32),
                                   atol=2e-3, rtol=2e-3)


# ------------------------------------------------------------------ fused GroupNorm+SiLU kernel (autoencoder/fused_norm.py)
# Every dtype x layout x residual at a LiteVAE width; bf16 (the training dtype) also at odd sizes (C/G = 4,
# 17x19 pixels). Each combination compiles its own kernels, so the grid is kept to what differs.
FUSED_CASES = [((2, 96, 32, 32), 32, dtype, cl, res) for dtype in (torch.float32, torch.bfloat16, torch.float16)
               for cl in (False, True) for res in (False, True)]
FUSED_CASES += [((3, 20, 17, 19), 5, torch.bfloat16, cl, res) for cl in (False, True) for res in (False, True)]


@pytest.mark.parametrize("shape,groups,dtype,channels_last,residual", FUSED_CASES)
def test_fused_norm_kernel_matches_reference_on_cuda(shape, groups, residual, channels_last, dtype):
    """The compiled Triton kernel (not the interpreter) against F.group_norm + F.silu (+ add) in fp32."""
    from autoencoder.fused_norm import fused_group_norm_silu, reference_group_norm_silu

    g = torch.Generator(device=CUDA).manual_seed(0)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = (torch.randn(shape, device=CUDA, generator=g) * 2 + 3).to(dtype).contiguous(memory_format=fmt)
    r = torch.randn(shape, device=CUDA, generator=g).to(dtype) if residual else None
    w, b = torch.randn(shape[1], device=CUDA, generator=g), torch.randn(shape[1], device=CUDA, generator=g)
    dy, ds = torch.randn(shape, device=CUDA, generator=g).to(dtype), torch.randn(shape, device=CUDA, generator=g).to(dtype)
    xs, ws, bs = (t.clone().requires_grad_(True) for t in (x, w, b))
    rs = r.clone().requires_grad_(True) if residual else None
    out = fused_group_norm_silu(xs, ws, bs, groups, 1e-6, rs)
    y, s = out if residual else (out, None)
    ((y.float() * dy.float()).sum() + ((s.float() * ds.float()).sum() if residual else 0)).backward()
    # Reference in fp32 on the (rounded) sum the kernel normalises.
    s_ref = (x + r if residual else x).float().requires_grad_(True)
    wr, br = w.clone().requires_grad_(True), b.clone().requires_grad_(True)
    y_ref = reference_group_norm_silu(s_ref, wr, br, groups, 1e-6)
    (y_ref * dy.float()).sum().backward()
    dx_ref = s_ref.grad + (ds.float() if residual else 0)
    assert y.dtype == dtype and y.stride() == x.stride() and xs.grad.dtype == dtype
    if residual:
        assert torch.equal(s, x + r)  # rounded to nearest, exactly as PyTorch's add
    tol = 1e-4 if dtype == torch.float32 else 1e-2  # relative L2; bf16/fp16 output and gradient rounding
    grads = [(xs.grad, dx_ref), (ws.grad, wr.grad), (bs.grad, br.grad)] + ([(rs.grad, dx_ref)] if residual else [])
    for got, ref in [(y, y_ref)] + grads:
        assert relative_error(got, ref.cpu()) < tol


def test_fused_norm_is_opt_in_and_keeps_litevae_numbers(monkeypatch):
    """Off by default; switched on, LiteVAE-B under bf16 autocast stays within bf16 rounding of the reference
    path, forward and backward, and the in-place inference variants agree with the autograd path."""
    from autoencoder import fused_norm

    monkeypatch.delenv(fused_norm.ENV_VAR, raising=False)
    norm = torch.nn.GroupNorm(4, 8).to(CUDA)
    assert not fused_norm.kernel_applies(torch.zeros(1, 8, 2, 2, device=CUDA), norm)
    with fused_norm.use_fused_norm(True):
        assert fused_norm.kernel_applies(torch.zeros(1, 8, 2, 2, device=CUDA), norm)
    torch.manual_seed(0)
    enc = LiteVAEEncoder(size="B", z_channels=4).to(CUDA, memory_format=torch.channels_last)
    x = (torch.rand(2, 3, 64, 64, device=CUDA) * 2 - 1).contiguous(memory_format=torch.channels_last)
    results = {}
    for fused in (False, True):
        enc.zero_grad(set_to_none=True)
        with fused_norm.use_fused_norm(fused), torch.autocast("cuda", dtype=torch.bfloat16):
            out = enc(x)
            with torch.inference_mode():
                inference = enc(x)
        out.float().square().mean().backward()
        results[fused] = (out.detach(), inference, [p.grad.clone() for p in enc.parameters()])
    (ref, ref_inf, ref_grads), (got, got_inf, got_grads) = results[False], results[True]
    assert relative_error(got, ref.float().cpu()) < 2e-2 and relative_error(got_inf, ref_inf.float().cpu()) < 2e-2
    assert relative_error(got_inf, got.float().cpu()) < 2e-2
    # All gradients as one vector: single small tensors (a late bias) are too noisy in bf16 to compare alone.
    flat = [torch.cat([g.float().flatten() for g in grads]) for grads in (got_grads, ref_grads)]
    assert relative_error(flat[0], flat[1].cpu()) < 5e-2
