"""Where each stage writes, relative to the project root. ``dvc.yaml`` declares the same paths."""

SHARD_DIR = "data/shards"
CHECKPOINT = "models/checkpoint.pt"
LABELS = "labels/labels.parquet"
CARD = "labels/card.json"
METRICS = "metrics/labels.json"
CLUSTER_SIZES = "metrics/cluster_sizes.csv"
REPORT_DIR = "reports/labels"
EVALUATION = "metrics/evaluation.json"
TRANSFER_MODEL = "models/transfer.pt"
TRANSFER_METRICS = "metrics/transfer.json"
STAGE_OUTPUTS = [SHARD_DIR, CHECKPOINT, LABELS, CARD, METRICS, CLUSTER_SIZES, REPORT_DIR, EVALUATION, TRANSFER_MODEL,
                 TRANSFER_METRICS]
# Beside the checkpoint, never versioned: what a crashed or running training needs (epoch logits, lock, progress).
TRAIN_STATE = "models/train-state"
