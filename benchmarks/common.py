"""Shared by the benchmark scripts: machine facts and writing results (JSON, Markdown, PNG)."""

from __future__ import annotations

import datetime
import json
import os
import platform
from pathlib import Path

import torch

from sepfx.data import arctic_mixture
from sepfx.losses import si_snr_improvement

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> dict:
    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    try:
        import onnxruntime

        info["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        pass
    return info


def markdown_table(rows: list[dict], columns: list[str]) -> str:
    def cell(v):
        if v is None:
            return ""
        if isinstance(v, float):
            return f"{v:.3g}"
        return str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def write(name: str, payload: dict, table: str, out_dir: Path = RESULTS) -> Path:
    """Write ``name``.json and ``name``.md (machine facts and the table) under ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{name}.json").write_text(json.dumps(payload, indent=2, default=float))
    facts = payload["machine"]
    header = (
        f"# {name}\n\n{facts['date']} · {facts['processor']} · {facts['cpu_count']} cores "
        f"· torch {facts['torch']} · onnxruntime {facts.get('onnxruntime')}"
        + (f" · {facts['cuda']}" if facts.get("cuda") else "")
        + "\n\n"
    )
    (out_dir / f"{name}.md").write_text(header + table + "\n")
    return out_dir / f"{name}.md"


def plot(
    path: Path,
    series: dict[str, tuple[list, list]],
    xlabel: str,
    ylabel: str,
    title: str,
    diagonal: bool = False,
) -> bool:
    """A scatter/line PNG; needs matplotlib (the ``bench`` extra). False if it is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install -e '.[bench]'): no plot written")
        return False
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for label, (x, y) in series.items():
        ax.plot(x, y, marker="o", linestyle="-", label=label)
    if diagonal:
        top = max([max(x) for x, _ in series.values()] + [1.0])
        ax.plot([1, top], [1, top], color="grey", linestyle=":", label="speed-up = MAC ratio")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


@torch.no_grad()
def evaluate(model, dataset, limit: int | None = None) -> float:
    """Mean SI-SNRi (dB) over the first ``limit`` items (mixture[T], sources[S, T]), computed
    on the device of the model's parameters."""
    model.eval()
    device = next(model.parameters()).device
    count = len(dataset) if limit is None else min(limit, len(dataset))
    values = []
    for i in range(count):
        mixture, sources = (x[None].to(device) for x in dataset[i])
        values.append(float(si_snr_improvement(model(mixture), sources, mixture)))
    return sum(values) / len(values)


@torch.no_grad()
def evaluate_arctic(model) -> float:
    """SI-SNRi (dB) on the CMU ARCTIC pair (``sepfx.data.arctic_mixture``)."""
    return evaluate(model, [arctic_mixture()])
