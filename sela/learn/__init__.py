"""Learning: networks, augmentations, inference (logits and each head's solve), self-labelling training, transfer."""

from sela._lazy import lazy_exports

__all__, __getattr__ = lazy_exports(__name__, {
    "models": ["build_model", "MultiHeadNet"],
    "augment": ["augment", "center"],
    "inference": ["compute_logits", "solve_heads"],
    "train": ["new_checkpoint", "load_checkpoint", "save_checkpoint", "train_epoch", "relabel", "relabel_epochs"],
    "transfer": ["train_on_labels"],
})
