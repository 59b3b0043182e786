"""Evaluation metrics: PSNR/SSIM, LPIPS (offline VGG), FID/KID feature statistics, precision/recall, latent MMD,
a small classifier."""
from ldm.metrics.classifier import SmallClassifier, classification_accuracy, train_classifier
from ldm.metrics.features import FeatureExtractor, RandomFeatureNet, build_feature_extractor
from ldm.metrics.fid import (compute_features, feature_statistics, fid_from_features, frechet_distance, kid,
                             load_stats, save_stats)
from ldm.metrics.image import psnr, ssim
from ldm.metrics.lpips import build_lpips
from ldm.metrics.mmd import mmd_rbf, mmd_to_standard_normal
from ldm.metrics.precision_recall import precision_recall

__all__ = [
    "SmallClassifier", "classification_accuracy", "train_classifier",
    "FeatureExtractor", "RandomFeatureNet", "build_feature_extractor",
    "compute_features", "feature_statistics", "fid_from_features", "frechet_distance", "kid", "load_stats",
    "save_stats", "precision_recall", "psnr", "ssim", "build_lpips", "mmd_rbf", "mmd_to_standard_normal",
]
