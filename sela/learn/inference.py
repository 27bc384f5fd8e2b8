"""Inference: a network's logits over images and the Sinkhorn solve of each head on them.

Training (the relabel pass), export (the final labels) and prediction (new images) all go through here, so that a
label set's images are seen the same way whichever step looks at them.
"""

from typing import Any

import numpy as np
import torch

from sela.config import SinkhornParams, TrainParams
from sela.learn.augment import augment, center
from sela.learn.models import MultiHeadNet, model_layout, to_device
from sela.sinkhorn.solver import Communicator, SinkhornResult, sinkhorn_knopp


def native_bfloat16(device: torch.device) -> bool:
    """Whether ``device`` computes in bfloat16 in hardware: a CUDA GPU of compute capability 8.0 or later, or a CPU
    with AVX512-BF16 or AMX instructions. Elsewhere ``precision: bfloat16`` still runs, emulated, and can be slower
    than float32."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type == "cpu":
        # torch.cpu's probes of the instruction sets oneDNN dispatches on (private names, pinned torch).
        return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    return False


def autocast(device: torch.device, precision: str) -> torch.autocast:
    """The forward pass under bfloat16 autocast when ``precision`` says so, on any device; else float32."""
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=precision == "bfloat16")


@torch.no_grad()
def compute_logits(
    model: MultiHeadNet,
    images: torch.Tensor,
    params: TrainParams,
    device: torch.device,
    augmented: bool,
    seed: int = 0,
    batch_size: int = 512,
) -> list[torch.Tensor]:
    """Logits of every head for every image, row i for image i. -> num_heads x (N, K) float32 on ``device``.

    ``augmented``: training crops at ``params.image_size``; else each whole image at ``params.eval_image_size``.
    """
    model = to_device(model, device).eval()
    generator = torch.Generator(device="cpu").manual_seed(seed)
    outputs: list[list[torch.Tensor]] = [[] for _ in model.heads]
    for start in range(0, images.shape[0], batch_size):
        raw = images[start : start + batch_size].to(device)
        if augmented:
            batch = augment(raw, params.augment, params.image_size, generator)
        else:
            batch = center(raw, params.eval_image_size)
        with autocast(device, params.precision):
            head_outputs = model(model_layout(batch))
        for head, logits in enumerate(head_outputs):
            outputs[head].append(logits.float())
    model.train()
    return [torch.cat(head_outputs) for head_outputs in outputs]


def solve_heads(
    logits: list[torch.Tensor], params: TrainParams, warm_starts: list[np.ndarray | None],
    communicator: Communicator | None = None,
) -> list[SinkhornResult]:
    """Sinkhorn on each head's logits (N, K_h): with CuPy on the logits' GPU (zero-copy DLPack), numpy on CPU.

    With a ``communicator`` (``TorchDistributed``) the logits are this process's rows of a solve sharded by rows
    over the process group: one all-reduce an iteration, every process ends with the same cluster potentials.

    The results' arrays are numpy either way. On a GPU the heads are solved one after the other in one CuPy
    context, and CuPy's memory pool is given back to torch once, after the last head.
    """
    if not logits or not logits[0].is_cuda:
        return [_solve(head.detach().cpu().numpy(), params.sinkhorn, warm, communicator)
                for head, warm in zip(logits, warm_starts, strict=True)]
    import cupy  # a CUDA device without CuPy is a broken install: fail loudly, never fall back silently

    torch.cuda.empty_cache()  # blocks torch caches are invisible to CuPy's free-memory check
    results = []
    with cupy.cuda.Device(logits[0].device.index):  # CuPy allocates and launches on its *current* device
        for head, warm in zip(logits, warm_starts, strict=True):
            result = _solve(cupy.from_dlpack(head.detach()), params.sinkhorn,
                            None if warm is None else cupy.asarray(warm), communicator)
            result.labels = cupy.asnumpy(result.labels)
            result.log_cluster_potential = cupy.asnumpy(result.log_cluster_potential)
            results.append(result)
        cupy.get_default_memory_pool().free_all_blocks()  # give the stored kernels' memory back to torch
    return results


def _solve(array: Any, settings: SinkhornParams, warm: Any, communicator: Communicator | None) -> SinkhornResult:
    """``sinkhorn_knopp`` with the configured settings, on whichever array namespace ``array`` belongs to."""
    return sinkhorn_knopp(
        array,
        settings.sharpness,
        tolerance=settings.tolerance,
        stop_rule=settings.stop_rule,
        max_iterations=settings.max_iterations,
        storage=settings.dtype,
        warm_start=warm,
        communicator=communicator,
    )
