"""Bad input found by a probe of new-user mistakes (issue 16): each gets a clear error naming the argument at
fault, before any expensive work."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import ldm.evaluation.samples as ev_samples

ROOT = Path(__file__).resolve().parents[1]


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture()
def pngs(tmp_path) -> Path:
    folder = tmp_path / "pngs"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return folder


@pytest.mark.parametrize("bad_side", ["--samples", "--ref"])
@pytest.mark.parametrize("problem", ["empty folder", "missing path", "empty npz", "not images"])
def test_eval_fid_names_the_bad_input_before_computing_features(tmp_path, pngs, monkeypatch, bad_side, problem):
    monkeypatch.setattr(ev_samples, "compute_features", lambda *a, **k: pytest.fail("features computed"))
    bad = tmp_path / "bad"
    if problem == "empty folder":
        bad.mkdir()
    elif problem == "empty npz":
        bad = tmp_path / "bad.npz"
        np.savez(bad, arr_0=np.zeros((0, 16, 16, 3), np.uint8))
    elif problem == "not images":
        bad = tmp_path / "bad.npz"
        np.savez(bad, arr_0=np.zeros((4, 16, 16, 3), np.float32))
    args = {"--samples": str(pngs), "--ref": str(pngs), bad_side: str(bad)}
    with pytest.raises(SystemExit) as exit_info:
        load_script("eval_fid").main([a for kv in args.items() for a in kv] + ["--detector", "random"])
    message = str(exit_info.value)
    assert message.startswith(f"error: {bad_side} {bad}"), message
