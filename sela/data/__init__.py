"""Images in: sources (folders, archives, globs, lists, URLs), the ingest's checks, WebDataset shards, and the
index-addressed stream that training and export read them through."""

from sela._lazy import lazy_exports

__all__, __getattr__ = lazy_exports(__name__, {
    "sources": ["list_source", "escape_key", "unescape_key", "decode_image", "iter_digit_samples"],
    "ingest": ["ingest", "IngestReport"],
    "shards": ["read_manifest", "read_shards", "write_shards", "manifest_hash", "shard_urls", "LoadedShards"],
    "loader": ["shard_table", "plan_pass", "pass_loader", "ShardTable", "ShardReadError"],
    "remote": ["register_gopen"],
})
