"""Tasks: start a run, train one epoch, relabel. Each loads the checkpoint, makes one ``sela`` call, saves it."""

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from prefect import task
from prefect.cache_policies import NO_CACHE

from sela.config import TrainParams
from sela.learn import inference, train
from sela.paths import CHECKPOINT
from tasks.environment import device_name
from tasks.images import load_shards


def load_images(root: str, decode_size: int) -> torch.Tensor:
    """All images of the shards as a uint8 (N, decode_size, decode_size, 3) tensor sharing ``load_shards``' array."""
    return torch.from_numpy(load_shards(root, decode_size).images)


@task(name="start-training", cache_policy=NO_CACHE)
def start_training(root: str, params: TrainParams) -> dict[str, Any]:
    """Random network and random balanced labels, saved as the epoch-0 checkpoint."""
    images = load_images(root, params.decode_size)
    checkpoint = train.new_checkpoint(params, images.shape[0])
    train.save_checkpoint(checkpoint, Path(root) / CHECKPOINT)
    parameters = sum(p.numel() for p in checkpoint.model.parameters())
    device = device_name()
    return {"num_images": int(images.shape[0]), "parameters": parameters, "device": device,
            "native_bfloat16": inference.native_bfloat16(torch.device(device))}


def _checkpoint_step(root: str, params: TrainParams, step: Callable[..., dict[str, Any]]) -> dict[str, Any]:
    """Load the checkpoint, apply one ``sela.learn.train`` step to it, save it: the shape of every training task."""
    device = torch.device(device_name())
    checkpoint = train.load_checkpoint(Path(root) / CHECKPOINT, params, device)
    summary = step(checkpoint, load_images(root, params.decode_size), params, device)
    train.save_checkpoint(checkpoint, Path(root) / CHECKPOINT)
    return summary


@task(name="relabel", cache_policy=NO_CACHE)
def relabel(root: str, params: TrainParams) -> dict[str, Any]:
    """Sinkhorn-Knopp relabel of every head from the current network (CuPy on GPU, numpy on CPU)."""
    return _checkpoint_step(root, params, train.relabel)


@task(name="train-epoch", cache_policy=NO_CACHE)
def train_epoch(root: str, params: TrainParams) -> dict[str, Any]:
    """One epoch of SGD on the current labels; the checkpoint is saved after every epoch."""
    return _checkpoint_step(root, params, train.train_epoch)
