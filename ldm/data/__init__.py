"""Image datasets (folder, Fashion-MNIST, photo crops, WebDataset shards), their transform, and the DataModule.

The latent cache's reader lives in ``ldm.cache``; ``ldm.data.LatentShards`` stays importable because configs saved
by earlier runs name it so (the shipped configs say ``ldm.cache.LatentShards``).
"""
from ldm.cache.reader import LatentShards
from ldm.data.datamodule import DataModule
from ldm.data.fashion_mnist import FASHION_MNIST_CLASSES, FashionMNIST
from ldm.data.images import IMAGE_EXTENSIONS, ImageFolder, SkipCounter, collate_skip_bad, collate_train
from ldm.data.photos import PhotoCrops, split_photos
from ldm.data.transforms import BadImageError, ImageTransform, open_image, to_rgb_tensor
from ldm.data.webdataset_images import WebDatasetImages

__all__ = ["BadImageError", "DataModule", "FASHION_MNIST_CLASSES", "FashionMNIST", "IMAGE_EXTENSIONS",
           "ImageFolder", "ImageTransform", "LatentShards", "PhotoCrops", "SkipCounter", "WebDatasetImages",
           "collate_skip_bad", "collate_train", "open_image", "split_photos", "to_rgb_tensor"]
