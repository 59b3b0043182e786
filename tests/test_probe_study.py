"""The probe study: its comparison arms, probe stages, statistics and report, on fake commands."""
import json
import zlib
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import bootstrap, spearmanr

from helpers import FakeCommands, arg, fake_measure, quiet
from lab.compare import CompareOptions
from lab.pipeline import Pipeline
from lab.probe_study import (STUDY_ARMS, StudyOptions, mean_row, predicts, repeat_agreement, run_study,
                                   spearman_with_interval)


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


def test_repeat_agreement_says_whether_a_metric_orders_the_first_stages_the_same_way_twice():
    # Six first stages: FID in the same order in both repeats, the probe in reversed order, PSNR scrambled; a
    # seventh (a checkpoint: one first stage, so no probe in repeat 1) only counts where both repeats have a value.
    fid = [[10 + i, 20 + 2 * i] for i in range(6)]
    hf = [[i, 5 - i] for i in range(6)]
    psnr = [[0, 3], [1, 0], [2, 5], [3, 1], [4, 4], [5, 2]]
    per_repeat = {f"ae{i}": [{"downstream.fid": fid[i][r], "probes.hf_ratio": hf[i][r], "fmnist.psnr": psnr[i][r]}
                             for r in range(2)] for i in range(6)}
    per_repeat["checkpoint"] = [{"downstream.fid": 99.0, "probes.hf_ratio": 9.0}, {"downstream.fid": 99.0}]
    got = {a["metric"]: a for a in repeat_agreement(per_repeat, resamples=500, seed=0)}
    assert got["downstream FID"]["rho"] == 1.0 and got["downstream FID"]["n"] == 7 and got["downstream FID"]["agrees"]
    spectrum = got["spectrum: HF fraction latents / images"]
    assert spectrum["rho"] == -1.0 and spectrum["n"] == 6 and not spectrum["agrees"]  # reversed is not agreement
    scrambled = spearmanr([0, 1, 2, 3, 4, 5], [3, 0, 5, 1, 4, 2]).statistic
    assert got["reconstruction PSNR"]["rho"] == pytest.approx(scrambled)
    assert not got["reconstruction PSNR"]["agrees"]
    assert "downstream KID" not in got  # no values: no line
    assert mean_row(per_repeat["checkpoint"]) == {"downstream.fid": 99.0, "probes.hf_ratio": 9.0}


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
    # per first stage: 8 arms x 2 trained repeats + 2 checkpoints, each probed once
    assert {c["n"] for c in results["per_first_stage_correlations"] if c["signal"].startswith("spectrum")} == {18}
    signals = {c["signal"] for c in results["correlations"]}
    assert {"spectrum: HF fraction latents / images", "reconstruction PSNR", "diffusion probe: sample KID"} <= signals
    text = report.read_text()
    assert "random network" in text and "| predicts |" in text and "agree with itself across repeats" in text
    assert "Correlations per first stage" in text
    # the fake gives each first stage the same values in both repeats: every metric that varies agrees with itself
    agreement = {a["metric"]: a for a in results["repeat_agreement"] if not np.isnan(a["rho"])}
    assert {"downstream FID", "reconstruction PSNR", "spectrum: HF fraction latents / images"} <= set(agreement)
    assert all(a["rho"] == pytest.approx(1.0) and a["agrees"] for a in agreement.values())
    assert agreement["downstream FID"]["n"] == 8  # the retrained arms; the checkpoints share one autoencoder
    assert (tmp_path / "study" / "plots" / "signals_vs_fid.png").is_file() and "signals_vs_fid.png" in text
    # Resumed: nothing runs again
    again = StudyCommands()
    run_study(opts, make_pipeline=lambda d, jobs: Pipeline(d, echo=quiet, runner=again), measure=fake_measure)
    assert again.calls == []
