"""Label sets out: final labels and their rule, alignment to the parent version, the card, metrics, report."""

from sela._lazy import lazy_exports

__all__, __getattr__ = lazy_exports(__name__, {
    "export": ["final_labels", "predict_labels", "align_to_parent", "label_metrics", "FinalLabels"],
    "label_set": ["label_table", "write_label_set", "read_label_set"],
    "align": ["alignment", "diff_labels"],
    "metrics": ["label_quality", "hungarian_accuracy"],
    "evaluate": ["evaluate_label_set"],
    "report": ["write_report"],
})
