"""Learning: networks, augmentations, inference (logits and each head's solve), the self-labelling loop (streamed,
distributed, resumable), transfer."""

from sela._lazy import lazy_exports

__all__, __getattr__ = lazy_exports(__name__, {
    "models": ["build_model", "MultiHeadNet"],
    "augment": ["augment", "center"],
    "inference": ["compute_logits", "stream_logits", "solve_heads"],
    "loop": ["run_training", "TrainingRun"],
    "state": ["training_lock", "fingerprint"],
    "train": ["new_checkpoint", "load_checkpoint", "save_checkpoint", "train_epoch", "relabel_epochs"],
    "transfer": ["train_on_labels"],
})
