"""Task: record, commit, push and tag the label set with its checkpoint (see ``sela.registry.publish``)."""

from prefect import task
from prefect.cache_policies import NO_CACHE

from sela.paths import STAGE_OUTPUTS
from sela.registry.publish import publish_version


@task(name="version", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=5)
def publish(root: str, tag_prefix: str, summary: str) -> dict[str, str]:
    """Retried: the push goes over the network to the remote; a retry after a failed push is safe."""
    from pathlib import Path

    return publish_version(Path(root), STAGE_OUTPUTS, tag_prefix, f"label set: {summary}")
