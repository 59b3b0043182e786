"""Resumable pipeline stages (lab.pipeline) and the encoder-comparison report (lab.compare), with fake commands.

A real end-to-end ``compare_encoders.py`` needs ~14 fresh Python processes (each importing torch and Lightning)
and does not fit a test's budget on two cores; here every command is replaced by a fake that writes the
files the real one writes, so the orchestration, resume logic and report are checked without the compute.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf
from PIL import Image

from conftest import command_module
from lab import compare
from lab.compare import Arm, CompareOptions, budget_overrides, repeat_seeds
from lab.plots import class_grid, side_by_side
from lab.pipeline import Pipeline, curve, display, manifest_summary, read_metrics, resumable_run
from lab.stages import PY, Train, script
from helpers import FakeCommands, Interrupt, arg, fake_measure, fake_run, quiet, write_csv


# ------------------------------------------------------------------------------------------ Pipeline
def test_finished_stages_are_skipped_on_rerun(tmp_path):
    calls = []
    pipe = Pipeline(tmp_path, echo=quiet, runner=calls.append)
    pipe.command("a", ["echo", "a"], collect=lambda: {"value": 1})
    pipe.command("b", ["echo", "b"])
    lines = []
    again = Pipeline(tmp_path, echo=lines.append, runner=calls.append)  # a new process reads state.json
    assert again.command("a", ["echo", "a"]) == {"value": 1}
    again.command("b", ["echo", "b"])
    assert calls == [["echo", "a"], ["echo", "b"]]
    assert all(line.startswith("[done]") for line in lines) and len(lines) == 2
    assert set(again.seconds()) == {"a", "b"}


def test_interrupted_stage_reruns_and_keeps_its_time(tmp_path):
    calls = []

    def runner(cmd):
        calls.append(cmd)
        if cmd == ["b"] and calls.count(["b"]) == 1:
            raise Interrupt

    pipe = Pipeline(tmp_path, echo=quiet, runner=runner)
    pipe.command("a", ["a"])
    with pytest.raises(Interrupt):
        pipe.command("b", ["b"])
    state = json.loads((tmp_path / "state.json").read_text())
    assert state["stages"]["a"]["status"] == "done"
    assert state["stages"]["b"]["status"] == "interrupted" and state["stages"]["b"]["interrupted_seconds"] >= 0
    again = Pipeline(tmp_path, echo=quiet, runner=runner)
    again.command("a", ["a"])
    again.command("b", ["b"])
    assert calls == [["a"], ["b"], ["b"]]
    assert again.state["stages"]["b"]["status"] == "done"
    assert "interrupted_seconds" not in again.state["stages"]["b"]


def test_deleted_output_makes_the_stage_run_again(tmp_path):
    calls = []
    out = tmp_path / "result.txt"

    def runner(cmd):
        calls.append(cmd)
        out.write_text("x")

    Pipeline(tmp_path, echo=quiet, runner=runner).command("s", ["s"], outputs=lambda _: [out])
    Pipeline(tmp_path, echo=quiet, runner=runner).command("s", ["s"], outputs=lambda _: [out])
    out.unlink()
    Pipeline(tmp_path, echo=quiet, runner=runner).command("s", ["s"], outputs=lambda _: [out])
    assert len(calls) == 2


def test_two_pipelines_on_one_folder_keep_each_others_stages(tmp_path):
    """Two processes running different stages of one folder (each with its own in-memory state) lose nothing."""
    a = Pipeline(tmp_path, echo=quiet, runner=lambda cmd: None)
    b = Pipeline(tmp_path, echo=quiet, runner=lambda cmd: None)
    a.command("a1", ["a1"])
    b.command("b1", ["b1"])
    a.command("a2", ["a2"])
    stages = json.loads((tmp_path / "state.json").read_text())["stages"]
    assert {n for n, e in stages.items() if e["status"] == "done"} == {"a1", "b1", "a2"}
    assert Pipeline(tmp_path, echo=quiet).is_done("b1") and a.is_done("b1")  # a sees b's stage after saving


def test_interrupted_training_resumes_its_own_run_folder(tmp_path):
    logdir = tmp_path / "runs"
    old = logdir / "2000-01-01T00-00-00_ae"  # a previous pipeline's run: never resumed by this one
    (old / "checkpoints").mkdir(parents=True)
    (old / "checkpoints" / "last.ckpt").write_bytes(b"old")
    calls = []

    def runner(cmd):
        calls.append(cmd)
        if len(calls) == 1:
            fake_run(logdir, "ae")
            raise Interrupt  # killed after its first checkpoint

    pipe = Pipeline(tmp_path, echo=quiet, runner=runner)
    stage = Train(bases=("configs/a.yaml",), logdir=logdir, name="ae", seed=3, overrides=("x=1",))
    with pytest.raises(Interrupt):
        pipe.train("stage1", stage)
    assert calls[0] == [PY, "main.py", "--base", "configs/a.yaml", "-t", "-l", str(logdir), "-n", "ae", "-s", "3", "x=1"]
    run = Pipeline(tmp_path, echo=quiet, runner=runner).train("stage1", stage)
    assert run != old and run.name.endswith("_ae")
    assert calls[1] == [PY, "main.py", "-r", str(run), "-t", "-s", "3", "x=1"]
    assert resumable_run(logdir, "ae", since="1999-01-01T00-00-00") == run  # the newest one with a checkpoint


def test_display_shows_python_and_quotes():
    assert display([PY, "main.py", "a b"]) == "python main.py 'a b'"


def test_curves_join_resumed_sessions(tmp_path):
    write_csv(tmp_path / "csv" / "metrics.csv", [{"step": 10, "val/psnr": 20.0}, {"step": 20, "val/psnr": 21.0},
                                                 {"step": 20, "train/loss": 0.5}])
    write_csv(tmp_path / "csv" / "resumed_2026-01-01T00-00-00" / "metrics.csv",
              [{"step": 20, "val/psnr": 21.5}, {"step": 30, "val/psnr": 22.0}])
    assert len(read_metrics(tmp_path)) == 5
    assert curve(tmp_path, "val/psnr") == [(10, 20.0), (20, 21.5), (30, 22.0)]  # the resumed value wins
    assert curve(tmp_path, "val/ssim") == []


def test_manifest_summary_names_splits_and_scale(tmp_path):
    entry = {"total": 100, "shards": [{"name": "a.tar", "rank": 0, "index": 0, "count": 100}], "total_skipped": 0,
             "skipped": [], "world_size": 1, "latent_shape": [4, 8, 8], "image_shape": [3, 64, 64],
             "latent": {"dtype": "float16"}, "autoencoder": {"sha256": "ab" * 32},
             "stats": {"count": 6400, "shift": 0.1, "scale_factor": 2.5, "channel_std": [0.4, 0.5]}}
    (tmp_path / "manifest.json").write_text(json.dumps({"format": "litevae-latent-cache/1",
                                                        "splits": {"train": entry}}))
    text = manifest_summary(tmp_path)
    assert "train: 100 samples in 1 shards" in text and "scale_factor 2.5" in text and "[4, 8, 8]" in text


# ------------------------------------------------------------------------------------------ report parts
def test_budget_overrides_reach_lightning_as_a_duration():
    from pytorch_lightning.callbacks import Timer

    over = budget_overrides(400, 1.5, disc_start=True)
    cfg = OmegaConf.from_dotlist(over)
    assert cfg.lightning.trainer.max_steps == 400 and cfg.model.params.loss.params.disc_start == 200
    timer = Timer(duration=OmegaConf.to_container(cfg.lightning.trainer.max_time))
    assert timer._duration == 90
    assert budget_overrides(None, None) == []


def test_class_grid_puts_one_class_per_row(tmp_path):
    labels = np.arange(40) % 4
    images = np.repeat((labels * 60).astype(np.uint8)[:, None, None, None], 8, 1).repeat(8, 2).repeat(3, 3)
    np.savez(tmp_path / "samples.npz", arr_0=images, labels=labels)
    grid = np.asarray(Image.open(class_grid(tmp_path / "samples.npz", tmp_path / "g.png", per_class=5)))
    assert Image.open(class_grid(tmp_path / "samples.npz", tmp_path / "h.png", per_class=20)).size == (102, 42)
    assert grid.shape == (4 * 10 + 2, 5 * 10 + 2, 3)
    for c in range(4):
        row = grid[2 + 10 * c:10 + 10 * c, 2:-2:10]  # the first pixel row/col of each tile in row c
        assert (row[:, :5] == 60 * c).all()


def test_side_by_side_keeps_every_image(tmp_path):
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    Image.new("RGB", (20, 10), (255, 0, 0)).save(a)
    Image.new("RGB", (30, 12), (0, 0, 255)).save(b)
    out = Image.open(side_by_side({"A": a, "B": b}, tmp_path / "ab.png", gap=4, caption=16))
    assert out.size == (54, 28)
    assert out.getpixel((5, 20)) == (255, 0, 0) and out.getpixel((30, 20)) == (0, 0, 255)


ARMS = [Arm("lite", "LiteVAE", "configs/autoencoder/litevae_tiny.yaml", "configs/ldm/fmnist_litevae_tiny.yaml"),
        Arm("sd", "SD-VAE", "configs/autoencoder/sd_vae_tiny.yaml", "configs/ldm/fmnist_sd_vae_tiny.yaml")]
# Stage 1, caching, stage 2, samples at the two evaluation points of stage 2, and the reconstruction evaluation at
# the last two of stage 1's four (rFID there; PSNR/SSIM at all four come from the run's own validations).
CHAIN = ["main.py", "cache_latents.py", "cache_latents.py", "main.py", "sample.py", "sample.py",
         "eval_autoencoder.py", "eval_autoencoder.py"]


def options(tmp_path: Path, **kw) -> CompareOptions:
    settings = dict(out_dir=str(tmp_path / "cmp"), arms=ARMS, ae_steps=20, ldm_steps=20, seeds="0-19",
                    detector="random", repeats=1, photos=None, jobs=1)
    return CompareOptions(**{**settings, **kw})


def test_compare_runs_both_arms_alike_and_writes_the_report(tmp_path):
    fake = FakeCommands()
    opts = options(tmp_path)
    report = compare.run_comparison(opts, Pipeline(opts.out_dir, echo=quiet, runner=fake), measure=fake_measure)
    scripts = [Path(c[1]).name for c in fake.calls]
    assert scripts == CHAIN * 2 + ["eval_fid.py"] * 4  # sample evaluations last, one at a time
    stage1 = [c for c in fake.calls if c[1] == "main.py" and "--base" in c and "autoencoder" in arg(c, "--base")]
    assert {"lightning.trainer.max_steps=20", "model.params.loss.params.disc_start=10",
            "lightning.trainer.val_check_interval=5", "lightning.checkpoint.every_n_train_steps=5"} <= set(stage1[0])
    assert stage1[0][stage1[0].index("-s"):] == stage1[1][stage1[1].index("-s"):]  # the same budget for both
    evaluated = [arg(c, "--ae") for c in fake.calls if c[1].endswith("eval_autoencoder.py")]
    assert Path(evaluated[0]).name == "step=0000015.ckpt" and Path(evaluated[1]).name.endswith("_lite_r0_ae")
    sampled = [c[2] for c in fake.calls if c[1].endswith("sample.py")]
    assert Path(sampled[0]).name == "step=0000010.ckpt" and Path(sampled[1]).name.endswith("_lite_r0_ldm")
    seeds = {arg(c, "--seeds") for c in fake.calls if c[1].endswith("sample.py")}
    assert seeds == {"0-19"}
    text = report.read_text()
    assert text.index("## Verdict") < text.index("## Encoder cost") < text.index("| LiteVAE | 1,000 | 0.001 | 50 | 1.0 |")
    assert "| SD-VAE | 2,000 | 0.002 | 25 | 2.0 |" in text
    assert "2.00x the parameters" in text and "2.00x as many images per second" in text
    assert "| LiteVAE | 1 | 25.00 | 0.833 | 3 |" in text  # one repeat: no ± and no test
    assert "over the last half of the budget: settled" in text and "plots/differences.png" in text
    assert "no test possible" in text
    out = Path(opts.out_dir)
    for png in ("plots/curves.png", "plots/metrics.png", "grids/samples.png", "grids/reconstructions.png"):
        assert Image.open(out / png).size[0] > 0 and f"]({png})" in text
    records = json.loads((out / "results.json").read_text())["records"]
    assert records["sd"][0]["downstream"]["accuracy"] == pytest.approx(0.8)


def test_random_features_are_never_called_fid(tmp_path):
    opts = options(tmp_path, repeats=2)
    text = compare.run_comparison(opts, Pipeline(opts.out_dir, echo=quiet, runner=FakeCommands()),
                                  measure=fake_measure).read_text()
    settings_line = next(line for line in text.splitlines() if line.startswith("Settings:"))
    assert "FID" not in text.replace(settings_line, "") and "KID" not in text.replace(settings_line, "")
    assert "sample RFD" in text and "rec. RFD" in text


def test_repeats_use_other_seeds_for_every_stage_and_report_the_spread(tmp_path):
    fake = FakeCommands()
    opts = options(tmp_path, repeats=2, photos="configs/data/photos64.yaml", detector="inception")
    report = compare.run_comparison(opts, Pipeline(opts.out_dir, echo=quiet, runner=fake), measure=fake_measure)
    photo_runs = [c for c in fake.calls if c[1] == "main.py" and "configs/data/photos64.yaml" in c]
    assert len(photo_runs) == 4 and all(c[c.index("--base") + 2] == "configs/data/photos64.yaml" for c in photo_runs)
    for repeat in (0, 1):
        trains = [c for c in fake.calls if c[1] == "main.py" and f"_r{repeat}_" in arg(c, "-n")]
        assert len(trains) == 6 and all(arg(c, "-s") == str(repeat) for c in trains)  # 2 arms x (AE, LDM, photos AE)
    seeds = sorted({arg(c, "--seeds") for c in fake.calls if c[1].endswith("sample.py")})
    assert seeds == ["0-19", "100000-100019"]
    photo_evals = [c for c in fake.calls if c[1].endswith("eval_autoencoder.py") and "photos" in arg(c, "--out")]
    assert [arg(c, "--data") for c in photo_evals] == ["configs/data/photos64.yaml"] * 8  # 2 points each
    text = report.read_text()
    # PSNR of lite: 25.0, 25.2 -> 25.10 ± 0.14; sd: 24.0, 24.6 -> 24.30 ± 0.42 (sample std)
    assert "| LiteVAE | 2 | 25.10 ± 0.14 |" in text and "| SD-VAE | 2 | 24.30 ± 0.42 |" in text
    assert "## Reconstruction, natural photos (endless-sky)" in text
    assert "Per-repeat values: LiteVAE PSNR: 25.00, 25.20" in text
    assert "Welch t = " in text and "FID" in text


def test_repeat_seeds_shift_every_seed():
    assert repeat_seeds("0-4", 0) == "0-4"
    assert repeat_seeds("0-4,7", 2) == "200000-200004,200007"
    assert compare.SEED_STRIDE % 10 == 0  # the conditioning class seed % classes keeps its balance


def test_compare_resumes_after_an_interruption(tmp_path):
    opts = options(tmp_path)
    first = FakeCommands(interrupt_at=12)  # the 12th command: the second arm's stage 2
    with pytest.raises(Interrupt):
        compare.run_comparison(opts, Pipeline(opts.out_dir, echo=quiet, runner=first), measure=fake_measure)
    second = FakeCommands()
    compare.run_comparison(opts, Pipeline(opts.out_dir, echo=quiet, runner=second), measure=fake_measure)
    assert [Path(c[1]).name for c in second.calls] == ["main.py", *CHAIN[-4:], *["eval_fid.py"] * 4]
    assert "-r" in second.calls[0]  # the interrupted LDM run continues from its checkpoint
    with pytest.raises(ValueError, match="ldm_steps"):
        compare.run_comparison(options(tmp_path, ldm_steps=50),
                               Pipeline(opts.out_dir, echo=quiet, runner=second), measure=fake_measure)


def test_ablation_trains_every_variant_with_its_overrides_on_the_plan_data(tmp_path):
    from lab.ablation import AblationOptions, read_plan, run_ablation

    plan = "configs/ablations/photos_stage1.yaml"
    data, variants = read_plan(plan)
    fake = FakeCommands()
    opts = AblationOptions(plan=plan, out_dir=str(tmp_path / "abl"), repeats=2, steps=20, detector="random", jobs=1)
    report = run_ablation(opts, Pipeline(opts.out_dir, echo=quiet, runner=fake)).read_text()
    trains = [c for c in fake.calls if c[1] == "main.py"]
    assert len(trains) == 2 * len(variants) and all(c[c.index("--base") + 2] == data for c in trains)
    for v in variants:
        mine = [c for c in trains if arg(c, "-n").startswith(f"{v.key}_r")]
        assert [arg(c, "-s") for c in mine] == ["0", "1"] and all(set(v.ae_overrides) <= set(c) for c in mine)
    gn8 = next(v for v in variants if v.key == "lite_tiny_gn8")
    assert gn8.ae_overrides == ["model.params.autoencoder.params.encoder_config.params.norm_groups=8"]
    assert sum(line.startswith("| ") for line in report.splitlines()) == len(variants) + 1
    assert "rec. RFD" in report and "FID" not in report  # random features are never called an FID
    per_repeat = next(line for line in report.splitlines() if line.startswith("Per-repeat PSNR"))
    rows = [part.rsplit(": ", 1) for part in per_repeat.removesuffix(".").split(": ", 1)[1].split("; ")]
    assert [name for name, _ in rows] == [v.label for v in variants]
    assert all(len(values.split(", ")) == 2 for _, values in rows)  # one value per repeat


def test_the_ablation_plan_trains_the_comparisons_arms_alike():
    """The scale study reuses a comparison's photo runs by key: a plan variant keyed like a comparison arm must be
    that arm (same config, same overrides), or the reused run would be another encoder than the report says."""
    from lab.ablation import read_plan

    _, variants = read_plan("configs/ablations/photos_stage1.yaml")
    shared = [v for v in variants if v.key in compare.KNOWN_ARMS]
    assert {v.key for v in shared} >= {"litevae", "lite_s", "sd_vae"}
    for v in shared:
        arm = compare.KNOWN_ARMS[v.key]
        assert (v.ae_config, v.ae_overrides) == (arm.ae_config, arm.ae_overrides)


def test_arms_are_picked_by_key_and_extended_by_arm():
    parse = command_module("compare_encoders").parse_args
    assert [a.key for a in parse([]).arms] == ["litevae", "sd_vae"]
    assert [a.key for a in parse(["--arms", "litevae", "lite_s", "sd_vae"]).arms] == ["litevae", "lite_s", "sd_vae"]
    mine = ["--arm", "mine", "Mine", "configs/autoencoder/litevae_tiny.yaml", "configs/ldm/fmnist_litevae_tiny.yaml"]
    assert [a.key for a in parse(mine).arms] == ["mine"]
    assert [a.key for a in parse(["--arms", "sd_vae", *mine]).arms] == ["sd_vae", "mine"]
    with pytest.raises(SystemExit):
        parse(["--arms", "litevae", "--arm", "litevae", "x", "configs/autoencoder/litevae_tiny.yaml", "y.yaml"])


def test_an_ablation_in_a_comparisons_folder_reuses_its_photo_runs_and_keeps_its_report(tmp_path):
    """The documented route (ablate_stage1.py --out <make compare's folder>): the arms' photo runs are not trained
    again, and the comparison's report.md / results.json are left as they were."""
    from lab.ablation import AblationOptions, run_ablation

    opts = options(tmp_path, repeats=1, photos="configs/data/photos64.yaml", arms=compare.PAPER_RATIO_ARMS)
    compare.run_comparison(opts, Pipeline(opts.out_dir, echo=quiet, runner=FakeCommands()), measure=fake_measure)
    out = Path(opts.out_dir)
    before = {name: (out / name).read_bytes() for name in ("report.md", "results.json")}
    fake = FakeCommands()
    ablation = AblationOptions(plan="configs/ablations/photos_stage1.yaml", out_dir=opts.out_dir, repeats=1,
                               steps=opts.ae_steps, detector=opts.detector, eval_samples=opts.eval_samples, jobs=1,
                               only=["litevae", "lite_tiny_gn8", "sd_vae"])
    report = run_ablation(ablation, Pipeline(opts.out_dir, echo=quiet, runner=fake))
    assert [arg(c, "-n") for c in fake.calls if c[1] == "main.py"] == ["lite_tiny_gn8_r0_photos_ae"]
    assert report.name == "report_ablation_photos_stage1.md" and "| LiteVAE tiny, norm_groups 8" in report.read_text()
    assert "(no test: 1 repeat)" in report.read_text() and "nan" not in report.read_text()
    assert {name: (out / name).read_bytes() for name in before} == before
    assert (out / "plots_ablation_photos_stage1" / "curves.png").is_file()


def test_parallel_chains_run_the_same_commands_and_report(tmp_path):
    """--jobs 2: the (arm, repeat) chains run two at a time, each command with half the cores; the commands and
    the report are those of --jobs 1, and the sample evaluations still run one after another, last."""
    reports, calls = {}, {}
    for jobs in (1, 2):
        fake = FakeCommands()
        opts = options(tmp_path / f"j{jobs}", repeats=2, jobs=jobs)
        pipe = Pipeline(opts.out_dir, echo=quiet, runner=fake, threads=compare.threads_per_job(jobs))
        reports[jobs] = compare.run_comparison(opts, pipe, measure=fake_measure).read_text()
        calls[jobs] = fake.calls
    def same(cmd: list[str]) -> str:  # the other folder and run-folder time stamps aside
        return re.sub(r"\d{4}-\d\d-\d\dT[\d-]+", "TIME", " ".join(cmd).replace(f"{tmp_path}/j2", f"{tmp_path}/j1"))
    assert sorted(map(same, calls[1])) == sorted(map(same, calls[2]))
    assert [Path(c[1]).name for c in calls[2][-8:]] == ["eval_fid.py"] * 8
    table = lambda text: [line for line in text.splitlines() if line.startswith("| LiteVAE | 2 |")]  # noqa: E731
    assert table(reports[1]) == table(reports[2]) and table(reports[1])


def test_a_downstream_variant_reuses_the_folders_stage_1_and_latents(tmp_path):
    """--ldm-config in a finished comparison's folder trains only its own stage 2 and writes its own report."""
    opts = options(tmp_path, repeats=2, photos="configs/data/photos64.yaml")
    compare.run_comparison(opts, Pipeline(opts.out_dir, echo=quiet, runner=FakeCommands()), measure=fake_measure)
    fake = FakeCommands()
    variant = options(tmp_path, repeats=2, photos="configs/data/photos64.yaml",
                      ldm_config="configs/ldm/fmnist_dit_flow_tiny.yaml")
    report = compare.run_comparison(variant, Pipeline(opts.out_dir, echo=quiet, runner=fake), measure=fake_measure)
    assert [Path(c[1]).name for c in fake.calls] == ["main.py", "sample.py", "sample.py"] * 4 + ["eval_fid.py"] * 8
    assert all(arg(c, "--base") == "configs/ldm/fmnist_dit_flow_tiny.yaml" for c in fake.calls if "--base" in c)
    assert report.name == "report_fmnist_dit_flow_tiny.md" and (Path(opts.out_dir) / "report.md").is_file()
    assert (Path(opts.out_dir) / "plots_fmnist_dit_flow_tiny" / "metrics.png").is_file()


def test_the_command_line_defaults_are_the_options_defaults():
    """`make compare` (no flags) runs exactly CompareOptions() (budgets included)."""
    compare_encoders = script("compare_encoders")

    assert compare_encoders.parse_args([]) == CompareOptions()
    assert compare_encoders.parse_args(["--ae-steps", "7"]).ae_steps == 7


def test_the_demo_builds_every_command_through_the_stages_and_the_scripts_parsers(tmp_path, monkeypatch, capsys):
    """The demo's five stages, with fake commands (each parsed by its script's own parser on the way, FakeCommands):
    the commands are the README's, in order."""
    demo = script("demo")

    fake = FakeCommands()
    monkeypatch.setattr(demo, "manifest_summary", lambda latents: "manifest")
    monkeypatch.setattr(demo, "class_grid", lambda npz, path: path)
    args = demo.build_parser().parse_args(["--logdir", str(tmp_path / "logs"), "--latents", str(tmp_path / "lat"),
                                           "--samples", str(tmp_path / "samples"), "--seed", "3"])
    assert demo.run_demo(args, Pipeline(tmp_path / "state", echo=quiet, runner=fake)) == 0
    assert [Path(c[1]).name for c in fake.calls] == ["main.py", "cache_latents.py", "cache_latents.py", "main.py",
                                                     "sample.py", "eval_fid.py"]
    stage1, stage2 = fake.calls[0], fake.calls[3]
    assert stage1[2:5] == ["--base", "configs/autoencoder/litevae_tiny.yaml", "-t"] and arg(stage1, "-s") == "3"
    assert arg(stage2, "--base") == "configs/ldm/fmnist_litevae_tiny.yaml" and stage2[-1].startswith("latents=")
    evaluation = fake.calls[-1][2:]
    assert evaluation[:6] == ["--samples", evaluation[1], "--ref", "configs/data/fmnist64_cache.yaml", "--ref-split",
                              "validation"] and "--precision-recall" in evaluation
    assert "no FID computed" in capsys.readouterr().out
