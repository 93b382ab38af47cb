"""The benchmark scripts' smoke runs: each writes its JSON and Markdown table (and a PNG when
matplotlib is installed) with the rows and columns it promises and sane numbers.

Each script runs as a subprocess, as a user runs it; about 65 s in all on one core, so the smoke
runs are marked ``slow`` (``python -m pytest -m slow`` runs them).
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sepfx import bench

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "benchmarks"
HAVE_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None


def run_script(
    name: str, out: Path, *extra: str, timeout: int = 300
) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, str(BENCHMARKS / name), "--smoke", "--out", str(out), *extra],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, f"{name} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def load_results(out: Path, name: str) -> tuple[dict, list[str], list[list[str]]]:
    """The JSON payload, and the Markdown table's header and body rows (cells stripped)."""
    for suffix in ("json", "md"):
        assert (out / f"{name}.{suffix}").is_file(), f"{name}.{suffix} not written"
    payload = json.loads((out / f"{name}.json").read_text())
    assert {"machine", "rows"} <= set(payload)
    assert payload["machine"]["torch"] and payload["machine"]["cpu_count"] >= 1
    lines = [line for line in (out / f"{name}.md").read_text().splitlines() if line.startswith("|")]
    assert len(lines) >= 3, "no Markdown table"
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert set(lines[1].replace("|", "").replace("-", "")) <= {" ", ""}, "no separator row"
    body = [[c.strip() for c in line.strip("|").split("|")] for line in lines[2:]]
    assert all(len(row) == len(header) for row in body)
    assert len(body) == len(payload["rows"]), "table and JSON disagree on the rows"
    return payload, header, body


def check_plot(out: Path, name: str) -> None:
    png = out / f"{name}.png"
    if HAVE_MATPLOTLIB:
        assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert png.stat().st_size > 1000


def finite(*values) -> bool:
    return all(isinstance(v, (int, float)) and math.isfinite(v) for v in values)


@pytest.mark.slow
def test_latency_smoke(tmp_path):
    run_script("latency.py", tmp_path)
    payload, header, _ = load_results(tmp_path, "latency_smoke")
    assert header == [
        "model",
        "budget",
        "seconds",
        "runtime",
        "dense_ms",
        "slim_ms",
        "macs_ratio",
        "speedup",
        "speedup_over_mac_ratio",
    ]
    rows = payload["rows"]
    assert {r["runtime"] for r in rows} >= {"torch cpu x1", "ort cpu x1"}
    for r in rows:
        assert r["model"] == "conv_tasnet" and r["budget"] == 0.4 and r["seconds"] == 1
        assert r["dense_ms"] > 0 and r["slim_ms"] > 0, r
        assert 0.38 <= r["macs_ratio"] <= 0.4, r  # the budget: [b - 0.02, b]
        assert r["speedup"] > 0 and r["speedup_over_mac_ratio"] > 0, r
        assert r["speedup"] == pytest.approx(r["dense_ms"] / r["slim_ms"], rel=1e-6)
        assert r["speedup_over_mac_ratio"] == pytest.approx(
            r["speedup"] * r["macs_ratio"], rel=1e-6
        )
    check_plot(tmp_path, "latency_smoke")


def test_ort_profile_smoke(tmp_path):  # ~10 s: CI runs this one
    run_script("ort_profile.py", tmp_path)
    payload = json.loads((tmp_path / "ort_profile_smoke.json").read_text())
    table = (tmp_path / "ort_profile_smoke.md").read_text()
    assert "| seconds | kind | nodes | dense_ms |" in table and "| multiple |" in table
    summary, rows = payload["summary"], payload["rows"]
    assert [(r["allocation"], r["multiple"]) for r in summary] == [
        ("uniform", 8),
        ("uniform", 1),
        ("latency", 8),
        ("latency", 1),
    ]
    for r in summary:
        assert 0.38 <= r["macs_ratio"] <= 0.4 and r["dense_ms"] > 0 and r["slim_ms"] > 0, r
        assert r["speedup"] == pytest.approx(r["dense_ms"] / r["slim_ms"], rel=1e-6)
    for allocation in ("latency", "uniform"):
        kinds = {r["kind"]: r for r in rows if r["allocation"] == allocation}
        assert {"run", "between kernels", "pointwise conv", "depthwise conv", "norm"} <= set(kinds)
        run = kinds.pop("run")
        assert run["dense_share"] == 1 and run["nodes"] == sum(r["nodes"] for r in kinds.values())
        for side in ("dense_ms", "slim_ms"):  # the kinds (and the gaps) add up to the run
            assert sum(r[side] for r in kinds.values()) == pytest.approx(run[side], rel=1e-6)
        assert all(r["dense_ms"] >= 0 and r["slim_ms"] >= 0 for r in kinds.values())
        # every pointwise conv is cut on both sides or one: its MACs fall at least as a side's
        pointwise, depthwise = kinds["pointwise conv"], kinds["depthwise conv"]
        assert 0 < pointwise["macs_ratio"] <= depthwise["macs_ratio"] < 1
    pointwise = payload["pointwise"]
    assert [(r["out_channels"], r["in_channels"]) for r in pointwise] == [
        (16, 32),
        (32, 16),
        (15, 31),
        (31, 15),
    ]
    for r in pointwise:
        macs = r["out_channels"] * r["in_channels"] * r["frames"]
        assert r["us"] > 0 and r["ps_per_mac"] == pytest.approx(1e6 * r["us"] / macs), r


def test_profile_node_kinds_and_macs():
    def node(op, inputs, output):
        return {
            "op_name": op,
            "input_type_shape": [{"float": s} for s in inputs],
            "output_type_shape": [{"float": output}],
        }

    kind = bench._node_kind_and_macs
    assert kind(node("Conv", [[2, 64, 100], [128, 64, 1]], [2, 128, 100])) == (
        "pointwise conv",
        2 * 100 * 128 * 64,
    )
    assert kind(node("FusedConv", [[1, 128, 100], [128, 1, 3]], [1, 128, 98])) == (
        "depthwise conv",
        98 * 128 * 3,
    )
    assert kind(node("Conv", [[1, 1, 800], [64, 1, 16]], [1, 64, 99])) == ("conv", 99 * 64 * 16)
    assert kind(node("MatMul", [[2, 10, 32], [32, 48]], [2, 10, 48])) == ("matmul", 960 * 32)
    assert kind(node("InstanceNormalization", [[1, 1, 10]], [1, 1, 10])) == ("norm", 0)
    assert kind(node("Reshape", [[1, 10]], [10])) == ("shape and layout", 0)
    assert kind(node("SomethingNew", [[1]], [1])) == ("other", 0)


@pytest.mark.slow
def test_compile_time_smoke(tmp_path):
    run_script("compile_time.py", tmp_path)
    payload, header, _ = load_results(tmp_path, "compile_time_smoke")
    assert header[:3] == ["model", "tool", "ok"] and "total_s" in header and "error" in header
    rows = {r["tool"]: r for r in payload["rows"]}
    assert set(rows) == {"sepfx", "torch-pruning"}
    sepfx_row = rows["sepfx"]
    assert sepfx_row["ok"] is True, sepfx_row
    assert sepfx_row["total_s"] > 0 and sepfx_row["analyze_s"] > 0 and sepfx_row["slim_s"] > 0
    assert sepfx_row["total_s"] >= sepfx_row["analyze_s"]
    assert sepfx_row["groups"] > 0
    for r in payload["rows"]:
        assert r["model"] == "conv_tasnet"
        assert r["peak_rss_mb"] > 0 and r["peak_rss_mb"] >= r["rss_before_mb"] > 0
        if r["ok"]:
            assert r["total_s"] > 0 and r["groups"] > 0
        else:
            assert r["error"]
    check_plot(tmp_path, "compile_time_smoke")


QUALITY_METHODS = [
    "sepfx-learned",
    "sepfx-magnitude",
    "sepfx-latency",
    "tp-magnitude",
    "tp-taylor",
    "tp-random",
    "sepfx-scratch",
]
AFTER = [
    f"{prefix}{m}_after_ft" for prefix in ("", "real_") for m in ("si_snri", "sdri", "stoi", "pesq")
]


def markdown_tables(path: Path) -> list[tuple[list[str], list[list[str]]]]:
    """Every Markdown table of a file: (header, body rows), cells stripped."""
    tables, block = [], []
    for line in path.read_text().splitlines() + [""]:
        if line.startswith("|"):
            block.append([c.strip() for c in line.strip("|").split("|")])
        elif block:
            tables.append((block[0], block[2:]))
            block = []
    return tables


@pytest.fixture(scope="module")
def quality_smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("quality")
    proc = run_script("quality.py", out)
    return out, proc


@pytest.mark.slow
def test_quality_smoke_files(quality_smoke):
    out, proc = quality_smoke
    payload = json.loads((out / "quality_smoke.json").read_text())
    assert payload["settings"]["smoke"] is True and payload["complete"] is True
    assert payload["settings"]["seeds"] == [0, 1]
    assert payload["settings"]["finetunes"] == ["clean", "distill"]
    (summary_header, summary_body), (header, body) = markdown_tables(out / "quality_smoke.md")
    assert summary_header[:6] == ["model", "budget", "method", "finetune", "seeds", "macs_ratio"]
    assert set(AFTER) <= set(summary_header) and set(AFTER) <= set(header)
    assert header[:5] == ["model", "budget", "method", "finetune", "seed"]
    assert len(body) == len(payload["rows"]) and len(summary_body) == len(payload["summary"])
    assert (
        "wrote" in proc.stdout
        and "Learned gates vs magnitude" in proc.stdout + (out / "quality_smoke.md").read_text()
    )
    check_plot(out, "quality_smoke")
    assert {row[2] for row in body} >= set(QUALITY_METHODS) | {"dense"}


@pytest.mark.slow
def test_quality_smoke_rows(quality_smoke):
    out, _ = quality_smoke
    payload = json.loads((out / "quality_smoke.json").read_text())
    rows, summary = payload["rows"], payload["summary"]
    dense = [r for r in rows if r["method"] == "dense"]
    assert len(dense) == 1
    dense = dense[0]
    assert dense["macs_ratio"] == 1.0 and dense["params"] > 0
    assert finite(*(dense[k] for k in AFTER)), dense
    assert dense["si_snri_after_ft"] == dense["si_snri_before_ft"]
    pruned = [r for r in rows if r["method"] != "dense"]
    assert {r["budget"] for r in pruned} == {0.4}
    # every method, seed and fine-tuning mode once
    assert sorted((r["method"], r["seed"], r["finetune"]) for r in pruned) == sorted(
        (m, s, f) for m in QUALITY_METHODS for s in (0, 1) for f in ("clean", "distill")
    )
    for seed in (0, 1):
        by_method = {r["method"]: r for r in pruned if r["seed"] == seed}
        learned = by_method["sepfx-learned"]
        for method, r in by_method.items():
            assert not r.get("error"), f"{method} seed {seed}: {r.get('error')}"
            assert 0 < r["macs_ratio"] <= 1 and 0 < r["params"] < dense["params"], r
            assert finite(
                r["si_snri_before_ft"], r["real_si_snri_before_ft"], *(r[k] for k in AFTER)
            )
            assert 0 <= r["stoi_after_ft"] <= 1 and 0 <= r["real_stoi_after_ft"] <= 1, r
            assert r["time_s"] > 0 and r["finetune_s"] > 0, r
            assert r["recovered"] is None  # the untrained dense model's SI-SNRi is negative
        assert learned["macs_ratio"] <= 0.4 + 1e-9
        assert by_method["sepfx-magnitude"]["macs_ratio"] <= 0.4 + 1e-9
        assert by_method["sepfx-scratch"]["macs_ratio"] == learned["macs_ratio"]
        for method in ("tp-magnitude", "tp-taylor", "tp-random"):
            r = by_method[method]
            assert 0 < r["tp_pruning_ratio"] < 1
            assert abs(r["macs_ratio"] - learned["macs_ratio"]) <= 0.01 + 1e-9, r
    # the summary is the mean and sample std of the seeds' rows
    for entry in summary:
        if entry["method"] == "dense":
            continue
        members = [
            r
            for r in pruned
            if (r["method"], r["finetune"]) == (entry["method"], entry["finetune"])
        ]
        assert entry["seeds"] == len(members) == 2
        for key in AFTER:
            values = [r[key] for r in members]
            assert entry[key] == pytest.approx(sum(values) / 2)
            assert entry[f"{key}_std"] == pytest.approx(abs(values[0] - values[1]) / 2**0.5)


def _quality_module():
    sys.path.insert(0, str(BENCHMARKS))
    try:
        import quality
    finally:
        sys.path.remove(str(BENCHMARKS))
    return quality


def test_quality_markdown_marks_failures():
    """A failed method's row keeps its place in both tables, with the error instead of numbers
    (checked on the table writer alone: the smoke run has no failure)."""
    quality = _quality_module()
    rows = [
        {"model": "m", "budget": 0.4, "method": "tp-taylor", "finetune": "clean", "seed": 0,
         "error": "IndexError: boom", "time_s": 0.1},
        {"model": "m", "budget": 0.4, "method": "sepfx-learned", "finetune": "clean", "seed": 0,
         "macs_ratio": 0.39, "params": 10, "si_snri_before_ft": 1.0, "si_snri_after_ft": 2.0,
         "recovered": None, "time_s": 1.0},
    ]  # fmt: skip
    table = quality._table(rows)
    assert table.count("failed: IndexError: boom") == 2  # summary and every-run tables
    assert "None" not in table


def test_quality_comparison_needs_a_difference_beyond_the_spread():
    quality = _quality_module()

    def rows(method, values):
        return [
            {"model": "m", "budget": 0.4, "method": method, "finetune": "clean", "seed": i,
             "macs_ratio": 0.4, "si_snri_after_ft": v}
            for i, v in enumerate(values)
        ]  # fmt: skip

    # means 5 and 4, stds 1 and 0: a difference of 1 is not beyond a spread of 1
    close = quality.comparisons(quality.summarise(rows("sepfx-learned", [4, 5, 6]) + rows(
        "sepfx-magnitude", [4, 4, 4])))  # fmt: skip
    assert close == [
        "- m 0.4 (clean): learned - magnitude = +1.00 dB (spread 1.00: within the spread)"
    ]
    far = quality.comparisons(quality.summarise(rows("sepfx-learned", [6, 7, 8]) + rows(
        "sepfx-magnitude", [4, 4.5, 5])))  # fmt: skip
    assert far == ["- m 0.4 (clean): learned - magnitude = +2.50 dB (spread 1.50: learned better)"]
    one = quality.comparisons(quality.summarise(rows("sepfx-learned", [6]) + rows(
        "sepfx-magnitude", [4])))  # fmt: skip
    assert "one seed" in one[0]


def test_quality_refuses_matched_methods_without_learned(tmp_path):
    """Torch-Pruning and scratch match sepfx-learned's MACs: asked for alone, the script says
    so before any work instead of silently running nothing."""
    proc = subprocess.run(
        [sys.executable, str(BENCHMARKS / "quality.py"), "--smoke", "--out", str(tmp_path)]
        + ["--methods", "sepfx-magnitude", "tp-random"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and "tp-random match sepfx-learned" in proc.stderr, proc.stderr
    assert not list(tmp_path.iterdir())


def test_latency_cuda_dry_run(tmp_path):  # ~10 s on one core: the whole GPU script on the CPU
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, str(BENCHMARKS / "latency_cuda.py"), str(tmp_path), "--dry-run"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    payload = json.loads((tmp_path / "latency_cuda.json").read_text())
    # the Markdown: the rows' table, a blank line, then the kernel profile's table
    text = (tmp_path / "latency_cuda.md").read_text()
    tables = [
        [[c.strip() for c in line.strip("|").split("|")] for line in block.splitlines()]
        for block in text.split("\n\n")
        if block.startswith("|")
    ]
    assert len(tables) == 2, text
    header, body = tables[0][0], tables[0][2:]
    assert len(body) == len(payload["rows"]) and all(len(row) == len(header) for row in body)
    assert tables[1][0] == ["kernel", "dense_launches", "slim_launches", "dense_ms", "slim_ms"]
    assert payload["dry_run"] is True and payload["not_reached"] == []
    assert {"gpu", "driver", "torch_cuda", "cudnn"} <= set(payload["machine"])
    rows = payload["rows"]
    # sepfx bench's columns, then the GPU grid's; every cell of the dry-run grid once
    for r in rows:
        assert list(r)[: len(bench.COLUMNS)] == bench.COLUMNS
        assert {"batch", "config", "precision", "tp_ms", "dry_run"} <= set(r) and r["dry_run"]
    cells = {(r["model"], r["batch"], r["precision"], r["runtime"]) for r in rows}
    assert len(cells) == len(rows) == 2 * 2 * 2 * 2
    assert {r["runtime"] for r in rows} == {"cuda", "graph"}
    for r in rows:
        assert r["config"] == "tiny" and r["budget"] == 0.4 and r["seconds"] == 0.25
        assert 0.38 <= r["macs_ratio"] <= 0.4, r
        if r["runtime"] == "graph":  # no CUDA graph on a CPU: said, not faked
            assert r["dense_ms"] is None and "need a GPU" in r["note"]
            continue
        assert r["dense_ms"] > 0 and r["slim_ms"] > 0, r
        assert r["speedup"] == pytest.approx(r["dense_ms"] / r["slim_ms"], rel=1e-6)
        assert r["speedup_over_mac_ratio"] == pytest.approx(r["speedup"] * r["macs_ratio"])
    assert header[:7] == ["model", "config", "budget", "batch", "seconds", "precision", "runtime"]
    assert "DRY RUN" in text
    profile = payload["kernel_profile"]
    assert profile["model"] == "conv_tasnet" and profile["budget"] == 0.4
    for side in ("dense", "slim"):
        assert profile[side]["kernels"] and profile[side]["ms"] > 0
    check_plot(tmp_path, "latency_cuda")


def test_latency_budget_smoke(tmp_path):  # ~15 s: CI runs this one
    run_script("latency_budget.py", tmp_path)
    payload, header, body = load_results(tmp_path, "latency_budget_smoke")
    assert {"model", "requested", "measured", "within_5pct", "compile_s"} <= set(header)
    (row,) = payload["rows"]
    assert row["requested"] == 0.6
    assert row["compile_measured"] <= 0.6  # the compile's own timing met the request
    assert 0 < row["measured"] < 1.0  # timed apart: noisy, but the slim model is faster
    assert len(row["measured_rounds"]) == 2
    assert 0 < row["macs_ratio"] < 1 and finite(row["dense_ms"], row["slim_ms"])
    assert row["timed_keep_sets"] > 0
    assert row["cached_compile_s"] < row["compile_s"]  # nothing timed the second time
