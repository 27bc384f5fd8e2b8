"""Sinkhorn-Knopp relabelling: one solver body for numpy and CuPy, row-sharded over torch.distributed."""

from sela._lazy import lazy_exports

__all__, __getattr__ = lazy_exports(__name__, {
    "solver": ["sinkhorn_knopp", "assign_labels", "transport_plan", "SinkhornResult", "SingleProcess",
               "TorchDistributed", "SinkhornMemoryError"],
})
