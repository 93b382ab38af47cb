"""Save a compiled model and load it back in a fresh process without the original model class.

The file holds the slim GraphModule (its generated code, parameters and buffers; opaque leaf
modules are stored by their import path, so their package must be importable), the example
input and the report."""
from __future__ import annotations

import os

import torch
from torch import fx

from sepfx.errors import InputError

FORMAT = "sepfx-slim-1"


def save(slim: fx.GraphModule, path) -> None:
    if not isinstance(slim, fx.GraphModule):
        raise InputError(f"sepfx.save takes the GraphModule sepfx made, got {type(slim).__name__}")
    torch.save({"format": FORMAT, "model": slim,
                "example_input": getattr(slim, "sepfx_example_input", None),
                "report": getattr(slim, "sepfx_report", None)}, os.fspath(path))


def load(path, map_location="cpu") -> fx.GraphModule:
    """Load a model written by ``sepfx.save`` (this unpickles code: load only files you trust)."""
    if not os.path.exists(os.fspath(path)):
        raise InputError(f"no such file: {path}")
    try:
        blob = torch.load(os.fspath(path), map_location=map_location, weights_only=False)
    except Exception as error:
        raise InputError(f"{path} is not a file written by sepfx.save: {error}") from error
    if not isinstance(blob, dict) or blob.get("format") != FORMAT:
        raise InputError(f"{path} is not a file written by sepfx.save (format {FORMAT})")
    model = blob["model"]
    model.sepfx_example_input = blob["example_input"]
    model.sepfx_report = blob["report"]
    return model.eval()
