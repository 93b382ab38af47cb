"""Shared fixtures and helpers for the sepfx tests.

The machine running these tests is small and shared: one intra-op thread for the whole session
(LSTM and attention get very slow when a second thread waits on a busy core), and every zoo
model is analysed once per session (``zoo`` fixture).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
import torch
from torch import nn

import sepfx
import sepfx.models
from sepfx.models import build

torch.set_num_threads(1)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One thread in every test module (timings and float32 sums as the checks expect),
    restored after it if a test module changed it."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


ZOO_NAMES = list(sepfx.models.ZOO)
LENGTHS = (8000, 8000 + 37)  # 1 s at 8 kHz, and a length that is a multiple of no stride


@dataclass
class ZooEntry:
    name: str
    model: nn.Module  # the eager model the analysis was made from (eval mode)
    analysis: sepfx.Analysis


def build_seeded(name: str, dtype: torch.dtype = torch.float32, seed: int = 0) -> nn.Module:
    """Zoo model ``name`` (tiny config), deterministic weights, eval mode, in ``dtype``."""
    torch.manual_seed(seed)
    return build(name, "tiny").to(dtype).eval()


def wav(batch: int, length: int, seed: int = 1, dtype: torch.dtype = torch.float32):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, length, generator=generator, dtype=torch.float64).to(dtype)


def random_keep(analysis, rng: np.random.Generator, single: bool = False) -> dict[int, list[int]]:
    """A random keep set: per group, a uniform size in 1..size (1 if ``single``) and that many
    distinct indices, sorted."""
    keep = {}
    for group in analysis.groups:
        n = 1 if single else int(rng.integers(1, group.size + 1))
        keep[group.index] = sorted(int(i) for i in rng.choice(group.size, n, replace=False))
    return keep


def max_relative_error(expected: torch.Tensor, got: torch.Tensor) -> float:
    assert expected.shape == got.shape, (expected.shape, got.shape)
    assert torch.isfinite(got).all(), "non-finite output"
    scale = expected.abs().max().clamp_min(1e-30)
    return float((expected - got).abs().max() / scale)


@pytest.fixture(scope="session")
def zoo():
    """``zoo(name)`` -> ZooEntry with the float32 tiny model and its cached analysis;
    ``zoo(name, torch.float64)`` the same in double precision."""
    cache: dict[tuple, ZooEntry] = {}

    def get(name: str, dtype: torch.dtype = torch.float32) -> ZooEntry:
        key = (name, dtype)
        if key not in cache:
            model = build_seeded(name, dtype)
            example = sepfx.default_example_input(model)
            assert example.dtype == dtype
            cache[key] = ZooEntry(name, model, sepfx.analyze(model, example))
        return cache[key]

    return get
