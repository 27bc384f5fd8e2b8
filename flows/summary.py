"""Print what the last run produced: where the label set is, its version tag, its quality, where the UI is."""

import json
import os
from pathlib import Path

from sela.paths import CARD, EVALUATION, LABELS, METRICS, REPORT_DIR, TRANSFER_METRICS
from sela.registry.publish import latest_version


def main(root: Path = Path(".")) -> None:
    root = root.resolve()
    params_prefix = json.loads((root / CARD).read_text())["params"]["version"]["tag_prefix"]
    metrics = json.loads((root / METRICS).read_text())
    tag = latest_version(root, params_prefix)
    print(f"label set : {root / LABELS}")
    print(f"card      : {root / CARD}")
    print(f"version   : {tag or 'not published'}")
    quality = [f"{name} {value:.4f}" if isinstance(value, float) else f"{name} {value}"
               for name, value in sorted(metrics.items())]
    print("quality   : " + ", ".join(quality))
    for name, path in (("evaluation", EVALUATION), ("transfer", TRANSFER_METRICS)):
        if (root / path).exists():
            values = json.loads((root / path).read_text())
            shown = [f"{key} {value:.4f}" for key, value in sorted(values.items()) if isinstance(value, float)]
            print(f"{name:<10}: " + ", ".join(shown))
    print(f"report    : {root / REPORT_DIR / 'report.html'}")
    if tag:
        print(f"pull it   : .venv/bin/sela labels pull {root} --version {tag} -o labels.parquet")
        print(f"   or     : dvc get {root} {LABELS} --rev {tag} -o labels.parquet")
    ui = os.environ.get("PREFECT_API_URL", "http://127.0.0.1:4200/api").removesuffix("/api")
    print(f"Prefect UI: {ui} (flow runs, the train task's log of every epoch and relabel, progress and artifacts)")


if __name__ == "__main__":
    main()
