"""UNet, attention and text conditioner: shapes, init, references for attention and the time embedding."""
from __future__ import annotations

import math

import pytest
import torch

from ldm.diffusion import diffusion_loss, make_schedule
from ldm.modules.attention import Attention, attention
from ldm.modules.conditioners import OpenCLIPTextEncoder, drop_labels, drop_texts
from ldm.modules.unet import UNetModel, timestep_embedding

TINY = dict(in_channels=4, out_channels=4, model_channels=16, channel_mult=(1, 2), num_res_blocks=1,
            attention_resolutions=(2,), num_head_channels=8)
TINY_TEXT_CFG = dict(width=32, layers=2, heads=2, context_length=77, vocab_size=49408)


def perturb_(model: torch.nn.Module, std: float = 0.05, seed: int = 0) -> None:
    """Stand-in for training: move every parameter off its (partly zero) init."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(std * torch.randn(p.shape, generator=g))


@pytest.fixture(scope="module")
def text_encoder():
    return OpenCLIPTextEncoder(random_init=True, text_cfg=TINY_TEXT_CFG)


def test_timestep_embedding_closed_form():
    t, dim = torch.tensor([0, 1, 17, 999]), 10
    emb = timestep_embedding(t, dim)
    half = dim // 2
    ref = torch.tensor([[math.cos(ti * 10000 ** (-j / half)) for j in range(half)]
                        + [math.sin(ti * 10000 ** (-j / half)) for j in range(half)] for ti in t.tolist()])
    torch.testing.assert_close(emb, ref, atol=1e-4, rtol=1e-4)
    assert timestep_embedding(t, 7).shape == (4, 7)


def test_attention_matches_naive_softmax():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, n, 8, generator=g) for n in (5, 7, 7))
    ref = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(8), dim=-1) @ v
    torch.testing.assert_close(attention(q, k, v), ref, atol=1e-5, rtol=1e-5)


def test_cross_attention_module_against_reference():
    torch.manual_seed(0)
    attn = Attention(query_dim=12, context_dim=6, heads=3, dim_head=4)
    x, ctx = torch.randn(2, 5, 12), torch.randn(2, 9, 6)
    split = lambda z: z.reshape(2, -1, 3, 4).transpose(1, 2)  # noqa: E731
    q, k, v = split(attn.to_q(x)), split(attn.to_k(ctx)), split(attn.to_v(ctx))
    heads = torch.softmax(q @ k.transpose(-1, -2) / 2.0, dim=-1) @ v
    ref = attn.to_out(heads.transpose(1, 2).reshape(2, 5, 12))
    torch.testing.assert_close(attn(x, ctx), ref, atol=1e-5, rtol=1e-5)


def test_unconditional_unet_shape_and_zero_init():
    model = UNetModel(**TINY)
    x, t = torch.randn(2, 4, 16, 16), torch.tensor([3, 700])
    out = model(x, t)
    assert out.shape == x.shape
    assert torch.count_nonzero(out) == 0  # zero-initialised output conv
    perturb_(model)
    assert model(x, t).abs().mean() > 0


def test_class_conditional_unet():
    model = UNetModel(**TINY, num_classes=5)
    assert model.label_emb.weight.shape[0] == 6 and model.null_label == 5
    perturb_(model)
    x, t = torch.randn(3, 4, 8, 8), torch.tensor([10, 10, 10])
    out = model(x, t, y=torch.tensor([0, 1, 5]))
    assert out.shape == x.shape
    same_x = x[:1].expand(3, -1, -1, -1)
    by_label = model(same_x, t, y=torch.tensor([0, 1, 5]))
    assert not torch.allclose(by_label[0], by_label[1]) and not torch.allclose(by_label[0], by_label[2])
    with pytest.raises(ValueError, match="needs y"):
        model(x, t)


def test_text_conditioned_unet(text_encoder):
    model = UNetModel(**TINY, context_dim=text_encoder.out_dim)
    ctx = text_encoder(["a red square", "a blue circle"])
    assert ctx.shape == (2, 77, 32)
    perturb_(model)
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([5, 5])
    out = model(x, t, context=ctx)
    assert out.shape == x.shape
    assert not torch.allclose(out, model(x, t, context=ctx.flip(0)))


def test_text_encoder_penultimate_layer_reference(text_encoder):
    """Penultimate = output of block L-2 after ln_final (SD 2.x), recomputed by hand."""
    tower = text_encoder.tower
    tokens = text_encoder.tokenize(["hello world", ""])
    assert tokens[1, 0] == 49406 and tokens[1, 1] == 49407  # start/end tokens from the packaged BPE vocab
    h = tower.token_embedding(tokens) + tower.positional_embedding
    h = tower.transformer.resblocks[0](h, attn_mask=tower.attn_mask)
    torch.testing.assert_close(text_encoder(["hello world", ""]), tower.ln_final(h))
    assert not any(p.requires_grad for p in text_encoder.parameters())


def test_text_encoder_loads_full_clip_checkpoint(tmp_path, text_encoder):
    state = {k: v.clone() + 0.01 for k, v in text_encoder.tower.state_dict().items()}
    state.update({"visual.proj": torch.zeros(3), "logit_scale": torch.zeros(())})  # image tower keys are ignored
    path = tmp_path / "clip.pt"
    torch.save(state, path)
    loaded = OpenCLIPTextEncoder(pretrained_path=str(path), text_cfg=TINY_TEXT_CFG)
    torch.testing.assert_close(loaded.tower.token_embedding.weight, state["token_embedding.weight"])


def test_missing_openclip_weights_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="open_clip_pytorch_model.bin"):
        OpenCLIPTextEncoder(arch="ViT-H-14", pretrained_tag=None)
    missing = tmp_path / "nope.safetensors"
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        OpenCLIPTextEncoder(pretrained_path=str(missing), text_cfg=TINY_TEXT_CFG)


def test_cfg_dropout_helpers():
    g = torch.Generator().manual_seed(0)
    y = drop_labels(torch.arange(1000) % 7, 0.25, null_label=7, generator=g)
    frac = (y == 7).float().mean().item()
    assert abs(frac - 0.25) < 0.05
    assert drop_texts(["a", "b"], 1.0) == ["", ""] and drop_texts(["a", "b"], 0.0) == ["a", "b"]


@pytest.mark.parametrize("kind", ["eps", "v"])
def test_one_optimizer_step_gives_finite_grads(kind):
    torch.manual_seed(0)
    model = UNetModel(**TINY, num_classes=3, use_checkpoint=True, use_scale_shift_norm=True, dropout=0.1)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x0 = torch.randn(2, 4, 8, 8)
    loss, logs = diffusion_loss(model, x0, make_schedule("scaled_linear"), kind, cond={"y": torch.tensor([0, 3])},
                                min_snr_gamma=5.0, generator=torch.Generator().manual_seed(0))
    loss.backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert model.out[-1].weight.grad.abs().sum() > 0  # the zero-init output conv still learns
    opt.step()
    assert torch.isfinite(logs["loss"]) and model.out[-1].weight.abs().sum() > 0


def test_cached_checkpoint_lookup_uses_existing_hf_cache_only(tmp_path):
    """A file already in the HF cache layout is found; an empty cache gives None (and never downloads)."""
    from ldm.modules.conditioners import _cached_checkpoint
    assert _cached_checkpoint("ViT-H-14", "laion2b_s32b_b79k", cache_dir=str(tmp_path)) is None
    repo = tmp_path / "models--laion--CLIP-ViT-H-14-laion2B-s32B-b79K"
    snapshot = repo / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    (snapshot / "open_clip_model.safetensors").write_bytes(b"")
    found = _cached_checkpoint("ViT-H-14", "laion2b_s32b_b79k", cache_dir=str(tmp_path))
    assert found == str(snapshot / "open_clip_model.safetensors")


def test_narrow_unet_still_sees_time_and_class_without_scale_shift():
    """GroupNorm with one channel per group would erase the additive embedding (a silent no-op)."""
    torch.manual_seed(0)
    model = UNetModel(in_channels=4, out_channels=4, model_channels=32, channel_mult=(1,), num_res_blocks=1,
                      attention_resolutions=(), num_classes=3, use_scale_shift_norm=False)
    for module in model.modules():
        if isinstance(module, torch.nn.GroupNorm):
            assert module.num_channels // module.num_groups >= 4
    perturb_(model)
    x = torch.randn(1, 4, 8, 8).expand(2, -1, -1, -1)
    by_label = model(x, torch.tensor([5, 5]), y=torch.tensor([0, 1]))
    by_time = model(x, torch.tensor([5, 900]), y=torch.tensor([0, 0]))
    assert (by_label[0] - by_label[1]).abs().max() > 1e-4
    assert (by_time[0] - by_time[1]).abs().max() > 1e-4
