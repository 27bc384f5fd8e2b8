"""What every flow does first: resolve the project root and validate params.yaml plus run overrides."""

from pathlib import Path
from typing import Any

from pydantic import BaseModel

from sela.config import Params, ParamsOverrides, load_params


def resolve(root: str, overrides: ParamsOverrides | dict[str, Any] | None) -> tuple[str, Params]:
    """Absolute project root and validated parameters; a bad value fails the run before any work starts."""
    base = Path(root).resolve()
    return str(base), load_params(base / "params.yaml", overrides)


def write_overrides(root: str, overrides: ParamsOverrides | dict[str, Any] | None) -> None:
    """Write validated run overrides into params.yaml, keeping its comments (what ``dvc exp run -S`` does).

    A published version commits params.yaml: it must hold the values the labels were made with, so that the
    version's ``dvc repro`` reproduces it and ``sela labels list`` shows its real parameters.
    """
    from ruamel.yaml import YAML

    resolve(root, overrides)  # validate first: a bad value must leave the file untouched
    if isinstance(overrides, BaseModel):
        overrides = overrides.model_dump(exclude_none=True)
    if not overrides:
        return
    path = Path(root).resolve() / "params.yaml"
    yaml = YAML()  # round-trip mode: comments and key order survive
    document = yaml.load(path)
    _merge(document, overrides)
    with path.open("w") as handle:
        yaml.dump(document, handle)


def _merge(document: Any, overrides: dict[str, Any]) -> None:
    for key, value in overrides.items():
        if isinstance(value, dict):
            _merge(document[key], value)
        else:
            document[key] = value
