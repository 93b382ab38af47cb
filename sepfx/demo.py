"""The newcomer's demo: the bundled Conv-TasNet and the committed test mixtures, compiled at a
budget, with MACs, params, latency and SI-SNRi before and after. Needs no espeak-ng and no
network: half of the 20 committed mixtures tune the model (and the gates, with
``gates="learned"``), the other half measure. By default the channels of largest weights are
kept (data-free) and the fine-tune is distilled from the dense model: on these 10 short
mixtures that keeps more of the dense quality than learned gates (README, "Distillation")."""

from __future__ import annotations

import os
import tempfile

import numpy as np
import torch

from sepfx.bench import ort_medians
from sepfx import metrics
from sepfx.data import RealVoiceSet, bundled_test_set
from sepfx.losses import si_snr_improvement


def _batches(dataset, indices, batch_size=2):
    items = [dataset[i] for i in indices]
    return [
        (
            torch.stack([m for m, _ in items[i : i + batch_size]]),
            torch.stack([s for _, s in items[i : i + batch_size]]),
        )
        for i in range(0, len(items) - batch_size + 1, batch_size)
    ]


@torch.no_grad()
def si_snri(model, batches) -> float:
    model.eval()
    values = [si_snr_improvement(model(m), s, m) for m, s in batches]
    return float(torch.cat(values).mean())


def run(
    budget: float | None = 0.4,
    steps: int = 100,
    finetune_steps: int = 250,
    out: str = "slim.onnx",
    model_name: str = "conv_tasnet",
    progress: bool = True,
    distill: bool = True,
    gates: str = "magnitude",
    latency: float | None = None,
    target: str = "ort-cpu",
) -> dict:
    """Compile the bundled model at ``budget`` (MACs) and/or ``latency`` (time on ``target``,
    see ``sepfx.compile``), fine-tune it on half of the bundled test mixtures and measure it on
    the other half."""
    import sepfx
    from sepfx.models import build, pretrained, pretrained_names

    if gates not in ("magnitude", "learned"):
        raise sepfx.errors.InputError(f"gates must be 'magnitude' or 'learned', got {gates!r}")
    torch.manual_seed(0)
    notes = []
    if model_name in pretrained_names():
        model = pretrained(model_name)
    else:
        model = build(model_name, "tiny").eval()
        notes.append(
            f"no bundled checkpoint for {model_name}: an untrained tiny model is used, "
            "so SI-SNRi numbers mean nothing"
        )
    dataset = bundled_test_set()
    half = len(dataset) // 2
    tune, held_out = _batches(dataset, range(half)), _batches(dataset, range(half, len(dataset)))
    real_voices = RealVoiceSet(sample_rate=model.sample_rate)
    dense_scores = {
        "bundled": metrics.evaluate(model, held_out, model.sample_rate),
        "real": metrics.evaluate(model, real_voices, model.sample_rate),
    }
    dense_score = dense_scores["bundled"]["si_snri"]
    data = tune if gates == "learned" else None  # without data: magnitude ranking
    slim = sepfx.compile(
        model,
        budget=budget,
        data=data,
        steps=steps,
        progress=progress,
        latency=latency,
        target=target,
    )
    pruned_score = si_snri(slim, held_out)
    slim = sepfx.finetune(
        slim, tune, steps=finetune_steps, progress=progress, teacher=model if distill else None
    )
    tuned_scores = {
        "bundled": metrics.evaluate(slim, held_out, model.sample_rate),
        "real": metrics.evaluate(slim, real_voices, model.sample_rate),
    }
    tuned_score = tuned_scores["bundled"]["si_snri"]
    report = slim.sepfx_report
    export = sepfx.export_onnx(slim, out)
    with tempfile.TemporaryDirectory() as tmp:
        analysis = sepfx.analyze(model)
        dense_path = os.path.join(tmp, "dense.onnx")
        sepfx.export_onnx(analysis.slim(analysis.keep_all()), dense_path)
        x = np.random.default_rng(0).standard_normal((1, 4 * model.sample_rate)).astype(np.float32)
        dense_s, slim_s = ort_medians([dense_path, out], x, threads=1, runs=20)
    return {
        "report": report,
        "export": export,
        "notes": notes,
        "dense_si_snri": dense_score,
        "pruned_si_snri": pruned_score,
        "finetuned_si_snri": tuned_score,
        "distilled": distill,
        "gates": gates,
        "dense_scores": dense_scores,
        "finetuned_scores": tuned_scores,
        "missing_metrics": metrics.missing(),
        "real_voice_mixtures": len(real_voices),
        "dense_latency_ms": 1000 * dense_s,
        "slim_latency_ms": 1000 * slim_s,
        "held_out": len(dataset) - half,
    }


def summary(result: dict) -> str:
    r = result["report"]
    lines = [
        str(r),
        "",
        f"demo: {result['held_out']} held-out bundled mixtures (2 s, 8 kHz); channels kept by "
        + (
            "gates learned on the other 10"
            if result.get("gates") == "learned"
            else "weight magnitude (data-free; --gates learned learns them)"
        ),
        "                 dense       slim",
        f"  MACs (1 s)   {r.dense_macs / 1e6:8.1f}M  {r.macs / 1e6:8.1f}M   "
        f"({100 * r.macs_ratio:.1f}%)",
        f"  params       {r.dense_params / 1e3:8.1f}k  {r.params / 1e3:8.1f}k",
        f"  latency 4 s  {result['dense_latency_ms']:8.1f}ms {result['slim_latency_ms']:8.1f}ms "
        f"(ONNX Runtime, 1 CPU thread, median; speed-up "
        f"{result['dense_latency_ms'] / result['slim_latency_ms']:.2f}x)",
        f"  SI-SNRi right after pruning, before fine-tuning: {result['pruned_si_snri']:.2f} dB",
    ]
    units = {"si_snri": "dB", "sdri": "dB", "stoi": "", "pesq": ""}
    for key, title in (
        ("bundled", f"{result['held_out']} held-out bundled mixtures"),
        (
            "real",
            f"{result.get('real_voice_mixtures')} real-voice mixtures (sepfx.data.RealVoiceSet)",
        ),
    ):
        dense, tuned = result["dense_scores"][key], result["finetuned_scores"][key]
        lines.append(
            f"  {title}: dense -> slim, pruned and fine-tuned"
            + (" (distilled from the dense model)" if result.get("distilled") else "")
        )
        for name, value in dense.items():
            # a share of a dense score near 0 dB says nothing
            meaningful = value > (1.0 if units[name] == "dB" else 0.0)
            kept = f" ({100 * tuned[name] / value:.0f}% of dense)" if meaningful else ""
            lines.append(
                f"    {name:8s} {value:7.2f} {units[name]:2s} -> {tuned[name]:7.2f} {units[name]}{kept}"
            )
    if result["missing_metrics"]:
        lines.append(
            f"  ({', '.join(result['missing_metrics'])} not measured: pip install -e '.[metrics]')"
        )
    lines.append(f"wrote {result['export'].path}")
    lines += [f"note: {n}" for n in result["notes"]]
    return "\n".join(lines)
