"""Images in: sources (folders, archives, globs, lists, URLs), the ingest's checks, WebDataset shards, streaming."""

from sela._lazy import lazy_exports

__all__, __getattr__ = lazy_exports(__name__, {
    "sources": ["list_source", "escape_key", "unescape_key", "decode_image", "iter_digit_samples"],
    "ingest": ["ingest", "IngestReport"],
    "shards": ["read_manifest", "read_shards", "write_shards", "manifest_hash", "shard_urls", "LoadedShards"],
    "stream": ["ShardStream", "StreamSettings"],
    "remote": ["register_gopen"],
})
