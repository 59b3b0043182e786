"""The latent cache, apart from the image datasets: its format (``manifest``, ``keys``), the shard stream under every
tar reader (``shards``), the writer behind ``scripts/cache_latents.py`` (``writer``, with ``records`` and ``stats``)
and the stage-2 reader (``reader.LatentShards``). The reader never imports the writer."""
from ldm.cache.manifest import MANIFEST_NAME, Manifest, ManifestError, read_latent_stats
from ldm.cache.reader import LatentShards

__all__ = ["LatentShards", "MANIFEST_NAME", "Manifest", "ManifestError", "read_latent_stats"]
