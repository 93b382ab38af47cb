"""Save a compiled model and load it back in a fresh process without the original model class.

The file holds the slim model (a GraphModule: its generated code, parameters and buffers; opaque
leaf modules are stored by their import path, so their package must be importable; a model with
eager shells is the model's own class, which must be importable too), the example input and
the report."""

from __future__ import annotations

import os

import torch

from sepfx.core import set_sepfx_attribute
from sepfx.errors import InputError

FORMAT = "sepfx-slim-1"


def save(slim: torch.nn.Module, path) -> None:
    if not isinstance(slim, torch.nn.Module) or not hasattr(slim, "sepfx_report"):
        raise InputError(
            f"sepfx.save takes a model sepfx made (compile/prune), got {type(slim).__name__}"
        )
    torch.save(
        {
            "format": FORMAT,
            "model": slim,
            "example_input": getattr(slim, "sepfx_example_input", None),
            "report": getattr(slim, "sepfx_report", None),
        },
        os.fspath(path),
    )


def load(path, map_location="cpu") -> torch.nn.Module:
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
    for name, value in list(vars(model).items()):  # pickled along; kept by deepcopy again
        if name.startswith("sepfx_"):
            set_sepfx_attribute(model, name, value)
    set_sepfx_attribute(model, "sepfx_example_input", blob["example_input"])
    set_sepfx_attribute(model, "sepfx_report", blob["report"])
    return model.eval()
