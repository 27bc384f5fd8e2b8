"""The self-labelling training loop: the one the pipeline, ``dvc repro`` and the benchmarks run.

    relabel (on schedule) -> epoch -> checkpoint -> relabel -> epoch -> checkpoint -> ...

It streams the shards (``sela.data.loader``: every image once an epoch, the same number of steps on every rank),
runs in one process or in many under ``torchrun`` (DistributedDataParallel; the process group is the caller's), and
resumes: after every epoch rank 0 writes the checkpoint atomically, each rank keeps its rows of the epoch's logits
in a memory-mapped file beside it, and a run whose checkpoint matches its ``train`` params and shards (the
fingerprint) continues at the epoch after the last one completed, ending with the labels an uninterrupted run ends
with. A relabel solves each head's rows where they were computed (row-sharded Sinkhorn, one all-reduce an
iteration) and gathers the labels so that every rank holds all N.

Per process, memory grows with N only through per-image vectors: labels (num_heads x N int64), a coverage count,
and this rank's share of the relabel logits (N / world_size x sum of head sizes float32, memory-mapped).
"""

import math
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as distributed

from sela.config import TrainParams
from sela.data.loader import ShardTable, pass_loader, plan_pass, shard_table
from sela.data.shards import manifest_hash, read_manifest
from sela.learn import incremental, state
from sela.learn.inference import (
    autocast,
    label_set_log_likelihoods,
    logit_batches,
    on_device_view,
    rule_labels,
    solve_heads,
    stream_logits,
    view_transforms,
)
from sela.learn.models import MultiHeadNet, model_layout, to_device
from sela.learn.train import (
    Checkpoint,
    heads_cross_entropy,
    heads_to_relabel,
    learning_rate,
    load_payload,
    new_checkpoint,
    relabel_epochs,
    save_checkpoint,
    saved_target_sizes,
)
from sela.sinkhorn.sizes import estimate_sizes, ranked_sizes
from sela.sinkhorn.solver import TorchDistributed

Progress = Callable[[dict[str, Any]], None]
# Training order: the epoch's shards in a new order, 16 read at a time by each loader worker, their samples mixed
# through a buffer of 2,048 encoded images (a few MB of JPEGs): shards of one class each still give mixed batches.
INTERLEAVED_SHARDS = 16
SHUFFLE_BUFFER = 2048
# Initialisation i trains from seed + SEED_STRIDE i: far apart, so that runs of nearby seeds share no initialisation.
SEED_STRIDE = 10_000


@dataclass(frozen=True)
class Processes:
    """This process's place in the run: ``rank`` of ``world_size`` (1 without ``torch.distributed``)."""

    rank: int = 0
    world_size: int = 1

    @classmethod
    def current(cls) -> "Processes":
        if distributed.is_available() and distributed.is_initialized():
            return cls(distributed.get_rank(), distributed.get_world_size())
        return cls()


@dataclass
class TrainingRun:
    """Where a run reads and writes, and the machine settings it runs under (never params)."""

    shard_dir: str
    checkpoint_path: Path
    state_dir: Path
    device: torch.device
    loader_workers: int
    progress: Progress | None = None
    # Benchmarks on a time budget: called after every epoch with the durations so far, returns the epoch count.
    plan_epochs: Callable[[int, list[float]], int] | None = None
    # ``train.start_from: parent``: the parent version's files, fetched (a run from scratch ignores it).
    parent: incremental.ParentVersion | None = None
    # A finished checkpoint of this run is returned as it is, not trained again (an initialisation of several).
    resume_finished: bool = False


def run_training(run: TrainingRun, params: TrainParams) -> Checkpoint:
    """Train (or resume) to ``params.epochs`` (``incremental.epochs`` from a parent); returns the final checkpoint
    (its labels: every head's, all N). From scratch with ``initialisations`` above 1: the best of that many runs
    (``best_initialisation``)."""
    if params.initialisations > 1 and params.start_from == "scratch":
        return best_initialisation(run, params)
    return train_once(run, params)


def best_initialisation(run: TrainingRun, params: TrainParams) -> Checkpoint:
    """``params.initialisations`` runs from scratch, run i from seed + ``SEED_STRIDE`` i in its own folder under the
    state folder (each resumes on its own: a crash costs at most the epoch under way); the one whose label set has
    the lowest SeLa objective, measured as the export measures it, is written to ``run.checkpoint_path`` with an
    ``initialisations`` history entry, and the runs' folders are removed. k-means' n_init: on a collection of a few
    thousand images a run can land where two classes share a cluster, and its objective says so."""
    processes = Processes.current()
    table = shard_table(run.shard_dir)
    communicator = TorchDistributed() if processes.world_size > 1 else None
    best, chosen, objectives, seeds = None, 0, [], []
    for index in range(params.initialisations):
        folder = run.state_dir / f"initialisation-{index}"
        single = params.model_copy(update={"seed": params.seed + SEED_STRIDE * index, "initialisations": 1})
        progress = None if run.progress is None else partial(_tagged, run.progress, index, params.initialisations)
        checkpoint = train_once(replace(run, checkpoint_path=folder / "checkpoint.pt", state_dir=folder,
                                        progress=progress, resume_finished=True), single)
        sums = label_set_log_likelihoods(checkpoint.model, table, params, run.device, run.loader_workers,
                                         checkpoint.target_sizes, processes.rank, processes.world_size, communicator)
        objectives.append(float((-_all_reduce(sums, processes) / table.num_images).min()))
        seeds.append(single.seed)
        _emit(run, processes, {"kind": "initialisation", "initialisation": index, "seed": single.seed,
                               "objective": objectives[-1], "epochs": checkpoint.epoch})
        if best is None or objectives[-1] < objectives[chosen]:  # a tie keeps the earlier run
            best, chosen = checkpoint, index
    entry = {"kind": "initialisations", "seeds": seeds, "objectives": objectives, "chosen": chosen}
    best.history.append(entry)
    if processes.rank == 0:
        save_checkpoint(best, run.checkpoint_path, state.fingerprint(params, manifest_hash(run.shard_dir)))
    _barrier(processes)  # the chosen checkpoint is in place before any run's folder goes
    for folder in run.state_dir.glob("initialisation-*"):  # with those of an earlier, larger count
        shutil.rmtree(folder, ignore_errors=True)
    _emit(run, processes, {**entry, "kind": "chosen"})
    return best


def _tagged(progress: Progress, index: int, count: int, event: dict[str, Any]) -> None:
    progress({**event, "initialisation": index, "initialisations": count})


def train_once(run: TrainingRun, params: TrainParams) -> Checkpoint:
    """One run from ``params.seed`` (or from the parent), resuming where its checkpoint says; see ``run_training``."""
    processes = Processes.current()
    table = shard_table(run.shard_dir)
    if params.start_from == "parent" and run.parent is None:
        raise ValueError("train.start_from is parent but no parent version was given: publish a version first (or "
                         "set train.start_from: scratch)")
    parent_tag = run.parent.tag if params.start_from == "parent" else None
    identity = state.fingerprint(params, manifest_hash(run.shard_dir), parent_tag)
    params = incremental.run_schedule(params)
    checkpoint, start = _start(run, params, table, identity, processes)
    _emit(run, processes, {"kind": "start", **start, "num_images": table.num_images,
                           "world_size": processes.world_size, "device": str(run.device)})
    model = to_device(checkpoint.model, run.device)
    network = _distributed(model, run.device, processes)
    epoch_rows = state.EpochLogits.load(run.state_dir, checkpoint.epoch, processes.rank, processes.world_size)
    durations: list[float] = []
    while checkpoint.epoch < params.epochs:
        began = time.perf_counter()
        if checkpoint.epoch in set(relabel_epochs(params.epochs, params.num_relabels, params.relabel_power,
                                                  incremental.first_relabel_epoch(params))):
            summary = relabel(checkpoint, model, table, params, run, processes, epoch_rows)
            _emit(run, processes, {"kind": "relabel", **summary, "seconds": time.perf_counter() - began})
        epoch_began = time.perf_counter()
        summary, epoch_rows = train_epoch(checkpoint, network, table, params, run, processes)
        seconds = time.perf_counter() - epoch_began
        if processes.rank == 0:
            save_checkpoint(checkpoint, run.checkpoint_path, identity)
        _barrier(processes)  # every rank's epoch files and the checkpoint are in place before older ones go
        state.remove_epoch_logits(run.state_dir, processes.rank, checkpoint.epoch)
        durations.append(time.perf_counter() - began)
        _emit(run, processes, {"kind": "epoch", **summary, "epochs": params.epochs, "seconds": seconds,
                               "images_per_second": summary["images"] / seconds})
        if run.plan_epochs is not None:
            params = params.model_copy(update={"epochs": run.plan_epochs(checkpoint.epoch, durations)})
    # A finished run is never resumed: its epoch logits (N x S floats over all ranks) would only take disk space.
    state.remove_epoch_logits(run.state_dir, processes.rank, None)
    _emit(run, processes, {"kind": "done", "epochs": checkpoint.epoch})
    return checkpoint


def _start(run: TrainingRun, params: TrainParams, table: ShardTable, identity: str,
           processes: Processes) -> tuple[Checkpoint, dict[str, Any]]:
    """A fresh checkpoint (from a parent: the parent's, ``incremental.parent_start``), or the saved one if it belongs
    to this run and is not finished; rank 0 decides and sends the state to every rank (the checkpoint and the
    parent's files may sit on rank 0's disk alone)."""
    num_images = table.num_images
    decision: list[Any] = [None, "no checkpoint"]
    if processes.rank == 0 and run.checkpoint_path.exists():
        payload = load_payload(run.checkpoint_path)
        if payload.get("fingerprint") != identity:
            decision[1] = "the checkpoint was made with other train params or other shards"
        elif payload["epoch"] >= params.epochs and not run.resume_finished:
            decision[1] = f"the checkpoint is of a finished run ({payload['epoch']} epochs)"
        else:
            decision = [payload, f"resuming after epoch {payload['epoch']}"]
    if processes.rank == 0 and decision[0] is None and params.start_from == "parent":
        keys = read_manifest(run.shard_dir)["key"].tolist()
        decision = [incremental.parent_start(run.parent, params, keys),
                    f"starting from parent version {run.parent.tag}: {decision[1]}"]
    if processes.world_size > 1:
        distributed.broadcast_object_list(decision, src=0)
    payload, reason = decision
    checkpoint = new_checkpoint(params, num_images)
    if payload is None:
        state.remove_epoch_logits(run.state_dir, processes.rank, None)
        return checkpoint, {"resumed_at_epoch": None, "reason": f"starting afresh: {reason}", "parent_version": None}
    checkpoint.model.load_state_dict(payload["model"])
    to_device(checkpoint.model, run.device)
    if payload["optimizer"] is not None:  # None from a parent: its momentum belongs to its own schedule
        checkpoint.optimizer.load_state_dict(payload["optimizer"])
    checkpoint.labels = payload["labels"].numpy().copy()
    checkpoint.epoch = payload["epoch"]
    checkpoint.cluster_potentials = [None if p is None else p.numpy() for p in payload["cluster_potentials"]]
    checkpoint.history = payload["history"]
    checkpoint.target_sizes = saved_target_sizes(payload, params)
    start = {"resumed_at_epoch": checkpoint.epoch, "reason": reason,
             "parent_version": incremental.parent_of(checkpoint.history)}
    if "rule_potentials" in payload:  # a start from a parent: its new images get the parent's labels for them
        start.update({key: value for key, value in checkpoint.history[0].items() if key != "kind"},
                     resumed_at_epoch=None)
        label_new_images(checkpoint, payload["rule_potentials"], table, params, run, processes)
    return checkpoint, start


def label_new_images(checkpoint: Checkpoint, potentials: list[np.ndarray], table: ShardTable, params: TrainParams,
                     run: TrainingRun, processes: Processes) -> None:
    """Labels of the images a parent did not have (label -1) by its rule (``inference.rule_labels``): this rank's
    share of an un-augmented pass, a batch at a time (no logits kept), gathered so that every rank holds all N. No
    pass when none is new."""
    new = checkpoint.labels < 0
    if not new.any():
        return
    predicted = np.zeros_like(checkpoint.labels)
    columns = np.cumsum(params.head_sizes)[:-1]
    for rows, logits in logit_batches(checkpoint.model, table, params, run.device, run.loader_workers,
                                      augmented=False, seed=0, rank=processes.rank, world_size=processes.world_size):
        predicted[:, rows] = rule_labels(np.split(logits, columns, axis=1), potentials, params.sinkhorn)
    predicted = _all_reduce(torch.from_numpy(predicted), processes).numpy()
    checkpoint.labels[new] = predicted[new]


class _JointLogits(torch.nn.Module):
    """What DistributedDataParallel wraps: every head's logits side by side (one product, one gradient bucket)."""

    def __init__(self, model: MultiHeadNet) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.joint_logits(images)


def _distributed(model: MultiHeadNet, device: torch.device, processes: Processes) -> torch.nn.Module:
    network = _JointLogits(model)
    if processes.world_size == 1:
        return network
    device_ids = [device] if device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(network, device_ids=device_ids)


def train_epoch(checkpoint: Checkpoint, network: torch.nn.Module, table: ShardTable, params: TrainParams,
                run: TrainingRun, processes: Processes) -> tuple[dict[str, Any], state.EpochLogits | None]:
    """One epoch of SGD on the current labels over this rank's share of the stream. Returns the summary (loss,
    accuracy and images over all ranks) and, with ``relabel_from: last_epoch``, this rank's logits of the epoch."""
    epoch = checkpoint.epoch
    plan = plan_pass(table, rank=processes.rank, world_size=processes.world_size, workers=run.loader_workers,
                     batch_size=params.batch_size, shuffle_seed=params.seed * 100_003 + epoch,
                     seed=params.seed * 100_003 + epoch, buffer=SHUFFLE_BUFFER, interleave=INTERLEAVED_SHARDS)
    in_worker, on_device = view_transforms(params, run.device, augmented=True)
    generator = torch.Generator().manual_seed(params.seed * 100_003 + epoch * 1_009 + processes.rank)
    rate = learning_rate(params, epoch)
    for group in checkpoint.optimizer.param_groups:
        group["lr"] = rate
    targets = torch.from_numpy(checkpoint.labels).to(run.device)
    rows = None
    if params.relabel_from == "last_epoch":
        rows = state.EpochLogits.create(run.state_dir, epoch + 1, processes.rank, processes.world_size,
                                        plan.num_images, sum(params.head_sizes))
    seen = np.zeros(table.num_images, dtype=np.int64)
    totals = torch.zeros(3, dtype=torch.float64, device=run.device)  # loss x images, correct, images
    position = 0
    network.train()
    for batch in pass_loader(plan, params.decode_size, run.loader_workers, in_worker):
        images = on_device_view(batch, run.device, on_device, generator)
        indices = batch.indices.to(run.device, non_blocking=True)
        with autocast(run.device, params.precision):
            logits = network(model_layout(images)).float()
        loss, correct = heads_cross_entropy(logits, targets[:, indices], params.head_sizes)
        checkpoint.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        checkpoint.optimizer.step()
        count = len(batch.indices)
        totals += torch.stack([loss.detach().double() * count, correct.double() / len(params.head_sizes),
                               torch.tensor(float(count), dtype=torch.float64, device=run.device)])
        if rows is not None:
            rows.logits[position : position + count] = logits.detach().cpu().numpy()
            rows.indices[position : position + count] = batch.indices.numpy()
        seen[batch.indices.numpy()] += 1
        position += count
    checkpoint.epoch += 1
    _check_coverage(seen, processes, epoch)
    totals = _all_reduce(totals, processes)
    if rows is not None:
        rows.commit(run.state_dir, checkpoint.epoch, processes.rank, processes.world_size)
    summary = {"epoch": checkpoint.epoch, "loss": float(totals[0] / totals[2]),
               "accuracy": float(totals[1] / totals[2]), "images": int(totals[2]), "lr": rate}
    checkpoint.history.append({"kind": "epoch", **summary})
    return summary, rows


def _check_coverage(seen: np.ndarray, processes: Processes, epoch: int) -> None:
    """Every image exactly once over all ranks: what the plan promises, checked (one N-vector all-reduce)."""
    total = _all_reduce(torch.from_numpy(seen), processes).numpy()
    if not np.all(total == 1):
        missing, repeated = int(np.sum(total == 0)), int(np.sum(total > 1))
        raise RuntimeError(f"epoch {epoch}: {missing} images unseen and {repeated} seen twice: the stream's plan "
                           "is broken")


def _all_reduce(tensor: torch.Tensor, processes: Processes) -> torch.Tensor:
    """Sum over ranks (NCCL reduces on the GPU, gloo on the CPU); the identity in one process."""
    if processes.world_size == 1:
        return tensor
    where = torch.device("cuda", torch.cuda.current_device()) if distributed.get_backend() == "nccl" else None
    reduced = tensor.to(where) if where is not None else tensor.clone()
    distributed.all_reduce(reduced)
    return reduced.to(tensor.device)


def _barrier(processes: Processes) -> None:
    if processes.world_size > 1:
        distributed.barrier()


def relabel(checkpoint: Checkpoint, model: MultiHeadNet, table: ShardTable, params: TrainParams, run: TrainingRun,
            processes: Processes, epoch_rows: state.EpochLogits | None) -> dict[str, Any]:
    """Re-derive the labels of the heads due (``heads_to_relabel``) by warm-started, row-sharded Sinkhorn on this
    rank's rows: the last epoch's logits (``relabel_from: last_epoch``, when every rank has them), or a fresh
    streamed pass of the current network. Every rank ends with the labels of all N."""
    available = epoch_rows is not None and params.relabel_from == "last_epoch"
    if processes.world_size > 1:  # one rank without its rows (a resume on other nodes): every rank passes afresh
        available = bool(_all_reduce(torch.tensor([int(not available)]), processes).item() == 0)
    if available:
        indices, logits, source = np.asarray(epoch_rows.indices), epoch_rows.logits, "last_epoch"
    else:
        indices, logits, source = *fresh_pass(model, table, params, run, processes, checkpoint.epoch), "fresh_pass"
    heads = heads_to_relabel(checkpoint, params)
    columns = np.cumsum([0, *params.head_sizes])
    head_logits = [torch.from_numpy(np.ascontiguousarray(logits[:, columns[h] : columns[h + 1]])).to(run.device)
                   for h in heads]
    communicator = TorchDistributed() if processes.world_size > 1 else None
    if estimating_sizes(params, checkpoint.epoch):
        update_target_sizes(checkpoint, heads, head_logits, params, processes)
    results = solve_heads(head_logits, params, [checkpoint.cluster_potentials[h] for h in heads], communicator,
                          [checkpoint.target_sizes[h] for h in heads],
                          params.sinkhorn.relaxation() if past_size_warmup(params, checkpoint.epoch) else 0.0)
    per_head = []
    for head, result in zip(heads, results, strict=True):
        labels = np.zeros(table.num_images, dtype=np.int64)
        labels[indices] = result.labels
        labels = _all_reduce(torch.from_numpy(labels), processes).numpy()
        changed = float(np.mean(labels != checkpoint.labels[head]))
        checkpoint.labels[head] = labels
        checkpoint.cluster_potentials[head] = np.asarray(result.log_cluster_potential)
        sizes = np.bincount(labels, minlength=params.head_sizes[head])
        per_head.append({"head": head, **result.diagnostics(), "changed": changed, "min_size": int(sizes.min()),
                         "max_size": int(sizes.max()), "target_sizes": checkpoint.target_sizes[head].tolist(),
                         "plan_sizes": np.asarray(result.cluster_sizes).round(5).tolist()})
    summary = {"epoch": checkpoint.epoch, "source": source, "heads": per_head}
    checkpoint.history.append({"kind": "relabel", **summary})
    return summary


def estimating_sizes(params: TrainParams, epoch: int) -> bool:
    """Whether the relabel before ``epoch`` sets the target sizes from the network's counts (``sinkhorn.cluster_sizes``
    estimated or given): only after the warm-up (``past_size_warmup``)."""
    return params.sinkhorn.cluster_sizes in ("estimated", "given") and past_size_warmup(params, epoch)


def past_size_warmup(params: TrainParams, epoch: int) -> bool:
    """Whether the relabel before ``epoch`` may leave equal sizes: never before epoch 1 (an untrained network's
    outputs are arbitrary) nor within the first ``size_warmup`` of the epochs."""
    return epoch >= max(1, math.ceil(params.sinkhorn.size_warmup * params.epochs))


def update_target_sizes(checkpoint: Checkpoint, heads: list[int], head_logits: list[torch.Tensor],
                        params: TrainParams, processes: Processes) -> None:
    """Each head's target sizes from the network's argmax counts on this relabel's rows: ``estimated`` moves them
    towards the counts (``sela.sinkhorn.sizes.estimate_sizes``), ``given`` places the given proportions by the
    counts' rank (``ranked_sizes``; on the label set's heads: over-clustering heads keep equal sizes). The counts
    are summed over ranks (integers, exact), so every rank computes the same sizes."""
    settings = params.sinkhorn
    for head, logits in zip(heads, head_logits, strict=True):
        if settings.cluster_sizes == "given" and head >= params.num_heads:
            continue
        counts = torch.bincount(logits.argmax(1).cpu(), minlength=params.head_sizes[head])
        counts = _all_reduce(counts, processes).numpy()
        checkpoint.target_sizes[head] = (
            ranked_sizes(np.asarray(settings.given_sizes), counts) if settings.cluster_sizes == "given"
            else estimate_sizes(checkpoint.target_sizes[head], counts, settings.size_floor, settings.size_update))


def fresh_pass(model: MultiHeadNet, table: ShardTable, params: TrainParams, run: TrainingRun, processes: Processes,
               epoch: int) -> tuple[np.ndarray, np.ndarray]:
    """This rank's rows and their logits under the current network: the relabel's streamed pass."""
    return stream_logits(model, table, params, run.device, run.loader_workers, params.relabel_augmented,
                         seed=params.seed + epoch, rank=processes.rank, world_size=processes.world_size)


def _emit(run: TrainingRun, processes: Processes, event: dict[str, Any]) -> None:
    """Progress from rank 0 only: one event per start, relabel, epoch and end."""
    if run.progress is not None and processes.rank == 0:
        run.progress(event)
