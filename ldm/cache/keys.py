"""Sample keys in the cache's tar shards: webdataset splits a member name at its first ".", so a source key (a file
path such as ``a/b.c.png``) is stored with ``%`` and ``.`` escaped, reversibly; ``key_from_tar`` undoes it."""
from __future__ import annotations

import re

# Caches written before KEY_SCHEME replaced "." by "_" (not reversible: a.b and a_b collided); they still read,
# since readers take the key from each sample's json.
KEY_SCHEME = "percent: '%' -> '%25', '.' -> '%2E'"
_ESCAPED = re.compile("%(25|2E)")


def tar_key(key: str) -> str:
    """A tar-safe ``__key__``: WebDataset splits member names at the first dot, so dots are escaped, and ``%``
    too, which makes the escape injective and reversible (``key_from_tar``)."""
    return str(key).replace("%", "%25").replace(".", "%2E")


def key_from_tar(name: str) -> str:
    """The key that ``tar_key`` escaped into ``name``."""
    return _ESCAPED.sub(lambda m: chr(int(m.group(1), 16)), name)
