"""Remote URLs for WebDataset through fsspec: ``s3://``, ``gs://``, ``http(s)://``, ``memory://`` and friends.

WebDataset 1.0.2 opens http(s) with curl, gs with gsutil and knows no s3 or fsspec at all. ``register_gopen``
puts one fsspec-backed opener in its ``gopen_schemes`` table for the schemes below, so shard URLs on any
filesystem fsspec can reach read the same way (``s3fs`` / ``gcsfs`` must be installed for s3 / gs).
"""

import sys

import fsspec

FSSPEC_SCHEMES = ("s3", "gs", "gcs", "http", "https", "memory", "az", "abfs", "hf")


def gopen_fsspec(url: str, mode: str = "rb", bufsize: int = 8192, **options: object) -> object:
    """Open ``url`` with fsspec; the signature WebDataset's ``gopen`` dispatch calls (``bufsize`` is unused)."""
    del bufsize, options  # WebDataset passes its own buffering hints; fsspec picks its block size
    return fsspec.open(url, mode).open()


def register_gopen() -> None:
    """Route WebDataset's opening of the ``FSSPEC_SCHEMES`` URLs through fsspec (idempotent)."""
    import webdataset  # noqa: F401 - imports webdataset.gopen into sys.modules

    # ``webdataset.gopen`` the attribute is the function; the module holding the table is in sys.modules.
    schemes = sys.modules["webdataset.gopen"].gopen_schemes
    for scheme in FSSPEC_SCHEMES:
        schemes[scheme] = gopen_fsspec


def is_local(filesystem: fsspec.AbstractFileSystem) -> bool:
    """True for the local filesystem (paths without a scheme)."""
    protocols = filesystem.protocol if isinstance(filesystem.protocol, tuple) else (filesystem.protocol,)
    return "file" in protocols
