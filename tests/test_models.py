"""Tests of the model zoo (sepfx.models): shapes, determinism, gradients, fx-traceability."""

from __future__ import annotations

import pytest
import torch
import torch.fx
import torch.nn as nn
from torch.utils._pytree import tree_flatten

from sepfx.models import CONFIGS, PAPER_PARAMS, ZOO, build
from sepfx.models.layers import PadToMultiple

NAMES = sorted(ZOO)
LENGTHS = (8000, 8000 + 37)  # 1 s at 8 kHz, and a length that is a multiple of no stride

# Parameters that must stay without gradient: the last TCN block's residual conv of
# Conv-TasNet (tiny: R=1, X=3 -> blocks 0..2) is a dead branch, as in the reference.
UNUSED_PARAMS = {
    "conv_tasnet": {"separator.blocks.2.res_conv.weight", "separator.blocks.2.res_conv.bias"},
}

# Sub-modules that hold one of the deliberate "wild" (non-fx-traceable) patterns,
# on top of the roots and PadToMultiple: TDANet's input norm uses len(x.shape).
UNTRACEABLE_SUBMODULES = {
    "tdanet": {"norm"},
}

# Roots without any wild pattern: the whole model must trace.
TRACEABLE_ROOTS = ("dprnn", "sudormrf", "sepformer", "afrcnn")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Small models on a shared CPU: intra-op threads only add contention (an LSTM
    # step can be 100x slower when a second thread waits on a busy core).
    n_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n_threads)


def _seeded_model(name: str, config: str = "tiny", **overrides) -> nn.Module:
    torch.manual_seed(0)
    return build(name, config, **overrides)


def _wav(batch: int, length: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, length, generator=g)


@pytest.fixture(scope="module", params=NAMES)
def tiny_model(request):
    return request.param, _seeded_model(request.param).eval()


def test_zoo_and_configs_are_consistent():
    assert set(NAMES) == {"conv_tasnet", "dprnn", "sudormrf", "tdanet", "sepformer", "afrcnn"}
    assert set(CONFIGS) == set(ZOO)
    for name in NAMES:
        assert {"tiny", "small"} <= set(CONFIGS[name])


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("length", LENGTHS)
def test_output_shape_and_finite(tiny_model, batch, length):
    name, model = tiny_model
    assert model.sample_rate == 8000
    assert model.n_src == 2
    with torch.no_grad():
        out = model(_wav(batch, length))
    assert out.shape == (batch, 2, length)
    assert out.dtype == torch.float32
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", NAMES)
def test_n_src_override(name):
    model = _seeded_model(name, n_src=3).eval()
    assert model.n_src == 3
    with torch.no_grad():
        out = model(_wav(1, LENGTHS[1]))
    assert out.shape == (1, 3, LENGTHS[1])


def test_conv_tasnet_accepts_1d_input():
    model = _seeded_model("conv_tasnet").eval()
    with torch.no_grad():
        out = model(_wav(1, LENGTHS[1])[0])
    assert out.shape == (1, 2, LENGTHS[1])


@pytest.mark.parametrize("name", NAMES)
def test_deterministic_with_fixed_seed(name):
    wav = _wav(2, LENGTHS[1])
    outs = []
    for _ in range(2):
        model = _seeded_model(name).eval()
        with torch.no_grad():
            outs.append(model(wav))
    assert torch.equal(outs[0], outs[1])


@pytest.mark.parametrize("name", NAMES)
def test_gradients_reach_every_parameter(name):
    model = _seeded_model(name).train()
    out = model(_wav(2, LENGTHS[1]))
    out.square().mean().backward()
    unused = UNUSED_PARAMS.get(name, set())
    params = dict(model.named_parameters())
    assert unused <= set(params), f"unknown names in UNUSED_PARAMS: {unused - set(params)}"
    for pname, p in params.items():
        if pname in unused:
            assert p.grad is None, f"{name}: {pname} was expected to be a dead branch"
        else:
            assert p.grad is not None, f"{name}: no gradient for {pname}"
            assert torch.isfinite(p.grad).all(), f"{name}: non-finite gradient for {pname}"
            assert p.grad.abs().sum() > 0, f"{name}: zero gradient for {pname}"


@pytest.mark.parametrize("name", NAMES)
def test_tiny_channel_counts(name):
    model = build(name, "tiny")
    for mod in model.modules():
        if isinstance(mod, (nn.Conv1d, nn.ConvTranspose1d)):
            sizes = [mod.in_channels, mod.out_channels]
        elif isinstance(mod, nn.Linear):
            sizes = [mod.in_features, mod.out_features]
        elif isinstance(mod, nn.LSTM):
            sizes = [mod.input_size, mod.hidden_size]
        elif isinstance(mod, nn.MultiheadAttention):
            sizes = [mod.embed_dim]
        else:
            continue
        assert max(sizes) <= 64, f"{name}: {mod} is too wide for the tiny config"


@pytest.mark.parametrize("name", NAMES)
def test_small_config_size(name):
    n_params = sum(p.numel() for p in build(name, "small").parameters())
    assert 250_000 <= n_params <= 1_000_000, n_params


@pytest.mark.parametrize("name", NAMES)
def test_paper_config_matches_the_published_parameter_count(name):
    # parameters on the meta device: no memory, no initialisation (Sepformer's is 26 M)
    with torch.device("meta"):
        model = build(name, "paper")
    n_params = sum(p.numel() for p in model.parameters())
    published, tolerance = PAPER_PARAMS[name]
    assert abs(n_params / 1e6 - published) <= tolerance * published, (name, n_params)


def test_paper_config_runs():
    # the smallest paper config runs on a real input (the others are built on meta above)
    torch.manual_seed(0)
    model = build("dprnn", "paper").eval()
    with torch.inference_mode():
        out = model(torch.randn(1, 1234))
    assert out.shape == (1, 2, 1234) and torch.isfinite(out).all()


def test_bad_name_or_config_raises():
    with pytest.raises(ValueError, match="conv_tasnet"):
        build("no_such_model")
    with pytest.raises(ValueError, match="tiny"):
        build("dprnn", "no_such_config")


def _capture_submodule_inputs(model: nn.Module, wav: torch.Tensor) -> dict[str, tuple]:
    """Run ``model`` once and record the first (args, kwargs) each sub-module sees."""
    seen: dict[str, tuple] = {}
    handles = []
    for qname, mod in model.named_modules():
        if not qname:
            continue

        def hook(_mod, args, kwargs, qname=qname):
            seen.setdefault(qname, (args, kwargs))

        handles.append(mod.register_forward_pre_hook(hook, with_kwargs=True))
    try:
        with torch.no_grad():
            model(wav)
    finally:
        for h in handles:
            h.remove()
    return seen


def _assert_same(a, b):
    flat_a, spec_a = tree_flatten(a)
    flat_b, spec_b = tree_flatten(b)
    assert spec_a == spec_b
    for x, y in zip(flat_a, flat_b):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_custom_submodules_trace_with_dynamic_lengths(name):
    """Every custom sub-module (torch.nn layers are leaves) fx-traces and matches eager
    at two input lengths, except the pad module and the deliberately wild ones."""
    model = _seeded_model(name).eval()
    inputs = [_capture_submodule_inputs(model, _wav(2, length)) for length in LENGTHS]
    skip = UNTRACEABLE_SUBMODULES.get(name, set())
    checked = 0
    for qname, mod in model.named_modules():
        if not qname or qname in skip or isinstance(mod, PadToMultiple):
            continue
        if not type(mod).__module__.startswith("sepfx."):
            continue  # torch.nn layer: a leaf for the compiler
        traced = torch.fx.symbolic_trace(mod)
        for captured in inputs:
            args, kwargs = captured[qname]
            with torch.no_grad():
                _assert_same(traced(*args, **kwargs), mod(*args, **kwargs))
        checked += 1
    assert checked >= 3


@pytest.mark.parametrize("name", TRACEABLE_ROOTS)
def test_whole_model_traces_with_dynamic_lengths(name):
    model = _seeded_model(name).eval()
    traced = torch.fx.symbolic_trace(model)
    for length in LENGTHS:
        wav = _wav(2, length)
        with torch.no_grad():
            _assert_same(traced(wav), model(wav))
