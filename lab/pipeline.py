"""Small resumable stage runners for end-to-end pipelines (``make demo``, ``scripts/compare_encoders.py``).

Every stage is either a public command (printed before it runs, so a pipeline doubles as a tutorial) or a
short in-process function. A finished stage is recorded in ``<out>/state.json`` with its wall-clock time
and result, and is skipped when the pipeline runs again; an interrupted training stage continues from its
run folder's ``last.ckpt`` (``main.py -r``), and the latent cache resumes by itself. Nothing is deleted.
"""
from __future__ import annotations

import csv
import datetime
import fcntl
import json
import logging
import os
import shlex
import subprocess
import threading
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from ldm.io import write_json_atomic
from lab.stages import PY, ROOT, Stage, Train

log = logging.getLogger(__name__)

STATE_FILE = "state.json"
TIME_FORMAT = "%Y-%m-%dT%H-%M-%S"  # the run-folder prefix written by ldm.cli; sorts chronologically

Command = Sequence[str]


def timestamp() -> str:
    return datetime.datetime.now().strftime(TIME_FORMAT)


def display(cmd: Sequence[str]) -> str:
    """The command as a user would type it (this interpreter shown as ``python``)."""
    return shlex.join(["python" if a == PY else a for a in cmd])


class Pipeline:
    """Runs named stages once each; completion, timing and results live in ``<out_dir>/state.json``.

    ``echo`` receives the lines a user should see (the commands, skips); ``runner`` executes a command
    (``subprocess.run`` by default; tests pass a fake). Stages may run from several threads at once (independent
    chains, ``lab.compare``): the state is updated and saved under a lock. Several processes may run
    different stages of one folder (a ``--ldm-config`` variant next to an ablation): each save merges, under a
    file lock, this process's stages into what is on disk. ``threads`` sets ``OMP_NUM_THREADS`` of the commands
    (e.g. 1 each when two chains share two cores).
    """

    def __init__(self, out_dir: str | Path, cwd: str | Path = ROOT, echo: Callable[[str], None] = print,
                 runner: Callable[[list[str]], None] | None = None, threads: int | None = None):
        self._lock = threading.RLock()
        self._touched: set[str] = set()  # the stages this process has recorded: its saves own them
        self.threads = threads
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.cwd = Path(cwd)
        self.echo = echo
        self.runner = runner or self._subprocess
        self.state_path = self.out_dir / STATE_FILE
        self.state: dict[str, Any] = (json.loads(self.state_path.read_text()) if self.state_path.is_file()
                                      else {"stages": {}})

    # ------------------------------------------------------------------------------------------ state
    def _save(self) -> None:
        with self._lock, open(self.state_path.with_suffix(".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
            on_disk = json.loads(self.state_path.read_text()) if self.state_path.is_file() else {"stages": {}}
            mine = {name: self.state["stages"][name] for name in self._touched}
            self.state["stages"] = {**on_disk.get("stages", {}), **mine}  # other processes' stages kept
            # atomic: an interrupt never leaves half a state file
            write_json_atomic(self.state_path, self.state, indent=1, default=str)

    def entry(self, name: str) -> dict:
        with self._lock:
            self._touched.add(name)
            return self.state["stages"].setdefault(name, {})

    def is_done(self, name: str) -> bool:
        """Finished, and every path it recorded as an output still exists (deleted outputs re-run it)."""
        entry = self.state["stages"].get(name, {})
        return entry.get("status") == "done" and all(Path(p).exists() for p in entry.get("outputs", []))

    def result(self, name: str) -> dict:
        return self.state["stages"].get(name, {}).get("result", {})

    def seconds(self) -> dict[str, float]:
        """Wall-clock seconds of each finished stage, interrupted attempts included."""
        return {name: e["seconds"] for name, e in self.state["stages"].items() if e.get("status") == "done"}

    # ------------------------------------------------------------------------------------------ stages
    def _subprocess(self, cmd: list[str]) -> None:
        env = None if self.threads is None else {**os.environ, "OMP_NUM_THREADS": str(self.threads)}
        subprocess.run(cmd, cwd=self.cwd, check=True, env=env)

    def command(self, name: str, cmd: Stage | Command | Callable[[], Stage | Command],
                collect: Callable[[], dict] | None = None, outputs: Callable[[dict], list] | None = None) -> dict:
        """Run ``cmd`` (an ``lab.stages`` stage or an argument list, or a callable building one when the stage
        actually runs) unless done.

        ``collect()`` builds the stage's result after the command succeeds; ``outputs(result)`` lists the
        paths whose disappearance makes the stage run again.
        """
        def body() -> dict:
            built = cmd() if callable(cmd) else cmd
            args = [str(a) for a in (built.argv() if isinstance(built, Stage) else built)]
            with self._lock:
                self.entry(name)["command"] = args
                self._save()
            self.echo(f"\n$ {display(args)}")
            self.runner(args)
            return collect() if collect else {}
        return self.step(name, body, outputs)

    def step(self, name: str, fn: Callable[[], dict], outputs: Callable[[dict], list] | None = None) -> dict:
        """Run the in-process stage ``fn`` (returning a JSON-able result) unless done; time and record it."""
        if self.is_done(name):
            entry = self.state["stages"][name]
            self.echo(f"[done] {name} ({entry['seconds']:.0f} s, recorded in {self.state_path})")
            return entry.get("result", {})
        with self._lock:
            entry = self.entry(name)
            entry.update(status="running", started=entry.get("started") or timestamp())
            self._save()
        t0 = time.time()
        try:
            result = fn()
        except BaseException:
            with self._lock:
                entry["interrupted_seconds"] = entry.get("interrupted_seconds", 0.0) + time.time() - t0
                entry["status"] = "interrupted"
                self._save()
            raise
        with self._lock:
            seconds = time.time() - t0 + entry.pop("interrupted_seconds", 0.0)
            entry.update(status="done", seconds=seconds, result=result,
                         outputs=[str(p) for p in (outputs(result) if outputs else [])])
            self._save()
        log.info("stage %s done in %.0f s", name, seconds)
        return result

    def train(self, name: str, stage: Train) -> Path:
        """A ``main.py ... -t`` stage (``stage`` names its ``logdir`` and run ``name``); an interrupted attempt
        continues with ``main.py -r <its run folder>``."""
        logdir, run_name = Path(stage.logdir), stage.name

        def build() -> Train:
            previous = resumable_run(logdir, run_name, since=self.entry(name)["started"])
            return stage if previous is None else stage.resumed(previous)

        result = self.command(name, build, collect=lambda: {"run": str(newest_run(logdir, run_name))},
                              outputs=lambda r: [Path(r["run"]) / "checkpoints" / "last.ckpt"])
        return Path(result["run"])


# ------------------------------------------------------------------------------------------ run folders
def run_folders(logdir: str | Path, run_name: str) -> list[Path]:
    """``<logdir>/<time>_<run_name>`` folders, oldest first (the time prefix sorts chronologically)."""
    stamp = len(timestamp())
    return sorted(p for p in Path(logdir).glob(f"*_{run_name}")
                  if p.is_dir() and len(p.name) == stamp + 1 + len(run_name))


def newest_run(logdir: str | Path, run_name: str) -> Path:
    runs = run_folders(logdir, run_name)
    if not runs:
        raise FileNotFoundError(f"no run folder matching *_{run_name} in {logdir}")
    return runs[-1]


def resumable_run(logdir: str | Path, run_name: str, since: str) -> Path | None:
    """The newest run folder started at or after ``since`` that has a ``last.ckpt`` to resume from."""
    for run in reversed(run_folders(logdir, run_name)):
        if run.name[:-len(run_name) - 1] >= since and (run / "checkpoints" / "last.ckpt").is_file():
            return run
    return None


# ------------------------------------------------------------------------------------------ logs
def read_metrics(run_dir: str | Path) -> list[dict[str, str]]:
    """All rows of a run's CSV logs, earlier sessions first (a resumed session writes ``csv/resumed_*``)."""
    files = sorted(Path(run_dir, "csv").rglob("metrics.csv"), key=lambda p: (p.parent.name != "csv", p.parent.name))
    rows: list[dict[str, str]] = []
    for path in files:
        with open(path, newline="") as f:
            rows.extend(csv.DictReader(f))
    return rows


def curve(run_dir: str | Path, key: str) -> list[tuple[int, float]]:
    """``(step, value)`` of ``key`` over the run (empty if never logged); a step logged twice keeps the last."""
    points: dict[int, float] = {}
    for row in read_metrics(run_dir):
        if row.get(key) not in (None, ""):
            points[int(float(row["step"]))] = float(row[key])
    return sorted(points.items())


def metric_keys(run_dir: str | Path) -> list[str]:
    """Every metric column logged with at least one value."""
    keys: dict[str, None] = {}
    for row in read_metrics(run_dir):
        keys.update((k, None) for k, v in row.items() if v not in (None, "") and k not in ("step", "epoch"))
    return list(keys)


def manifest_summary(cache_dir: str | Path) -> str:
    """A few lines describing a latent cache's ``manifest.json``: per split counts, shape and statistics."""
    from ldm.cache.manifest import Manifest  # here: the ldm.data package imports torch, this module does not

    splits = Manifest.read(cache_dir).splits
    return "\n".join([f"latent cache {cache_dir}:"] + [f"  {split}: {e.describe()}" for split, e in splits.items()])
