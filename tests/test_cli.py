"""The command line, run as a user runs it (``python -m sepfx`` in a subprocess): help for every
subcommand, compile to ONNX, separate a WAV file, and errors as one line
(``sepfx: error: ...``, exit code 2, no traceback). ``demo`` is too slow to run here (only its
``--help``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from sepfx.data import read_wav, write_wav

ROOT = Path(__file__).resolve().parents[1]


def sepfx_cli(*args, cwd=None, timeout=300) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "sepfx", *map(str, args)],
        cwd=cwd or ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def assert_one_line_error(proc: subprocess.CompletedProcess, *words: str) -> str:
    """Exit code 2 and exactly one stderr line, ``sepfx: error: ...``, naming ``words``."""
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, (proc.returncode, proc.stdout[-2000:], proc.stderr[-2000:])
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("sepfx: error: "), lines[0]
    assert "Traceback" not in proc.stderr + proc.stdout
    for word in words:
        assert word in lines[0], (word, lines[0])
    return lines[0]


def write_mixture(path: Path, samples: int, rate: int = 8000, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(samples) / rate
    audio = 0.3 * np.sin(2 * np.pi * 220 * t) + 0.1 * rng.standard_normal(samples)
    pcm = np.round(audio * 32767).astype(np.int16)
    write_wav(path, pcm, rate)
    return pcm


# --------------------------------------------------------------------------------------------
# help
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "command",
    [[], ["compile"], ["bench"], ["demo"], ["separate"]],
    ids=["top", "compile", "bench", "demo", "separate"],
)
def test_help(command):
    proc = sepfx_cli(*command, "--help")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage: python -m sepfx")
    assert proc.stderr == ""
    if not command:
        for sub in ("compile", "bench", "demo", "separate"):
            assert sub in proc.stdout
    if command == ["compile"]:
        assert "--budget" in proc.stdout and "--out" in proc.stdout
    if command == ["bench"]:
        assert "--budget" in proc.stdout and "--threads" in proc.stdout and "--json" in proc.stdout
    if command == ["separate"]:
        assert "mixture" in proc.stdout and "--out-dir" in proc.stdout


# --------------------------------------------------------------------------------------------
# compile and separate
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """``compile conv_tasnet --config tiny --budget 0.4 --out tmp/x.onnx``, run once."""
    folder = tmp_path_factory.mktemp("cli")
    out = folder / "tmp" / "x.onnx"  # a folder that does not exist yet
    proc = sepfx_cli(
        "compile", "conv_tasnet", "--config", "tiny", "--budget", "0.4", "--out", out, cwd=folder
    )
    return proc, out


def test_compile_writes_onnx_and_prints_report(compiled):
    proc, out = compiled
    assert proc.returncode == 0, proc.stderr
    assert out.is_file() and out.stat().st_size > 1000
    assert "sepfx report: ConvTasNet" in proc.stdout
    assert "budget 40%" in proc.stdout
    assert f"wrote {out}" in proc.stdout
    assert "ONNX Runtime vs PyTorch" in proc.stdout
    assert "Traceback" not in proc.stderr


def test_compile_onnx_runs(compiled):
    _, out = compiled
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).standard_normal((2, 8037)).astype(np.float32)  # dynamic axes
    y = session.run(None, {session.get_inputs()[0].name: x})[0]
    assert y.shape == (2, 2, 8037) and np.isfinite(y).all()


@pytest.mark.parametrize("samples", [8000, 8000 + 37])
def test_separate_round_trip(compiled, tmp_path, samples):
    _, model = compiled
    mixture = tmp_path / "mixture.wav"
    pcm = write_mixture(mixture, samples)
    proc = sepfx_cli("separate", model, mixture)
    assert proc.returncode == 0, proc.stderr
    for i in (1, 2):
        target = tmp_path / f"mixture_s{i}.wav"
        assert target.is_file(), proc.stdout
        assert f"wrote {target}" in proc.stdout
        samples_out, rate = read_wav(target)
        assert rate == 8000
        assert samples_out.shape == pcm.shape
    # --out-dir: written there (created if missing), not next to the input
    out_dir = tmp_path / "separated" / "here"
    proc = sepfx_cli("separate", model, mixture, "--out-dir", out_dir)
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in out_dir.iterdir()) == ["mixture_s1.wav", "mixture_s2.wav"]


def test_bench_prints_and_writes_rows(tmp_path):
    """Two budgets, one length, one thread: a torch and an ORT row each, in the table and JSON."""
    out = tmp_path / "rows" / "bench.json"
    proc = sepfx_cli(
        "bench",
        "conv_tasnet",
        "--config",
        "tiny",
        "--budget",
        "0.6",
        "0.3",
        "--seconds",
        "0.5",
        "--runs",
        "2",
        "--json",
        out,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(out.read_text())
    assert [(r["budget"], r["runtime"]) for r in rows] == [
        (0.6, "torch cpu x1"),
        (0.6, "ort cpu x1"),
        (0.3, "torch cpu x1"),
        (0.3, "ort cpu x1"),
    ]
    for r in rows:
        assert r["dense_ms"] > 0 and r["slim_ms"] > 0
        assert r["macs_ratio"] <= r["budget"] + 1e-9
        assert r["speedup"] == pytest.approx(r["dense_ms"] / r["slim_ms"])
        assert r["speedup_over_mac_ratio"] == pytest.approx(r["speedup"] * r["macs_ratio"])
    table = [line for line in proc.stdout.splitlines() if line.startswith("conv_tasnet")]
    assert len(table) == 4 and all(line.split()[3] in ("torch", "ort") for line in table)
    assert f"wrote {out}" in proc.stdout


# --------------------------------------------------------------------------------------------
# errors: one line, exit code 2
# --------------------------------------------------------------------------------------------


def test_error_unknown_model_name(tmp_path):
    proc = sepfx_cli("compile", "no_such_model", "--out", tmp_path / "x.onnx", cwd=tmp_path)
    assert_one_line_error(proc, "no_such_model", "conv_tasnet")
    assert not (tmp_path / "x.onnx").exists()


def test_demo_gates_choice_is_checked_before_any_work(tmp_path):
    proc = sepfx_cli("demo", "--gates", "random", cwd=tmp_path)
    assert proc.returncode == 2 and "invalid choice: 'random'" in proc.stderr
    from sepfx import demo
    from sepfx.errors import InputError

    with pytest.raises(InputError, match="'magnitude' or 'learned'"):
        demo.run(gates="random", out=str(tmp_path / "x.onnx"), progress=False)
    assert not (tmp_path / "x.onnx").exists()


def test_error_missing_model_file(tmp_path):
    missing = tmp_path / "nowhere" / "model.pt"
    proc = sepfx_cli("compile", missing, "--out", tmp_path / "x.onnx", cwd=tmp_path)
    assert_one_line_error(proc, str(missing))


def test_error_not_a_saved_model(tmp_path):
    bogus = tmp_path / "model.pt"
    bogus.write_text("not a model\n")
    proc = sepfx_cli("compile", bogus, "--out", tmp_path / "x.onnx", cwd=tmp_path)
    assert_one_line_error(proc, str(bogus))


def test_error_unknown_config(tmp_path):
    proc = sepfx_cli("compile", "conv_tasnet", "--config", "huge", cwd=tmp_path)
    assert_one_line_error(proc, "huge", "tiny")


@pytest.mark.parametrize("budget", ["0", "1.5", "-0.2", "nan"])
def test_error_budget_out_of_range(tmp_path, budget):
    proc = sepfx_cli(
        "compile",
        "conv_tasnet",
        "--config",
        "tiny",
        "--budget",
        budget,
        "--out",
        tmp_path / "x.onnx",
        cwd=tmp_path,
    )
    assert_one_line_error(proc, "budget", "(0, 1]")
    assert not (tmp_path / "x.onnx").exists()


def test_error_budget_below_floor(tmp_path):
    proc = sepfx_cli(
        "compile",
        "conv_tasnet",
        "--config",
        "tiny",
        "--budget",
        "0.00001",
        "--out",
        tmp_path / "x.onnx",
        cwd=tmp_path,
    )
    line = assert_one_line_error(proc, "budget", "below")
    # the message names the floor: "use a budget >= 0.08"
    floor = float(line.rsplit(">=", 1)[1].strip().rstrip("."))
    assert 0.00001 < floor < 1
    assert not (tmp_path / "x.onnx").exists()


@pytest.mark.parametrize(
    "args",
    [["--budget", "0.4", "1.5"], ["--seconds", "0"], ["--threads", "0"], ["--runs", "0"]],
    ids=["budget", "seconds", "threads", "runs"],
)
def test_error_bench_bad_arguments(tmp_path, args):
    proc = sepfx_cli("bench", "conv_tasnet", "--config", "tiny", *args, cwd=tmp_path)
    assert_one_line_error(proc, args[0].strip("-").rstrip("s"))


def test_error_ratio_out_of_range(tmp_path):
    proc = sepfx_cli(
        "compile",
        "conv_tasnet",
        "--config",
        "tiny",
        "--ratio",
        "0",
        "--out",
        tmp_path / "x.onnx",
        cwd=tmp_path,
    )
    assert_one_line_error(proc, "ratio")


def test_error_separate_missing_onnx(tmp_path):
    mixture = tmp_path / "mixture.wav"
    write_mixture(mixture, 800)
    missing = tmp_path / "missing.onnx"
    proc = sepfx_cli("separate", missing, mixture)
    assert_one_line_error(proc, "no such file", str(missing))


def test_error_separate_missing_wav(compiled, tmp_path):
    _, model = compiled
    missing = tmp_path / "missing.wav"
    proc = sepfx_cli("separate", model, missing)
    assert_one_line_error(proc, "no such file", str(missing))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("case", ["not_a_wav", "not_an_onnx", "out_is_a_folder"])
def test_error_bad_files(compiled, tmp_path, case):
    _, model = compiled
    mixture = tmp_path / "mixture.wav"
    write_mixture(mixture, 800)
    if case == "not_a_wav":
        bogus = tmp_path / "bogus.wav"
        bogus.write_text("garbage\n")
        proc = sepfx_cli("separate", model, bogus)
    elif case == "not_an_onnx":
        bogus = tmp_path / "bogus.onnx"
        bogus.write_text("garbage\n")
        proc = sepfx_cli("separate", bogus, mixture)
    else:
        proc = sepfx_cli(
            "compile", "conv_tasnet", "--config", "tiny", "--out", tmp_path, cwd=tmp_path
        )
    assert_one_line_error(proc)


class _PerSpeaker(torch.nn.Module):
    """Returns a list of per-speaker [B, T] waveforms, as many published models do."""

    def __init__(self):
        super().__init__()
        self.enc = torch.nn.Conv1d(1, 16, 16, stride=8, padding=4)
        self.mask = torch.nn.Conv1d(16, 32, 1)
        self.dec = torch.nn.ConvTranspose1d(16, 1, 16, stride=8, padding=4)

    def forward(self, wav):
        e = torch.relu(self.enc(wav.unsqueeze(1)))
        masks = torch.sigmoid(self.mask(e)).chunk(2, dim=1)
        return [self.dec(e * m)[:, 0, : wav.shape[-1]] for m in masks]


def test_per_speaker_list_outputs_compile_finetune_export_and_separate(tmp_path):
    """A model returning [speaker 1, speaker 2]: gates learned and fine-tuned on it, one ONNX
    output per speaker, and ``separate`` writes one WAV per speaker."""
    import sepfx

    torch.manual_seed(0)
    model = _PerSpeaker().eval()
    generator = torch.Generator().manual_seed(0)
    sources = torch.randn(2, 2, 8000, generator=generator)
    data = [(sources.sum(1), sources)]
    slim = sepfx.compile(
        model, budget=0.5, data=data, steps=3, progress=False, example_input=torch.randn(1, 8000)
    )
    slim = sepfx.finetune(slim, data, steps=2, progress=False)
    with torch.no_grad():
        x = torch.randn(2, 8037)
        out, dense = slim(x), model(x)
    assert isinstance(out, list) and [o.shape for o in out] == [d.shape for d in dense]
    path = tmp_path / "slim.onnx"
    result = sepfx.export_onnx(slim, path)
    assert result.dynamic_time and all(e <= 1e-4 for e in result.errors.values())
    assert [o.name for o in ort.InferenceSession(str(path)).get_outputs()] == [
        "sources_0",
        "sources_1",
    ]
    mixture = tmp_path / "mixture.wav"
    pcm = write_mixture(mixture, 8037)
    proc = sepfx_cli("separate", path, mixture)
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in tmp_path.glob("mixture_s*.wav")) == [
        "mixture_s1.wav",
        "mixture_s2.wav",
    ]
    assert read_wav(tmp_path / "mixture_s2.wav")[0].shape == (8032,)  # its decoder's length
    assert pcm.shape == (8037,)


def test_error_bench_cuda_without_a_gpu(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    proc = sepfx_cli("bench", "conv_tasnet", "--config", "tiny", "--device", "cuda", cwd=tmp_path)
    assert_one_line_error(proc, "cuda", "no CUDA device")
