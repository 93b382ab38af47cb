"""Bad inputs and unexpected failures give one sepfx error that says what the model expects
and how to pass it, never a raw error from inside the capture; the caller's model is
untouched. ``compile`` lets out nothing but sepfx errors, even when an op rule fails."""

from __future__ import annotations

import re

import pytest
import torch

import sepfx
import sepfx.learn
from passes.rules.conv import ConvRule
from sepfx.errors import InputError, InternalError

from wild import patterns


def model_and_state():
    torch.manual_seed(0)
    model = patterns.Sandwich().train()  # train mode: a run would be visible in its mode
    return model, {k: v.clone() for k, v in model.state_dict().items()}


def assert_untouched(model, state):
    assert model.training and all(m.training for m in model.modules())
    after = model.state_dict()
    assert after.keys() == state.keys()
    assert all(torch.equal(after[k], v) for k, v in state.items())
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_float64_example_for_a_float32_model():
    model, state = model_and_state()
    x = torch.randn(1, 8000, dtype=torch.float64)
    with pytest.raises(
        InputError,
        match=r"example_input is float64 but the model's parameters are float32: pass "
        r"example_input\.to\(torch\.float32\)",
    ):
        sepfx.compile(model, 0.4, example_input=x)
    assert_untouched(model, state)


@pytest.mark.parametrize(
    "shape, expression", [((1, 1, 8000), r"x\[:, 0\]"), ((1, 8000, 1), r"x\[\.\.\., 0\]")]
)
def test_channel_axis_added_to_a_batch_time_model(shape, expression):
    model, state = model_and_state()
    with pytest.raises(InputError) as caught:
        sepfx.compile(model, 0.4, example_input=torch.randn(*shape))
    message = str(caught.value)
    assert f"fails on example_input of shape {list(shape)}" in message, message
    assert "runs on shape [1, 8000]: it takes a waveform [batch, time]" in message, message
    assert re.search(f"pass example_input={expression}", message)
    assert "conv1d" in message  # the model's own complaint, for reference
    assert_untouched(model, state)


def test_input_no_layout_rescues_is_refused_with_the_models_reason():
    model, state = model_and_state()
    with pytest.raises(InputError, match=r"fails on example_input of shape \[2, 3, 4, 8000\]"):
        sepfx.compile(model, 0.4, example_input=torch.randn(2, 3, 4, 8000))
    assert_untouched(model, state)


def test_a_failing_rule_coupling_is_an_internal_error_naming_rule_and_node(monkeypatch):
    model, state = model_and_state()

    def broken(self, ctx):
        raise AttributeError("'tuple' object has no attribute 'name'")  # as issue 28 saw

    monkeypatch.setattr(ConvRule, "couple", broken)
    with pytest.raises(InternalError) as caught:
        sepfx.compile(model, 0.4)
    message = str(caught.value)
    assert "ConvRule rule failed" in message and "node encoder" in message, message
    assert "AttributeError: 'tuple' object has no attribute 'name'" in message, message
    assert_untouched(model, state)


def test_any_other_failure_inside_compile_is_a_sepfx_error(monkeypatch):
    model, state = model_and_state()

    def broken(*args, **kwargs):
        raise ZeroDivisionError("injected")

    monkeypatch.setattr(sepfx.learn, "_project", broken)
    with pytest.raises(InternalError, match=r"sepfx\.compile failed: ZeroDivisionError: injected"):
        sepfx.compile(model, 0.4)
    assert_untouched(model, state)


@pytest.mark.parametrize(
    "call, message",
    [
        (
            lambda m, x: sepfx.compile(m, x, budget=0.4),  # example_input passed as the budget
            r"sepfx\.compile: multiple values for argument 'budget'; it takes model, budget, "
            r"data, example_input by position or keyword, and latency, .* by keyword only",
        ),
        (
            lambda m, x: sepfx.analyze(m, x, budget=0.4),
            r"sepfx\.analyze: got an unexpected keyword argument 'budget'; it takes model, "
            r"example_input by position or keyword$",
        ),
    ],
)
def test_a_call_that_does_not_fit_the_signature_is_an_input_error(call, message):
    model, state = model_and_state()
    with pytest.raises(InputError, match=message) as caught:
        call(model, torch.randn(1, 8000))
    assert caught.value.__cause__ is None  # the caller's mistake, not an internal failure
    assert_untouched(model, state)
