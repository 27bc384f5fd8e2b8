"""What every flow does first: resolve the project root and validate params.yaml plus run overrides."""

from pathlib import Path
from typing import Any

from sela.config import Params, ParamsOverrides, load_params


def resolve(root: str, overrides: ParamsOverrides | dict[str, Any] | None) -> tuple[str, Params]:
    """Absolute project root and validated parameters; a bad value fails the run before any work starts."""
    base = Path(root).resolve()
    return str(base), load_params(base / "params.yaml", overrides)
