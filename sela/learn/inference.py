"""Inference: a network's logits over images and the Sinkhorn solve of each head on them.

Training (the relabel pass), export (the final labels) and prediction (new images) all go through here, so that a
label set's images are seen the same way whichever step looks at them.
"""

from collections.abc import Callable, Iterator
from functools import partial
from typing import Any

import numpy as np
import torch
import torch.nn.functional as functional

from sela.config import SinkhornParams, TrainParams
from sela.data.loader import Batch, ShardTable, pass_loader, plan_pass
from sela.learn.augment import augment, center
from sela.learn.models import MultiHeadNet, model_layout, to_device
from sela.sinkhorn.solver import Communicator, SinkhornResult, assign_labels, sinkhorn_knopp


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


def rule_labels(heads: list[Any], cluster_potentials: list[np.ndarray] | np.ndarray,
                settings: SinkhornParams) -> np.ndarray:
    """A label set's rule, argmax_k lambda log p_k(x) + g_k, per head: ``heads`` one (M, K_h) array or tensor of
    logits each, ``cluster_potentials`` one g (K_h,) each -> (num_heads, M) int64, network output order. The export
    labels new images with it, prediction too, and an incremental run its new images."""
    return np.stack([assign_labels(head.float().cpu().numpy() if isinstance(head, torch.Tensor) else
                                   np.ascontiguousarray(head, dtype=np.float32),
                                   settings.sharpness, potential, settings.dtype)
                     for head, potential in zip(heads, cluster_potentials, strict=True)]).reshape(len(heads), -1)


def label_log_probabilities(logits: list[torch.Tensor], labels: np.ndarray) -> torch.Tensor:
    """log p_h(y_h | x) of each head's labels: ``logits`` one (n, K_h) tensor per head, ``labels`` (H, n) int ->
    (H, n) float32 on the CPU. Minus its mean over the images is a head's SeLa objective."""
    return torch.stack([
        functional.log_softmax(head.detach().cpu().float(), dim=1)
        .gather(1, torch.from_numpy(np.asarray(head_labels, dtype=np.int64))[:, None])[:, 0]
        for head, head_labels in zip(logits, labels, strict=True)
    ])


def label_set_log_likelihoods(model: MultiHeadNet, table: ShardTable, params: TrainParams, device: torch.device,
                              workers: int, target_sizes: list[np.ndarray], rank: int = 0, world_size: int = 1,
                              communicator: Communicator | None = None) -> torch.Tensor:
    """Sum over this rank's share of the un-augmented images of log p(label) for each label-set head, its labels
    balanced to ``target_sizes`` as the export balances them -> (num_heads,) float64 on the CPU. Summed over ranks
    and divided by N, minus it is the SeLa objective the export ranks heads by (``sela.labels.export.final_labels``).
    With a ``communicator`` each head's solve is row-sharded over the ranks, as a relabel's is."""
    _, logits = stream_logits(model, table, params, device, workers, augmented=False, seed=0, rank=rank,
                              world_size=world_size)
    columns = np.cumsum([0, *params.head_sizes])
    heads = [torch.from_numpy(np.ascontiguousarray(logits[:, columns[h]:columns[h + 1]])).to(device)
             for h in range(params.num_heads)]
    results = solve_heads(heads, params, [None] * len(heads), communicator, list(target_sizes)[: len(heads)],
                          params.sinkhorn.relaxation())
    return label_log_probabilities(heads, np.stack([result.labels for result in results])).double().sum(dim=1)


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
    communicator: Communicator | None = None, target_sizes: list[np.ndarray] | None = None,
    size_relaxation: float = 0.0,
) -> list[SinkhornResult]:
    """Sinkhorn on each head's logits (N, K_h): with CuPy on the logits' GPU (zero-copy DLPack), numpy on CPU.

    ``target_sizes``: each head's cluster sizes r (K_h,) summing to 1 (``Checkpoint.target_sizes``); None is
    equipartition for every head. ``size_relaxation``: rho of the solver (0: hard sizes; ``sela.sinkhorn.solver``).

    With a ``communicator`` (``TorchDistributed``) the logits are this process's rows of a solve sharded by rows
    over the process group: one all-reduce an iteration, every process ends with the same cluster potentials.

    The results' arrays are numpy either way. On a GPU the heads are solved one after the other in one CuPy
    context, and CuPy's memory pool is given back to torch once, after the last head.
    """
    sizes = target_sizes if target_sizes is not None else [None] * len(logits)
    if not logits or not logits[0].is_cuda:
        return [_solve(head.detach().cpu().numpy(), params.sinkhorn, warm, communicator, size, size_relaxation)
                for head, warm, size in zip(logits, warm_starts, sizes, strict=True)]
    import cupy  # a CUDA device without CuPy is a broken install: fail loudly, never fall back silently

    torch.cuda.empty_cache()  # blocks torch caches are invisible to CuPy's free-memory check
    results = []
    with cupy.cuda.Device(logits[0].device.index):  # CuPy allocates and launches on its *current* device
        for head, warm, size in zip(logits, warm_starts, sizes, strict=True):
            result = _solve(cupy.from_dlpack(head.detach()), params.sinkhorn,
                            None if warm is None else cupy.asarray(warm), communicator, size, size_relaxation)
            result.labels = cupy.asnumpy(result.labels)
            result.cluster_sizes = cupy.asnumpy(result.cluster_sizes)
            result.log_cluster_potential = cupy.asnumpy(result.log_cluster_potential)
            results.append(result)
        cupy.get_default_memory_pool().free_all_blocks()  # give the stored kernels' memory back to torch
    return results


def _solve(array: Any, settings: SinkhornParams, warm: Any, communicator: Communicator | None,
           target_sizes: np.ndarray | None, size_relaxation: float) -> SinkhornResult:
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
        target_sizes=target_sizes,
        size_relaxation=size_relaxation,
    )


View = Callable[[torch.Tensor, torch.Generator], torch.Tensor]


def _augmented(params: TrainParams, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    return augment(images, params.augment, params.image_size, generator)


def _whole(params: TrainParams, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    return center(images, params.eval_image_size)


def view_transforms(params: TrainParams, device: torch.device, augmented: bool) -> tuple[View | None, View | None]:
    """(view made in the loader workers, view made on the device): a training crop at ``image_size`` or the whole
    image at ``eval_image_size``. On a CPU the workers make it (alongside the step); on a GPU the GPU does (the
    workers only decode)."""
    view = partial(_augmented if augmented else _whole, params)
    return (view, None) if device.type == "cpu" else (None, view)


def on_device_view(batch: Batch, device: torch.device, view: View | None, generator: torch.Generator) -> torch.Tensor:
    """The batch's images on ``device``, with the view applied there when the workers did not apply it."""
    images = batch.images.to(device, non_blocking=True)
    return images if view is None else view(images, generator)


def stream_logits(model: MultiHeadNet, table: ShardTable, params: TrainParams, device: torch.device, workers: int,
                  augmented: bool, seed: int, rank: int = 0, world_size: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """A streamed pass over rank ``rank``'s contiguous share of the shards (manifest order): its rows (n,) int64
    and their logits (n, sum of head sizes) float32 on the host, averaged over ``relabel_views`` augmented views
    when ``augmented`` (each a new draw), else one whole view. One rank of one: every image, row i = index i."""
    views = params.relabel_views if augmented else 1
    indices, total = np.zeros(0, dtype=np.int64), None
    for view in range(views):
        rows, outputs = [], []
        for batch_rows, batch_logits in logit_batches(model, table, params, device, workers, augmented,
                                                      seed + 1_000_003 * view, rank, world_size):
            rows.append(batch_rows)
            outputs.append(batch_logits)
        indices, logits = np.concatenate(rows), np.concatenate(outputs)
        total = logits if total is None else total + logits
    return indices, total / views


def logit_batches(model: MultiHeadNet, table: ShardTable, params: TrainParams, device: torch.device, workers: int,
                  augmented: bool, seed: int, rank: int = 0, world_size: int = 1,
                  ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """One view of rank ``rank``'s share of the shards, a batch at a time: (rows (B,) int64, logits (B, sum of head
    sizes) float32 on the host). Batches come round-robin over the loader workers, so rows are not in manifest
    order: place them by ``rows``. Holds one batch, never the pass: a caller that keeps less than the logits (the
    labels of new images, ``sela.labels.predict``) stays small however many images there are."""
    in_worker, on_device = view_transforms(params, device, augmented)
    plan = plan_pass(table, rank=rank, world_size=world_size, workers=workers, batch_size=512,
                     shuffle_seed=None, equal_steps=False, seed=seed)
    generator = torch.Generator().manual_seed(seed * 1_009 + rank)
    was_training = model.training
    model.eval()
    try:
        for batch in pass_loader(plan, params.decode_size, workers, in_worker):
            with torch.no_grad():
                images = on_device_view(batch, device, on_device, generator)
                with autocast(device, params.precision):
                    logits = model.joint_logits(model_layout(images)).float().cpu().numpy()
            yield batch.indices.numpy(), logits
    finally:
        model.train(was_training)
