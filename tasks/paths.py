"""Where each stage writes, relative to the project root. ``dvc.yaml`` declares the same paths."""

SHARD_DIR = "data/shards"
CHECKPOINT = "models/checkpoint.pt"
LABELS = "labels/labels.parquet"
CARD = "labels/card.json"
METRICS = "metrics/labels.json"
CLUSTER_SIZES = "metrics/cluster_sizes.csv"
STAGE_OUTPUTS = [SHARD_DIR, CHECKPOINT, LABELS, CARD, METRICS, CLUSTER_SIZES]
