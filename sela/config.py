"""Typed view of ``params.yaml``: one section per pipeline stage, unknown keys rejected by name.

``params.yaml`` is the only place values are set: these models carry types and bounds, not defaults, so a
missing key is an error too. Machine settings (device, loader workers, process and node counts) are not
parameters: they are environment variables or command-line options of the entry points.
"""

from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PositiveFloat,
    PositiveInt,
    ValidationError,
    create_model,
    model_validator,
)


class Section(BaseModel):
    """Base for every section: unknown keys are errors, values are immutable once validated."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class ShardParams(Section):
    """Stage ``shard``: where images come from and how they are packed into WebDataset shards."""

    source: str = Field(
        description="'digits' (embedded default), a folder, a .tar/.tar.gz, a glob or a .txt/.lst list file; "
        "local or an fsspec URL (s3://, gs://, http(s)://, memory://)"
    )
    image_size: PositiveInt = Field(description="side of the square RGB image the embedded digits are rendered at")
    samples_per_shard: PositiveInt
    min_side: PositiveInt = Field(description="images with a side shorter than this are quarantined (too small)")
    max_side: PositiveInt = Field(description="longer sides are shrunk to this (original size kept in the manifest)")

    @model_validator(mode="after")
    def _ordered_sides(self) -> "ShardParams":
        if self.min_side > self.max_side:
            raise ValueError(f"min_side={self.min_side} must not exceed max_side={self.max_side}")
        return self


class AugmentParams(Section):
    """The paper's augmentations, applied to every training batch (and to the relabel pass if enabled)."""

    crop_scale_min: float = Field(gt=0, le=1)
    crop_scale_max: float = Field(gt=0, le=1)
    grayscale_probability: float = Field(ge=0, le=1)
    color_jitter: float = Field(ge=0, le=1)
    flip_probability: float = Field(ge=0, le=1)

    @model_validator(mode="after")
    def _ordered_scales(self) -> "AugmentParams":
        if self.crop_scale_min > self.crop_scale_max:
            raise ValueError(
                f"crop_scale_min={self.crop_scale_min} must not exceed crop_scale_max={self.crop_scale_max}")
        return self


class SinkhornParams(Section):
    """Relabel solver: lambda of the paper is ``sharpness``."""

    sharpness: PositiveFloat
    tolerance: PositiveFloat
    stop_rule: Literal["official", "marginal"]
    max_iterations: PositiveInt
    dtype: Literal["float64", "float32", "bfloat16", "float16"] = Field(
        description="storage type of the N x K Sinkhorn kernel: float64/float32 on CPU; on a GPU also bfloat16 or "
        "float16 (half the memory, one fused pass an iteration)"
    )
    cluster_sizes: Literal["equal", "estimated", "given", "relaxed"] = Field(
        description="target cluster sizes of every relabel: equal (the paper's equipartition, N / K each), "
        "estimated (re-estimated before each relabel after the warm-up from the network's argmax counts, with a "
        "floor), given (the proportions in given_sizes, placed on the clusters by the network's argmax counts "
        "after the warm-up) or relaxed (equal sizes as a KL penalty instead of a constraint after the warm-up: "
        "unbalanced optimal transport, size_penalty); docs/imbalance.md")
    given_sizes: list[PositiveFloat] | None = Field(
        description="given sizes: the collection's class proportions, num_clusters of them in any order (scaled "
        "to sum to 1); null with the other methods")
    size_floor: float = Field(gt=0, lt=1, description="estimated sizes: every cluster keeps at least this fraction "
                              "of N / K, so that none dies")
    size_update: float = Field(gt=0, le=1, description="estimated sizes: weight of the network's counts against "
                               "the previous sizes at each relabel (1: the counts alone)")
    size_penalty: PositiveFloat = Field(description="relaxed sizes: tau, the weight of KL(sizes || equal) against "
                                        "the cross-entropy of the labels, both in nats per image: sizes move a KL "
                                        "of d from equal only where that makes the labels tau d nats cheaper")
    size_warmup: float = Field(ge=0, lt=1, description="estimated, given and relaxed sizes: fraction of the epochs "
                               "trained on equal sizes before the sizes first follow the network (an untrained "
                               "network's outputs are arbitrary); the relabel before epoch 0 is always equal")

    @model_validator(mode="after")
    def _given_sizes_with_their_method(self) -> "SinkhornParams":
        if (self.cluster_sizes == "given") != (self.given_sizes is not None):
            given = "null" if self.given_sizes is None else self.given_sizes
            raise ValueError(f"given_sizes is {given} with cluster_sizes: {self.cluster_sizes}: set the proportions "
                             "exactly when cluster_sizes is given (null otherwise)")
        return self

    def relaxation(self) -> float:
        """rho of the solver (``sinkhorn_knopp``'s ``size_relaxation``) once the sizes follow the collection: with
        relaxed sizes 1 / (1 + lambda tau), the entropic weight 1 / lambda against the penalty tau; else 0 (hard)."""
        return 1.0 / (1.0 + self.sharpness * self.size_penalty) if self.cluster_sizes == "relaxed" else 0.0


class OverclusteringParams(Section):
    """Auxiliary heads with more clusters than the label set (the paper's CIFAR recipe: 128-way heads beside the
    10-way ones). Trained and relabelled like the others, they shape the features; they are not exported."""

    num_heads: int = Field(ge=0)
    num_clusters: PositiveInt = Field(ge=2)


class IncrementalParams(Section):
    """A run with ``start_from: parent``: its schedule, in place of the full run's ``epochs``, ``num_relabels`` and
    ``learning_rate`` (the parent's network is trained already; the run only brings the new images in)."""

    epochs: PositiveInt
    relabels: int = Field(ge=0, description="relabels before epochs 1..epochs-1, spaced as relabel_power says (the "
                          "run starts on the parent's labels and its new images' predicted ones: none before epoch 0)")
    learning_rate: PositiveFloat = Field(description="start of the cosine decay over the run's epochs")

    @model_validator(mode="after")
    def _relabels_fit(self) -> "IncrementalParams":
        if self.relabels > self.epochs - 1:
            raise ValueError(f"relabels={self.relabels} do not fit between {self.epochs} epochs (at most "
                             f"{self.epochs - 1}: one before each epoch after the first)")
        return self


class TrainParams(Section):
    """Stage ``train``: network, optimiser and relabel schedule."""

    seed: int
    initialisations: PositiveInt = Field(
        le=16, description="independent runs from scratch, run i from seed + 10000 i; the one whose label set has "
        "the lowest SeLa objective is kept (k-means' n_init). Run 0 is the run of initialisations: 1. A start from a "
        "parent is one run whatever this says")
    architecture: Literal["small_cnn", "small_resnet", "resnet18"]
    width: PositiveInt
    decode_size: PositiveInt = Field(
        description="side every image is decoded at, once, before any view is cut from it: training crops are "
        "taken from it and resized to image_size, whole views resized to eval_image_size; at least both")
    image_size: PositiveInt
    eval_image_size: PositiveInt = Field(
        description="side of every unaugmented view (the export's logits, kNN and probe features, scoring): "
        "larger than image_size because the training crops (crop_scale_min..max of an image, resized to "
        "image_size) show objects larger than a whole image at image_size does (FixRes, Touvron et al. 2019)")
    num_heads: PositiveInt
    num_clusters: PositiveInt = Field(ge=2)
    hidden_layers: list[PositiveInt] = Field(
        max_length=4, description="widths of the Linear + BatchNorm + ReLU layers the heads share on top of the "
        "backbone; the learned features (kNN, probe) are read before them")
    epochs: PositiveInt
    batch_size: PositiveInt = Field(
        ge=2, description="images per SGD step; at least 2: BatchNorm cannot train on one (train_epoch skips such "
        "batches, so a size of 1 would train on nothing)")
    learning_rate: PositiveFloat
    momentum: float = Field(ge=0, lt=1)
    weight_decay: float = Field(ge=0)
    num_relabels: PositiveInt
    relabel_power: float = Field(ge=1, description="relabel epochs are spaced as (i/n)^power: denser early")
    relabel_augmented: bool
    relabel_from: Literal["fresh_pass", "last_epoch"] = Field(
        description="fresh_pass: a forward pass over every image at relabel time (the paper); last_epoch: the "
        "outputs the previous training epoch computed on its augmented images anyway (no extra pass: on a CPU a "
        "pass costs a third of an epoch, so relabels can be as frequent as epochs)")
    relabel_heads: Literal["all", "one_in_turn"] = Field(
        description="all: every relabel solves every head; one_in_turn: the first relabel solves every head, each "
        "later one a single head in turn (the paper's CIFAR code: a relabel costs one solve, not one per head)")
    relabel_views: PositiveInt = Field(
        le=64, description="augmented views whose logits are averaged in each relabel pass (1 if not augmented)"
    )
    precision: Literal["float32", "bfloat16"] = Field(
        description="the network's forward passes: float32, or bfloat16 autocast (weights, gradients and the "
        "loss stay float32). Fast on GPUs and on CPUs with bfloat16 instructions (AVX512-BF16, AMX); elsewhere "
        "the CPU emulates it, slower than float32")
    overclustering: OverclusteringParams
    augment: AugmentParams
    sinkhorn: SinkhornParams
    start_from: Literal["scratch", "parent"] = Field(
        description="scratch: a random network and random balanced labels; parent: the newest published version's "
        "network and labels (its new images labelled by its rule), trained on for ``incremental`` epochs")
    incremental: IncrementalParams

    @model_validator(mode="after")
    def _views_fit_the_decode(self) -> "TrainParams":
        # A view larger than the decoded image would be upsampled from pixels thrown away at decode time.
        largest = max(self.image_size, self.eval_image_size)
        if self.decode_size < largest:
            raise ValueError(f"decode_size={self.decode_size} is smaller than image_size={self.image_size} or "
                             f"eval_image_size={self.eval_image_size}: raise it to at least {largest}")
        return self

    @model_validator(mode="after")
    def _given_sizes_fit_the_heads(self) -> "TrainParams":
        given = self.sinkhorn.given_sizes
        if given is not None and len(given) != self.num_clusters:
            raise ValueError(f"sinkhorn.given_sizes has {len(given)} proportions but num_clusters is "
                             f"{self.num_clusters}: give one per cluster")
        return self

    @property
    def head_sizes(self) -> list[int]:
        """Clusters per head: the label set's ``num_heads`` heads first, then the over-clustering heads."""
        return [self.num_clusters] * self.num_heads + [self.overclustering.num_clusters] * self.overclustering.num_heads


class ExportParams(Section):
    """Stage ``export``: the label set written for data teams."""

    label_head: Annotated[int, Field(ge=0)] | Literal["lowest_loss"] = Field(
        description="head whose labels are the set's `label` column and are scored: an index, or 'lowest_loss', "
        "the head with the lowest SeLa objective (cross-entropy against its own balanced labels)"
    )


class EvaluateParams(Section):
    """Stage ``evaluate``: metrics of the label set and its features, and the visual report."""

    knn_neighbours: PositiveInt = Field(description="k of the weighted kNN on learned features (paper: 50)")
    knn_temperature: PositiveFloat = Field(description="weights exp(cosine / temperature) (paper: 0.1)")
    knn_dimensions: PositiveInt = Field(description="features are randomly projected to this many (paper: 128)")
    holdout_fraction: float = Field(gt=0, lt=1, description="images held out to score the linear probe")
    montage_images: PositiveInt = Field(le=64, description="most and least confident images shown per cluster")


class TransferParams(Section):
    """Stage ``transfer``: a fresh network of another architecture trained on the exported labels."""

    seed: int
    architecture: Literal["small_cnn", "small_resnet", "resnet18"]
    width: PositiveInt
    epochs: PositiveInt
    batch_size: PositiveInt = Field(ge=2, description="at least 2, as train.batch_size: the same train_epoch runs it")
    learning_rate: PositiveFloat
    holdout_fraction: float = Field(gt=0, lt=1, description="images never trained on; agreement is measured there")


class VersionParams(Section):
    """Step ``version``: how published label sets are tagged."""

    tag_prefix: str = Field(pattern=r"^[A-Za-z][A-Za-z0-9_.-]*$")


class Params(Section):
    """The whole ``params.yaml``."""

    shard: ShardParams
    train: TrainParams
    export: ExportParams
    evaluate: EvaluateParams
    transfer: TransferParams
    version: VersionParams

    @model_validator(mode="after")
    def _head_exists(self) -> "Params":
        head = self.export.label_head
        if isinstance(head, int) and head >= self.train.num_heads:
            raise ValueError(f"export.label_head={head} but train.num_heads={self.train.num_heads}")
        return self


def _optional_copy(model: type[Section]) -> type[Section]:
    """The same section with every key optional (None = keep params.yaml's value), bounds and types kept."""
    fields: dict[str, Any] = {}
    for name, info in model.model_fields.items():
        annotation = info.annotation
        if isinstance(annotation, type) and issubclass(annotation, Section):
            annotation = _optional_copy(annotation)
        elif info.metadata:
            annotation = Annotated[annotation, *info.metadata]
        fields[name] = (annotation | None, Field(default=None, description=info.description))
    return create_model(f"{model.__name__}Overrides", __base__=Section, **fields)


# Run-time overrides of params.yaml (Prefect flow parameter): nested like the file, every key optional. Prefect
# publishes its JSON schema, so a bad value is refused when the run is requested, naming the key.
ParamsOverrides = _optional_copy(Params)


class ParamsError(ValueError):
    """params.yaml (or an override) is invalid; the message names every offending key."""


def _describe(error: ValidationError) -> str:
    lines = []
    for item in error.errors():
        key = ".".join(str(part) for part in item["loc"]) or "<root>"
        # A whole section's check already names its values: echoing the section would bury the message.
        echo = item["type"] != "missing" and not isinstance(item["input"], dict)
        lines.append(f"{key}: {item['msg']}" + (f" (got {item['input']!r})" if echo else ""))
    return "; ".join(lines)


def parse_params(raw: dict[str, Any], overrides: BaseModel | dict[str, Any] | None = None) -> Params:
    """Validate a raw mapping after applying ``overrides``: a ``ParamsOverrides``, a nested mapping like
    ``{"train": {"num_clusters": 20}}``, or dotted keys like ``{"train.num_clusters": 20}``."""
    if isinstance(overrides, BaseModel):
        overrides = overrides.model_dump(exclude_none=True)
    merged = _apply_overrides(raw, _dotted(overrides or {}))
    try:
        return Params.model_validate(merged)
    except ValidationError as error:
        raise ParamsError(f"invalid parameters: {_describe(error)}") from None


def load_params(path: str | Path = "params.yaml", overrides: BaseModel | dict[str, Any] | None = None) -> Params:
    """Read and validate ``params.yaml``."""
    text = Path(path).read_text()
    raw = yaml.safe_load(text) or {}
    if not isinstance(raw, dict):
        raise ParamsError(f"{path}: expected a mapping of sections, got {type(raw).__name__}")
    return parse_params(raw, overrides)


def _dotted(overrides: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in overrides.items():
        if isinstance(value, dict):
            flat.update(_dotted(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _apply_overrides(raw: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    merged = yaml.safe_load(yaml.safe_dump(raw))  # deep copy of plain data
    for dotted, value in overrides.items():
        *parents, leaf = dotted.split(".")
        node = merged
        for part in parents:
            if not isinstance(node.get(part), dict):
                raise ParamsError(f"invalid parameters: {dotted}: no such section {part!r}")
            node = node[part]
        if leaf not in node:
            raise ParamsError(f"invalid parameters: {dotted}: unknown key")
        node[leaf] = value
    return merged
