"""The probe study (issue 26): its comparison arms, probe stages, statistics and report, on fake commands."""
import json
import zlib
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import bootstrap, spearmanr

from helpers import FakeCommands, arg, fake_measure, quiet
from ldm.tools.compare import CompareOptions
from ldm.tools.pipeline import Pipeline
from ldm.tools.probe_study import STUDY_ARMS, StudyOptions, predicts, run_study, spearman_with_interval


def test_spearman_interval_agrees_with_scipys_bootstrap():
    rng = np.random.default_rng(0)
    x = rng.normal(size=40)
    y = x + rng.normal(scale=0.7, size=40)
    ours = spearman_with_interval(x, y, resamples=2000, seed=1)
    assert ours["rho"] == pytest.approx(spearmanr(x, y).statistic)
    ref = bootstrap((x, y), lambda a, b: spearmanr(a, b).statistic, paired=True, vectorized=False,
                    n_resamples=2000, method="percentile", random_state=1).confidence_interval
    assert ours["low"] == pytest.approx(ref.low, abs=0.05) and ours["high"] == pytest.approx(ref.high, abs=0.05)
    # Four points in perfect order: rho = 1, yet resamples of few points are wide; the bar needs CI > 0.
    perfect = spearman_with_interval([1, 2, 3, 4], [10, 20, 30, 40], seed=0)
    assert perfect["rho"] == 1.0 and perfect["low"] > 0 and predicts(perfect)
    assert not predicts({"rho": 0.9, "low": -0.1, "high": 1.0}) and not predicts({"rho": 0.5, "low": 0.1, "high": 0.8})


class StudyCommands(FakeCommands):
    """Values differ per first stage (by the arm key in the output name); runs keep periodic checkpoints."""

    def value(self, out: str) -> float:
        key = Path(out).name.split("_r")[0]
        return 20.0 + zlib.crc32(key.encode()) % 1000 / 100

    def train(self, cmd):
        super().train(cmd)
        if "-r" not in cmd:
            run = max(Path(arg(cmd, "-l")).glob(f"*_{arg(cmd, '-n')}"))
            for step in (5, 10, 15):
                (run / "checkpoints" / f"step={step:07d}.ckpt").write_bytes(b"ckpt")


def test_the_study_runs_every_first_stage_downstream_and_probes_it(tmp_path):
    fake = StudyCommands()
    compare = CompareOptions(arms=list(STUDY_ARMS), photos=None, ae_steps=20, ldm_steps=20, seeds="0-19",
                             detector="random", repeats=2, jobs=1)
    opts = StudyOptions(out_dir=str(tmp_path / "study"), compare=compare, bootstrap=200)
    report = run_study(opts, make_pipeline=lambda d, jobs: Pipeline(d, echo=quiet, runner=fake), measure=fake_measure)
    probes = [c for c in fake.calls if c[1].endswith("probe_latents.py")]
    # 8 trained arms x 2 repeats + 2 checkpoints of the reference arm (one first stage each)
    assert len(probes) == 8 * 2 + 2
    checkpoints = {Path(arg(c, "--ae")).name for c in probes if arg(c, "--ae").endswith(".ckpt")}
    assert checkpoints == {"step=0000005.ckpt", "step=0000010.ckpt"}
    trained = [c for c in fake.calls if c[1] == "main.py" and "configs/autoencoder" in arg(c, "--base")]
    assert len(trained) == 16  # the checkpoint arms are not trained again
    results = json.loads((tmp_path / "study" / "results.json").read_text())
    assert len(results["rows"]) == 10
    signals = {c["signal"] for c in results["correlations"]}
    assert {"spectrum: HF fraction latents / images", "reconstruction PSNR", "diffusion probe: sample KID"} <= signals
    text = report.read_text()
    assert "random network" in text and "| predicts |" in text
    assert (tmp_path / "study" / "plots" / "signals_vs_fid.png").is_file() and "signals_vs_fid.png" in text
    # Resumed: nothing runs again
    again = StudyCommands()
    run_study(opts, make_pipeline=lambda d, jobs: Pipeline(d, echo=quiet, runner=again), measure=fake_measure)
    assert again.calls == []
