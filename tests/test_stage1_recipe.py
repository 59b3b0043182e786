"""The stage-1 training recipe end to end: EMA arithmetic, the discriminator schedule, bf16 on CPU,
exact resume, the resolution schedule, gradient accumulation and clipping, NaN handling, --init-from,
freeze_encoder, and EMA in validation / image logging.

Runs go through the real CLI in-process (``ldm.cli.main``) on the tiny configs shrunk by
``STAGE1_TEST_OVERRIDES`` (32x32, batch 4). Behaviour inside the loop is observed by wrapping methods with
``monkeypatch`` (restored after each test) and by reading the checkpoints and CSV logs the run writes.
"""
from __future__ import annotations

import math
from collections import Counter

import pytest
import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_pre_hook

from autoencoder.discriminator import UNetDiscriminator
from autoencoder.lightning import AutoencoderModule
from autoencoder.losses import AutoencoderLoss
from ldm.first_stage.posterior import DiagonalGaussian
from autoencoder.sd_vae import Decoder
from conftest import LITEVAE_TINY, SD_VAE_TINY, STAGE1_TEST_OVERRIDES
from ldm import cli
from ldm.ema import EMA
from ldm.util import NonFiniteLossError, load_state_dict, load_weights
from helpers import adam_steps, build_module, csv_rows, image_batch, last_ckpt, train

# One fixed data order: no shuffling, no random flips (resume / accumulation compare runs sample by sample).
FIXED_DATA = ["data.params.shuffle=false", "data.params.train.params.flip=false"]


def track_training_steps(monkeypatch) -> dict:
    """Wraps training_step so other wrappers can see the current phase and global step."""
    state = {"phase": "other", "step": -1, "micro_batches": 0}
    original = AutoencoderModule.training_step

    def training_step(self, batch, batch_idx):
        state.update(phase="train", step=self.global_step, micro_batches=state["micro_batches"] + 1)
        try:
            return original(self, batch, batch_idx)
        finally:
            state["phase"] = "other"

    monkeypatch.setattr(AutoencoderModule, "training_step", training_step)
    return state


@pytest.fixture
def optimizer_steps():
    """Records every optimizer.step(): the optimizer and its gradients as the optimizer sees them."""
    records: list[dict] = []

    def hook(optimizer, args, kwargs):
        grads = [p.grad.detach().clone() for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        records.append({"optimizer": optimizer, "grads": grads,
                        "norm": torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))})

    handle = register_optimizer_step_pre_hook(hook)
    yield records
    handle.remove()


# ------------------------------------------------------------------------- EMA
def test_ema_update_matches_closed_form():
    """shadow ← d·shadow + (1 − d)·live with d = min(decay, (1 + n)/(10 + n)); buffers copied, not averaged."""
    torch.manual_seed(0)
    live = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    for warmup in (True, False):
        ema = EMA(live, decay=0.9, warmup=warmup)
        expected = [p.detach().double().clone() for p in live.parameters()]
        for n in range(4):
            with torch.no_grad():
                for p in live.parameters():
                    p.add_(torch.randn_like(p))
                live[1].running_mean.add_(1.0)
            d = min(0.9, (1 + n) / (10 + n)) if warmup else 0.9
            assert ema.current_decay() == pytest.approx(d)
            ema.update(live)
            expected = [d * e + (1 - d) * p.detach().double() for e, p in zip(expected, live.parameters())]
            for e, s in zip(expected, ema.module.parameters()):
                torch.testing.assert_close(s.double(), e, rtol=1e-6, atol=1e-6)
        assert int(ema.num_updates) == 4
        torch.testing.assert_close(ema.module[1].running_mean, live[1].running_mean, rtol=0, atol=0)
    ema.train()  # the shadow copy never leaves eval mode and never takes gradients
    assert not ema.module.training and not any(p.requires_grad for p in ema.module.parameters())
    with pytest.raises(ValueError, match="decay"):
        EMA(live, decay=1.5)


def test_validation_and_image_logging_use_the_ema_weights():
    """val/*_ema and reconstructions_ema come from ema.module, the raw metrics from the live model."""
    module = build_module().eval()
    with torch.no_grad():  # make the EMA copy visibly different from the live weights
        for p in module.ema.module.decoder.parameters():
            p.add_(0.05 * torch.randn_like(p))
    batch = image_batch(n=3)
    x = batch["image"]
    logged: dict[str, torch.Tensor] = {}
    module.log_dict = lambda metrics, **kw: logged.update(metrics)
    with torch.no_grad():
        module.validation_step(batch, 0)
        images = module.log_images(batch, max_images=2)
        rec_live = module.autoencoder.decode(module.autoencoder.encode(x).mode())
        rec_ema = module.ema.module.decode(module.ema.module.encode(x).mode())

    def psnr_ref(rec):  # independent: PSNR of [-1, 1] images, peak-to-peak 2
        mse = (rec.clamp(-1, 1) - x).pow(2).mean(dim=(1, 2, 3))
        return (10 * torch.log10(4.0 / mse)).mean()

    assert logged["val/psnr"].item() == pytest.approx(psnr_ref(rec_live).item(), rel=1e-5)
    assert logged["val/psnr_ema"].item() == pytest.approx(psnr_ref(rec_ema).item(), rel=1e-5)
    assert logged["val/psnr"].item() != pytest.approx(logged["val/psnr_ema"].item(), rel=1e-3)
    assert {"val/ssim", "val/ssim_ema", "val/rec", "val/loss", "val/kl"} <= logged.keys()
    torch.testing.assert_close(images["reconstructions_ema"], rec_ema[:2])
    torch.testing.assert_close(images["reconstructions"], rec_live[:2])


# ------------------------------------------------------------------------- discriminator schedule, bf16
def test_no_discriminator_forward_before_disc_start_in_training(tmp_path, monkeypatch):
    state = track_training_steps(monkeypatch)
    forwards: list[tuple[str, int]] = []
    original_forward = UNetDiscriminator.forward

    def forward(self, x):
        forwards.append((state["phase"], state["step"]))
        return original_forward(self, x)

    monkeypatch.setattr(UNetDiscriminator, "forward", forward)
    run = train(tmp_path, "model.params.loss.params.disc_start=3", "lightning.trainer.max_steps=5")

    train_calls = Counter(step for phase, step in forwards if phase == "train")
    assert train_calls == {3: 2, 4: 2}  # one generator + one discriminator forward per step, from step 3 on
    assert all(phase == "train" or step_seen >= 3 for phase, step_seen in forwards)  # validation too
    ckpt = last_ckpt(run)
    assert ckpt["global_step"] == 5 and adam_steps(ckpt, 0) == 5 and adam_steps(ckpt, 1) == 2
    rows = [r for r in csv_rows(run) if r.get("train/loss")]
    assert all(float(r["train/g_adv"]) == 0.0 and not r.get("train/d_loss") for r in rows if int(r["step"]) < 3)
    assert all(r.get("train/d_loss") and float(r["train/g_adv"]) != 0.0 for r in rows if int(r["step"]) >= 3)


def test_bf16_mixed_on_cpu(tmp_path, monkeypatch):
    """Two steps under bf16 autocast on CPU with both optimizers: the decoder runs in bf16, losses stay finite."""
    dtypes: list[torch.dtype] = []
    original = Decoder.forward

    def forward(self, z):
        out = original(self, z)
        dtypes.append(out.dtype)
        return out

    monkeypatch.setattr(Decoder, "forward", forward)
    run = train(tmp_path, "lightning.trainer.precision=bf16-mixed", "model.params.loss.params.disc_start=1",
                "lightning.trainer.max_steps=2")
    assert torch.bfloat16 in dtypes  # autocast really was on
    ckpt = last_ckpt(run)
    assert ckpt["global_step"] == 2 and adam_steps(ckpt, 0) == 2 and adam_steps(ckpt, 1) == 1
    assert all(v.dtype != torch.bfloat16 and torch.isfinite(v.float()).all() for v in ckpt["state_dict"].values())
    rows = [r for r in csv_rows(run) if r.get("train/loss")]
    for term in ("loss", "rec", "kl", "wavelet", "gauss", "g_adv", "d_loss"):
        values = [float(r[f"train/{term}"]) for r in rows if r.get(f"train/{term}")]
        assert values and all(math.isfinite(v) for v in values), term


# ------------------------------------------------------------------------- resume
@pytest.mark.slow
def test_resume_gives_the_same_parameters_as_an_uninterrupted_run(tmp_path):
    """4 steps + resume for 4 more == 8 uninterrupted steps, bitwise (CPU, same threads, same data order).

    The interruption is at an epoch boundary (16 images / batch 4 = 4 batches per epoch): Lightning restarts
    a plain DataLoader from its first batch on resume, so only an epoch-boundary checkpoint has a defined
    "same data order". Noise and crops come from per-step generators, so they need no RNG state.
    """
    data = [*FIXED_DATA, "data.params.train.params.limit=16"]
    straight = last_ckpt(train(tmp_path / "a", *data, "lightning.trainer.max_steps=8"))
    run = train(tmp_path / "b", *data, "lightning.trainer.max_steps=4")
    assert cli.main(["-t", "-r", str(run), *STAGE1_TEST_OVERRIDES, "lightning.trainer.max_steps=8"]) == 0
    resumed = last_ckpt(run)

    assert resumed["global_step"] == straight["global_step"] == 8
    assert resumed["state_dict"].keys() == straight["state_dict"].keys()
    for key, value in straight["state_dict"].items():  # autoencoder, EMA (+ num_updates), discriminator + SN
        assert torch.equal(resumed["state_dict"][key], value), key
    for opt_a, opt_b in zip(straight["optimizer_states"], resumed["optimizer_states"]):
        for pid, s in opt_a["state"].items():
            for name in ("step", "exp_avg", "exp_avg_sq"):
                assert torch.equal(opt_b["state"][pid][name], s[name]), (pid, name)


# ------------------------------------------------------------------------- resolution schedule
def test_crop_schedule_changes_the_input_size_at_the_configured_step(tmp_path, monkeypatch):
    shapes: list[tuple[bool, int, tuple[int, ...]]] = []
    original = AutoencoderModule.get_input

    def get_input(self, batch, train=False):
        x = original(self, batch, train)
        shapes.append((train, self.global_step, tuple(x.shape)))
        return x

    monkeypatch.setattr(AutoencoderModule, "get_input", get_input)
    run = train(tmp_path, "model.params.train_crop_schedule={2: 16}", "model.params.loss.params.disc_start=1",
                "lightning.trainer.max_steps=4")
    train_shapes = {step: shape for is_train, step, shape in shapes if is_train}
    assert train_shapes == {0: (4, 3, 32, 32), 1: (4, 3, 32, 32), 2: (4, 3, 16, 16), 3: (4, 3, 16, 16)}
    assert all(shape[-1] == 32 for is_train, _, shape in shapes if not is_train)  # validation is never cropped
    assert last_ckpt(run)["global_step"] == 4


def test_crop_is_a_window_of_the_image_and_a_function_of_the_step():
    module = build_module(train_crop_schedule={0: 16})
    x = torch.arange(2 * 3 * 32 * 32, dtype=torch.float32).reshape(2, 3, 32, 32)
    windows = []
    for micro in range(6):
        module._micro_batches = micro
        crop = module.get_input({"image": x}, train=True)
        assert torch.equal(crop, module.get_input({"image": x}, train=True))  # same step: same crop
        top, left = int(crop[0, 0, 0, 0]) // 32, int(crop[0, 0, 0, 0]) % 32
        assert 0 <= top <= 16 and 0 <= left <= 16
        assert torch.equal(crop, x[..., top:top + 16, left:left + 16])
        windows.append((top, left))
    assert len(set(windows)) > 1  # offsets are random across steps
    assert module.get_input({"image": x}).shape[-1] == 32  # not for validation


# ------------------------------------------------------------------------- accumulation, clipping
def test_accumulated_gradient_equals_the_big_batch_gradient(tmp_path, monkeypatch, optimizer_steps):
    """2 micro-batches of 4 give the gradient of one batch of 8: the model has no batch-dependent layers
    (GroupNorm is per sample) and every loss is a batch mean. The posterior sample is replaced by its mean
    so the two runs draw no different noise; the discriminator is off so its power iteration does not run."""
    monkeypatch.setattr(DiagonalGaussian, "sample", lambda self, generator=None: self.mean)
    common = [*FIXED_DATA, "model.params.loss.params.disc_start=1000", "lightning.trainer.max_steps=1"]
    big = train(tmp_path / "big", *common, "data.params.batch_size=8")
    (big_grads,) = [r["grads"] for r in optimizer_steps]
    optimizer_steps.clear()
    small = train(tmp_path / "small", *common, "model.params.accumulate_grad_batches=2")
    (small_grads,) = [r["grads"] for r in optimizer_steps]

    flat_big, flat_small = torch.cat([g.flatten() for g in big_grads]), torch.cat([g.flatten() for g in small_grads])
    assert flat_big.abs().max() > 0
    # float32 sums in a different order: measured max difference 3e-6 of the largest entry; a missing 1/k
    # (factor 2) or a dropped micro-batch would be off by O(1)
    torch.testing.assert_close(flat_small, flat_big, rtol=1e-4, atol=2e-5 * flat_big.abs().max().item())
    for run in (big, small):
        assert last_ckpt(run)["global_step"] == 1


def test_accumulation_steps_once_per_k_micro_batches_and_at_epoch_end(tmp_path, monkeypatch, optimizer_steps):
    """k=2 with 3 batches per epoch: micro-batches per optimizer step are 2, 1 (epoch end), 2, 1."""
    state = track_training_steps(monkeypatch)
    per_step: list[int] = []
    original = AutoencoderModule._step

    def step(self, optimizer):
        if optimizer.optimizer is self.optimizers()[0].optimizer:
            per_step.append(state["micro_batches"])
            state["micro_batches"] = 0
        return original(self, optimizer)

    monkeypatch.setattr(AutoencoderModule, "_step", step)
    run = train(tmp_path, "model.params.accumulate_grad_batches=2", "data.params.train.params.limit=12",
                "model.params.loss.params.disc_start=0", "lightning.trainer.max_steps=4")
    assert per_step == [2, 1, 2, 1]
    ckpt = last_ckpt(run)
    assert ckpt["global_step"] == 4  # optimizer steps, not micro-batches
    assert adam_steps(ckpt, 0) == adam_steps(ckpt, 1) == 4
    assert int(ckpt["state_dict"]["ema.num_updates"]) == 4  # EMA once per optimizer step
    assert len(optimizer_steps) == 8  # 4 autoencoder + 4 discriminator steps


def test_gradient_clipping_limits_both_optimizers(tmp_path, optimizer_steps):
    run = train(tmp_path, "model.params.grad_clip=0.001", "model.params.loss.params.disc_start=0",
                "lightning.trainer.max_steps=2")
    assert len(optimizer_steps) == 4  # autoencoder and discriminator, twice
    for record in optimizer_steps:  # clip_grad_norm_ rescales to max_norm / (norm + 1e-6): raw norms are >> 1e-3
        assert record["norm"].item() == pytest.approx(1e-3, rel=1e-4)
    assert last_ckpt(run)["global_step"] == 2


# ------------------------------------------------------------------------- NaN, init-from, freeze
def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    original = AutoencoderLoss.generator_loss

    def generator_loss(self, x, xrec, posterior, global_step, last_layer=None, **terms):
        loss, logs = original(self, x, xrec, posterior, global_step, last_layer, **terms)
        if global_step == 3 and torch.is_grad_enabled():
            loss = loss * float("nan")  # what a diverged run produces
        return loss, logs

    monkeypatch.setattr(AutoencoderLoss, "generator_loss", generator_loss)
    logdir = tmp_path / "logs"
    with pytest.raises(NonFiniteLossError, match="non-finite loss at step 3"):
        train(logdir, "lightning.checkpoint.every_n_train_steps=2", "lightning.trainer.max_steps=6")
    (run,) = list(logdir.iterdir())
    ckpts = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert ckpts == ["last.ckpt", "step=0000002.ckpt"]  # nothing written after the failure
    last = last_ckpt(run)
    assert last["global_step"] == 2
    assert all(torch.isfinite(v.float()).all() for v in last["state_dict"].values())
    fresh = build_module()
    load_weights(fresh, load_state_dict(run / "checkpoints" / "last.ckpt"), strict=True)  # loadable, strict


def test_init_from_loads_weights_only(tmp_path):
    """--init-from: weights (incl. EMA and discriminator) load; global step and optimizers start fresh."""
    source = last_ckpt(train(tmp_path / "a", "model.params.loss.params.disc_start=1", "lightning.trainer.max_steps=2"))
    ckpt_path = next((tmp_path / "a").iterdir()) / "checkpoints" / "last.ckpt"
    # learning rate 0: Adam leaves the parameters bitwise unchanged, so they must equal the loaded ones
    run = train(tmp_path / "b", "model.base_learning_rate=0.0", "model.params.loss.params.disc_start=0",
                "lightning.trainer.max_steps=1", args=("--init-from", str(ckpt_path)))
    ckpt = last_ckpt(run)
    assert ckpt["global_step"] == 1
    assert adam_steps(ckpt, 0) == 1 and adam_steps(ckpt, 1) == 1  # restored optimizers would say 3 and 2
    weights = [k for k in source["state_dict"] if k.startswith(("autoencoder.", "loss.discriminator."))
               and not k.endswith(("._u", "._v"))]  # spectral-norm power-iteration vectors move every forward
    assert weights
    for key in weights:
        assert torch.equal(ckpt["state_dict"][key], source["state_dict"][key]), key
    assert int(ckpt["state_dict"]["ema.num_updates"]) == 3  # the EMA continues from the loaded one


@pytest.mark.parametrize("config", [LITEVAE_TINY, SD_VAE_TINY], ids=["litevae", "sd_vae"])
def test_freeze_encoder_keeps_encoder_bitwise(tmp_path, monkeypatch, config):
    initial: dict[str, torch.Tensor] = {}
    monkeypatch.setattr(AutoencoderModule, "on_train_start",
                        lambda self: initial.update({k: v.clone() for k, v in self.state_dict().items()}),
                        raising=False)
    run = train(tmp_path, "model.params.freeze_encoder=true", "model.params.loss.params.disc_start=1",
                "lightning.trainer.max_steps=3", config=config)
    final = last_ckpt(run)["state_dict"]
    encoder = [k for k in initial if k.startswith(("autoencoder.encoder.", "ema.module.encoder."))]
    decoder = [k for k in initial if k.startswith("autoencoder.decoder.") and initial[k].is_floating_point()]
    assert encoder and decoder
    assert all(torch.equal(final[k], initial[k]) for k in encoder)
    assert sum(not torch.equal(final[k], initial[k]) for k in decoder) > len(decoder) // 2
    module_params = dict(build_module(config).autoencoder.named_parameters())
    expected = sum(not name.startswith("encoder.") for name in module_params)
    assert len(last_ckpt(run)["optimizer_states"][0]["param_groups"][0]["params"]) == expected
