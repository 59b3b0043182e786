"""The one typed description of the pipeline's commands: stage 1 / stage 2 training, caching, sampling, evaluation.

The demo, the comparison, the ablation and the pipeline runner build their command lines only here. A stage is a
frozen dataclass whose fields are the command's options (``flag`` metadata names the option; ``None`` and ``False``
leave it out); ``argv()`` is what runs, and building a stage parses its arguments with the target script's own
parser (``scripts/<name>.py``'s ``build_parser``, ``ldm.cli``), so a renamed or removed option fails where the command is built, and
in the tests, not in the middle of a comparison.
"""
from __future__ import annotations

import argparse
import importlib.util
import sys
from functools import cache
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, ClassVar, Sequence

from ldm import cli
PY = sys.executable
PathLike = str | Path
ROOT = Path(__file__).resolve().parents[1]  # the repository: scripts/ and configs/ are read relative to it


@cache
def script(name: str) -> Any:
    """The module of ``scripts/<name>.py`` (its ``build_parser`` and ``main``). Each public command is one file, not
    a package module, so it is loaded by path; the stages and the tests parse with the very parser the command uses."""
    path = ROOT / "scripts" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"scripts.{name}", path)
    if spec is None or not path.is_file():
        raise FileNotFoundError(f"no command {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def flag(name: str | None = None, **kw: Any) -> Any:
    """A command option: ``--name value`` (``name`` None: a positional argument); a list gives ``--name a b``."""
    return field(metadata={"flag": name}, **kw)


@dataclass(frozen=True, kw_only=True)
class Stage:
    """A command of the pipeline: ``SCRIPT`` run with the options the fields hold."""

    SCRIPT: ClassVar[str]
    PARSE: ClassVar[Callable[[list[str]], Any]]

    def __post_init__(self) -> None:
        self.parse()

    def args(self) -> list[str]:
        out: list[str] = []
        for f in fields(self):
            value, name = getattr(self, f.name), f.metadata.get("flag")
            if value is None or value is False or (isinstance(value, (list, tuple)) and not value and name):
                continue
            values = ([str(v) for v in value] if isinstance(value, (list, tuple))
                      else [] if value is True else [str(value)])
            out += ([name] if name else []) + values
        return out

    def argv(self) -> list[str]:
        return [PY, self.SCRIPT, *self.args()]

    def parse(self) -> Any:
        """The arguments as the script's parser reads them (``SystemExit`` from argparse on an unknown option)."""
        return type(self).PARSE(self.args())


def _parser(name: str) -> Callable[[list[str]], argparse.Namespace]:
    return lambda args: script(name).build_parser().parse_args(args)


@dataclass(frozen=True, kw_only=True)
class Train(Stage):
    """``main.py --base ... -t``; with ``resume``, ``main.py -r <run> -t``."""

    SCRIPT: ClassVar[str] = "main.py"
    PARSE: ClassVar = staticmethod(cli.parse_args)
    bases: Sequence[str] = flag("--base", default=())
    resume: PathLike | None = flag("-r", default=None)
    train: bool = flag("-t", default=True)
    logdir: PathLike | None = flag("-l", default=None)
    name: str | None = flag("-n", default=None)
    seed: int | None = flag("-s", default=None)
    overrides: Sequence[str] = flag(None, default=())  # key.path=value, last

    def resumed(self, run: PathLike) -> "Train":
        """The same training continued from ``run`` (its saved config; the overrides again, and the seed)."""
        return Train(resume=run, seed=self.seed, overrides=self.overrides)


@dataclass(frozen=True, kw_only=True)
class CacheLatents(Stage):
    SCRIPT: ClassVar[str] = "scripts/cache_latents.py"
    PARSE: ClassVar = staticmethod(lambda args: script("cache_latents").parse_args(args))
    ae: PathLike = flag("--ae")
    data: PathLike | None = flag("--data", default=None)
    split: str = flag("--split")
    out: PathLike = flag("--out")
    workers: int | None = flag("--workers", default=None)


@dataclass(frozen=True, kw_only=True)
class Sample(Stage):
    SCRIPT: ClassVar[str] = "scripts/sample.py"
    PARSE: ClassVar = staticmethod(_parser("sample"))
    source: PathLike = flag(None)
    seeds: str = flag("--seeds")
    batch_size: int | None = flag("--batch-size", default=None)
    out: PathLike = flag("--out")


@dataclass(frozen=True, kw_only=True)
class EvalAutoencoder(Stage):
    SCRIPT: ClassVar[str] = "scripts/eval_autoencoder.py"
    PARSE: ClassVar = staticmethod(_parser("eval_autoencoder"))
    ae: PathLike = flag("--ae")
    data: PathLike | None = flag("--data", default=None)
    split: str | None = flag("--split", default=None)
    weights: str | None = flag("--weights", default=None)
    max_samples: int | None = flag("--max-samples", default=None)
    detector: str | None = flag("--detector", default=None)
    real_features_cache: PathLike | None = flag("--real-features-cache", default=None)
    out: PathLike = flag("--out")


@dataclass(frozen=True, kw_only=True)
class EvalSamples(Stage):
    """``scripts/eval_fid.py``: FID (KID, precision/recall) and the class accuracy of samples."""

    SCRIPT: ClassVar[str] = "scripts/eval_fid.py"
    PARSE: ClassVar = staticmethod(_parser("eval_fid"))
    samples: PathLike = flag("--samples")
    ref: PathLike = flag("--ref")
    ref_split: str | None = flag("--ref-split", default=None)
    max_ref: int | None = flag("--max-ref", default=None)
    detector: str | None = flag("--detector", default=None)
    ref_stats_cache: PathLike | None = flag("--ref-stats-cache", default=None)
    kid: bool = flag("--kid", default=False)
    kid_subset_size: int | None = flag("--kid-subset-size", default=None)
    kid_subsets: int | None = flag("--kid-subsets", default=None)
    classifier_data: PathLike | None = flag("--classifier-data", default=None)
    classifier_cache: PathLike | None = flag("--classifier-cache", default=None)
    precision_recall: bool = flag("--precision-recall", default=False)
    out: PathLike = flag("--out")


@dataclass(frozen=True, kw_only=True)
class ProbeLatents(Stage):
    """``scripts/probe_latents.py``: the latent probes of one first stage."""

    SCRIPT: ClassVar[str] = "scripts/probe_latents.py"
    PARSE: ClassVar = staticmethod(_parser("probe_latents"))
    ae: PathLike = flag("--ae")
    data: PathLike | None = flag("--data", default=None)
    split: str | None = flag("--split", default=None)
    max_samples: int | None = flag("--max-samples", default=None)
    diffusion_steps: int | None = flag("--diffusion-steps", default=None)
    detector: str | None = flag("--detector", default=None)
    class_accuracy: bool = flag("--class-accuracy", default=False)
    classifier_cache: PathLike | None = flag("--classifier-cache", default=None)
    out: PathLike = flag("--out")


STAGES = (Train, CacheLatents, Sample, EvalAutoencoder, EvalSamples, ProbeLatents)


def parse_argv(argv: Sequence[str]) -> Any:
    """A built command line (``[python, script, *args]``) as its script's parser reads it."""
    script = str(argv[1])
    stage = next((s for s in STAGES if s.SCRIPT == script), None)
    if stage is None:
        raise ValueError(f"{script} is not a pipeline stage (one of {[s.SCRIPT for s in STAGES]})")
    return stage.PARSE([str(a) for a in argv[2:]])
