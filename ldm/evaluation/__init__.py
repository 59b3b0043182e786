"""Evaluation, one module per job: ``detectors`` (FID feature networks by name), ``sources`` (images from a
folder, ``.npz`` or data config), ``samples`` (reference statistics, FID/KID, precision/recall, class accuracy),
``autoencoder`` (reconstruction metrics), ``latents`` (latent-cache diagnostics)."""
from ldm.evaluation.autoencoder import evaluate_autoencoder, reconstruct, resize_images
from ldm.evaluation.detectors import Detector, build_detector, resolve_detector_spec
from ldm.evaluation.latents import latent_diagnostics
from ldm.evaluation.samples import ReferenceStats, evaluate_samples, reference_classifier, reference_stats, source_accuracy
from ldm.evaluation.sources import ImageSource, data_loader, load_npz_images

__all__ = ["Detector", "ImageSource", "ReferenceStats", "build_detector", "data_loader", "evaluate_autoencoder",
           "evaluate_samples", "latent_diagnostics", "load_npz_images", "reconstruct",
           "reference_classifier", "reference_stats", "resize_images", "resolve_detector_spec", "source_accuracy"]
