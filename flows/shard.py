"""Stage ``shard``: images -> WebDataset shards. ``python -m flows.shard`` is the DVC stage command."""

from typing import Any

from prefect import flow

from flows.common import resolve
from sela.config import ParamsOverrides
from tasks.shard import shard_images


@flow(name="shard", log_prints=False)
def shard_flow(root: str = ".", overrides: ParamsOverrides | None = None) -> dict[str, Any]:
    """Pack the configured source into ``data/shards`` with a manifest."""
    root, params = resolve(root, overrides)
    return shard_images(root, params.shard)


if __name__ == "__main__":
    shard_flow()
