"""sepfx.bench's GPU timing (``cuda_medians``, ``cuda_kernel_profile``, ``compare(device=
"cuda")``): what runs on the CPU is checked everywhere; the tests marked ``cuda`` need a GPU
(``python -m pytest -m cuda``) and are skipped without one."""

from __future__ import annotations

import copy

import pytest
import torch

import sepfx
from sepfx import bench
from sepfx.errors import InputError
from sepfx.models import build


def needs_gpu(test):
    """Marked ``cuda`` (``pytest -m cuda`` selects it) and skipped where no GPU is present."""
    skip = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
    return pytest.mark.cuda(skip(test))


@pytest.fixture(scope="module")
def dense_and_slim():
    torch.manual_seed(0)
    dense = build("conv_tasnet", "tiny").eval()
    return dense, sepfx.compile(dense, budget=0.4, progress=False)


def _state(model):
    return {k: (v.device, v.dtype, v.clone()) for k, v in model.state_dict().items()}


def _same_state(model, state) -> bool:
    now = model.state_dict()
    return now.keys() == state.keys() and all(
        now[k].device == d and now[k].dtype == t and torch.equal(now[k], v)
        for k, (d, t, v) in state.items()
    )


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_cuda_medians_times_copies_on_the_cpu(dense_and_slim, precision):
    dense, slim = dense_and_slim
    before = [_state(dense), _state(slim)]
    benchmark = torch.backends.cudnn.benchmark
    times = bench.cuda_medians(
        [dense, slim], torch.randn(1, 800), 2, precision=precision, device="cpu"
    )
    assert len(times) == 2 and all(t > 0 for t in times)
    # the caller's models keep their device, dtype and values (the copies were cast)
    assert _same_state(dense, before[0]) and _same_state(slim, before[1])
    assert torch.backends.cudnn.benchmark == benchmark  # set for the timing only


def test_cuda_medians_refuses_what_it_cannot_do(dense_and_slim):
    dense, _ = dense_and_slim
    x = torch.randn(1, 800)
    with pytest.raises(InputError, match="precision"):
        bench.cuda_medians([dense], x, 2, precision="fp8", device="cpu")
    with pytest.raises(InputError, match="graphs"):
        bench.cuda_medians([dense], x, 2, graphs=True, device="cpu")
    with pytest.raises(InputError, match="runs"):
        bench.cuda_medians([dense], x, 0, device="cpu")
    if not torch.cuda.is_available():
        with pytest.raises(InputError, match="no CUDA device"):
            bench.cuda_medians([dense], x, 2)


def test_kernel_profile_on_the_cpu_counts_operators(dense_and_slim):
    dense, slim = dense_and_slim
    x = torch.randn(2, 800)
    profiles = [bench.cuda_kernel_profile(m, x, runs=2) for m in (dense, slim)]
    for profile in profiles:
        assert profile["device"] == "cpu" and profile["runs"] == 2
        kernels = profile["kernels"]
        assert kernels and all(k["ms"] > 0 and k["launches"] > 0 for k in kernels)
        assert [k["ms"] for k in kernels] == sorted((k["ms"] for k in kernels), reverse=True)
        assert profile["ms"] == pytest.approx(sum(k["ms"] for k in kernels))
        # one encoder, one decoder: the per-run launch count of the convolutions is whole
        convolutions = [k for k in kernels if k["kernel"] == "aten::convolution"]
        assert convolutions and float(convolutions[0]["launches"]).is_integer()


def test_compare_refuses_cuda_without_a_gpu(dense_and_slim):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(InputError, match="no CUDA device"):
        bench.compare(dense_and_slim[0], [0.4], [0.1], [1], runs=1, device="cuda")
    with pytest.raises(InputError, match="device"):
        bench.compare(dense_and_slim[0], [0.4], [0.1], [1], runs=1, device="tpu")


@needs_gpu
@pytest.mark.parametrize("graphs", [False, True], ids=["eager", "graph"])
@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_cuda_medians_on_a_gpu(dense_and_slim, graphs, precision):
    dense, slim = dense_and_slim
    before = [_state(dense), _state(slim)]
    benchmark = torch.backends.cudnn.benchmark
    times = bench.cuda_medians([dense, slim], torch.randn(4, 8000), 5, graphs, precision)
    assert len(times) == 2 and all(0 < t < 1 for t in times)
    assert _same_state(dense, before[0]) and _same_state(slim, before[1])
    assert torch.backends.cudnn.benchmark == benchmark  # restored


@needs_gpu
@pytest.mark.parametrize("which", [0, 1], ids=["dense", "slim"])
def test_graph_replay_computes_what_the_model_computes(dense_and_slim, which):
    model = copy.deepcopy(dense_and_slim[which]).cuda()
    x = torch.randn(2, 8000, device="cuda")
    with torch.inference_mode():
        expected = model(x).clone()
        replay = bench._runner(model, x, graphs=True)
        x.mul_(0.5)  # a new input written into the static buffer is what the replay reads
        halved = model(x).clone()
        out = replay()
        torch.cuda.synchronize()
    assert torch.allclose(out, halved, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(out, expected, atol=1e-5, rtol=1e-4)


@needs_gpu
def test_kernel_profile_on_a_gpu(dense_and_slim):
    dense, slim = dense_and_slim
    x = torch.randn(2, 8000, device="cuda")
    profiles = [bench.cuda_kernel_profile(m, x, runs=3) for m in (dense, slim)]
    for profile in profiles:
        assert profile["device"] == "cuda" and profile["kernels"] and profile["ms"] > 0
        assert all(not k["kernel"].startswith("aten::") for k in profile["kernels"])
    assert next(dense.parameters()).device.type == "cpu"  # profiled a copy


@needs_gpu
def test_compare_on_a_gpu_rows():
    torch.manual_seed(0)
    rows = bench.compare(build("conv_tasnet", "tiny").eval(), [0.4], [0.5], [1], 5, device="cuda")
    assert [r["runtime"] for r in rows] == ["cuda", "graph"]
    for r in rows:
        assert list(r) == bench.COLUMNS and r["dense_ms"] > 0 and r["slim_ms"] > 0
        assert 0.38 <= r["macs_ratio"] <= 0.4
