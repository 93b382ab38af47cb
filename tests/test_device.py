"""Every entry point on a model whose parameters live on another device (invariant 8).

On the CPU, the other device is ``tests/fake_device.py``'s: tensors that claim ``meta`` but hold
values, and raise where an op meets a tensor made on the CPU, as CUDA does. So a tensor sepfx
makes without the model's device fails here as on a GPU. Tests marked ``cuda`` run the same on
a GPU (``pytest -m cuda``) and are skipped where none is present.
"""

from __future__ import annotations

import copy

import pytest
import torch

import sepfx
from sepfx.__main__ import main
from sepfx.bench import compare

from conftest import build_seeded, max_relative_error, wav
from fake_device import AWAY, Away, DeviceMismatch, another_device

# a whole trace; eager shells with LSTMs; attention. (The fake device cannot run
# F.interpolate, which sudormrf, tdanet and afrcnn call: torch decomposes it for a tensor
# subclass into index tensors made on the value-less meta device. The cuda tests cover them.)
MODELS = ("conv_tasnet", "dprnn", "sepformer")


def _data(batches: int = 2, length: int = 4000):
    g = torch.Generator().manual_seed(5)
    return [
        (torch.randn(1, length, generator=g), torch.randn(1, 2, length, generator=g))
        for _ in range(batches)
    ]


def _state(model: torch.nn.Module, device: torch.device) -> dict[str, torch.Tensor]:
    """The model's parameters and buffers, each asserted to be on ``device``, on the CPU."""
    state = {}
    for name, t in model.state_dict().items():
        assert t.device.type == device.type, f"{name} on {t.device}, not {device}"
        state[name] = t.detach().cpu()
    return state


def _assert_same(expected: dict, got: dict, tolerance: float = 0.0) -> None:
    """Same keep set (same shapes) and the same values."""
    assert expected.keys() == got.keys()
    for name in expected:
        assert expected[name].shape == got[name].shape, name
        error = float((expected[name] - got[name]).abs().max()) if expected[name].numel() else 0.0
        assert error <= tolerance, (name, error)


def _output(model: torch.nn.Module, x: torch.Tensor, device: torch.device) -> torch.Tensor:
    with torch.no_grad():
        out = model(x.to(device))
    out = out[0] if isinstance(out, (list, tuple)) else out
    return out.cpu()


def _entry_points(model: torch.nn.Module, device: torch.device, tmp_path) -> dict:
    """Run every entry point on ``model`` (on ``device``); the slim models' CPU states."""
    data = _data()
    out = {}
    analysis = sepfx.analyze(model)
    assert analysis.example_input.device.type == device.type
    out["compile"] = sepfx.compile(model, budget=0.5, progress=False)
    out["compile data"] = sepfx.compile(model, budget=0.5, data=data, steps=2, progress=False)
    out["compile data device=cpu"] = sepfx.compile(
        model, budget=0.5, data=data, steps=2, device="cpu", progress=False
    )
    pruned = sepfx.prune(model, ratio=0.5)
    out["prune"] = pruned
    out["finetune"] = sepfx.finetune(copy.deepcopy(pruned), data, steps=2, progress=False)
    out["finetune teacher"] = sepfx.finetune(
        copy.deepcopy(pruned), [m for m, _ in data], teacher=model, steps=2, progress=False
    )
    result = sepfx.export_onnx(pruned, tmp_path / "slim.onnx")
    assert max(result.errors.values()) < 1e-4
    return out


def _check_against_cpu(
    name: str, device: torch.device, tmp_path, tolerance: float, trained: float
) -> None:
    """Each entry point's slim model on ``device`` has the CPU path's parameters (within
    ``tolerance``; the same shapes, so the same keep set) and output (relative error within
    1e-4); a fine-tuned one, whose Adam steps may differ by rounding, the same shapes and an
    output within ``trained``."""
    cpu = build_seeded(name)
    x = wav(1, 8000)
    expected = _entry_points(cpu, torch.device("cpu"), tmp_path)
    model = copy.deepcopy(cpu).to(device)
    before = _state(model, device)
    got = _entry_points(model, device, tmp_path)
    _assert_same(before, _state(model, device))  # the caller's model is untouched
    assert not model.training
    for step, slim in got.items():
        example = getattr(slim, "sepfx_example_input", None)  # (a deep copy drops it)
        assert example is None or example.device.type == device.type, step
        finetuned = step.startswith("finetune")
        state = _state(slim, device)
        try:
            _assert_same(
                _state(expected[step], torch.device("cpu")),
                state,
                float("inf") if finetuned else tolerance,
            )
        except AssertionError as e:
            raise AssertionError(step) from e
        error = max_relative_error(
            _output(expected[step], x, torch.device("cpu")), _output(slim, x, device)
        )
        assert error <= (trained if finetuned else 1e-4), (step, error)


@pytest.mark.parametrize("name", MODELS)
def test_every_entry_point_on_another_device(name, tmp_path):
    with another_device():
        # the same CPU kernels, but Adam picks another implementation by device: 1e-8 apart
        _check_against_cpu(name, AWAY, tmp_path, tolerance=1e-6, trained=1e-5)


def test_another_device_catches_a_tensor_made_on_the_cpu():
    """The fake device fails where CUDA would: a CPU input to a model on it."""
    with another_device():
        model = build_seeded("conv_tasnet").to(AWAY)
        assert all(isinstance(p, Away) for p in model.parameters())
        with pytest.raises(DeviceMismatch):
            model(wav(1, 800))
        model(wav(1, 800).to(AWAY))


def test_cli_device(tmp_path, capsys, monkeypatch):
    compiled_on = []
    compile_ = sepfx.compile

    def spy(model, *args, **kwargs):
        compiled_on.append(next(model.parameters()).device)
        return compile_(model, *args, **kwargs)

    monkeypatch.setattr(sepfx, "compile", spy)
    with another_device():
        code = main(
            ["compile", "conv_tasnet", "--config", "tiny", "--device", "meta"]
            + ["--out", str(tmp_path / "slim.onnx")]
        )
    assert code == 0, capsys.readouterr().err
    assert compiled_on == [AWAY]
    assert (tmp_path / "slim.onnx").is_file()


def test_bench_leaves_a_model_on_another_device_there():
    with another_device():
        model = build_seeded("conv_tasnet").to(AWAY)
        rows = compare(model, [0.5], [0.05], [1], runs=1, name="conv_tasnet")
        assert all(isinstance(p, Away) for p in model.parameters())
    assert {r["runtime"] for r in rows} >= {"torch cpu x1", "ort cpu x1"}


# -- on a GPU ------------------------------------------------------------------------------

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


@pytest.fixture(autouse=True)
def _no_tf32():
    """Full float32 on the GPU (cuDNN convolutions use TF32 by default), as on the CPU."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("name", sorted(sepfx.models.ZOO))
def test_every_entry_point_on_cuda(name, tmp_path):
    # float32 kernels round differently on the GPU; TF32 (less precise) is off in these tests
    _check_against_cpu(name, torch.device("cuda"), tmp_path, tolerance=1e-4, trained=1e-2)


@pytest.mark.cuda
@cuda
def test_save_load_cuda(tmp_path):
    model = build_seeded("conv_tasnet").cuda()
    slim = sepfx.compile(model, budget=0.5, progress=False)
    sepfx.save(slim, tmp_path / "slim.pt")
    x = wav(1, 8000)
    for where in ("cuda", "cpu"):
        loaded = sepfx.load(tmp_path / "slim.pt", map_location=where)
        _assert_same(_state(slim, torch.device("cuda")), _state(loaded, torch.device(where)))
        error = max_relative_error(
            _output(slim, x, torch.device("cuda")), _output(loaded, x, torch.device(where))
        )
        assert error <= 1e-4, (where, error)


@pytest.mark.cuda
@cuda
def test_cli_and_bench_cuda(tmp_path, capsys):
    code = main(
        ["compile", "conv_tasnet", "--config", "tiny", "--device", "cuda"]
        + ["--out", str(tmp_path / "slim.onnx")]
    )
    assert code == 0, capsys.readouterr().err
    model = build_seeded("conv_tasnet").cuda()
    rows = compare(model, [0.5], [0.05], [1], runs=2, name="conv_tasnet")
    assert all(p.is_cuda for p in model.parameters())
    assert "torch cuda" in {r["runtime"] for r in rows}
