"""sepfx: structured pruning of speech-separation networks as a torch.fx compiler pass.

    import sepfx
    slim = sepfx.compile(model, budget=0.4, data=loader)   # <= 40% of the dense MACs
    sepfx.export_onnx(slim, "slim.onnx")

See README.md. ``sepfx.analyze`` / ``sepfx.prune`` give the compiler's pieces directly.
"""

import importlib

__version__ = "0.1.0"

# Public names and where they live. Loaded on first use, so that ``import sepfx`` (or
# ``sepfx.errors``) does not pull in torch.fx passes, the zoo and the training loops.
_EXPORTS = {
    "Analysis": "sepfx.core",
    "analyze": "sepfx.core",
    "prune": "sepfx.core",
    "default_example_input": "sepfx.core",
    "compile": "sepfx.learn",
    "finetune": "sepfx.learn",
    "learn_gates": "sepfx.learn",
    "save": "sepfx.io",
    "load": "sepfx.io",
    "Report": "sepfx.report",
    "ExportResult": "passes.export",
    "export_onnx": "passes.export",
}
__all__ = sorted(_EXPORTS) + ["errors"]


def __getattr__(name):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    if name in (
        "errors",
        "models",
        "losses",
        "budget",
        "gates",
        "learn",
        "core",
        "io",
        "report",
        "data",
    ):
        return importlib.import_module(f"sepfx.{name}")
    raise AttributeError(f"module 'sepfx' has no attribute {name!r}")


def __dir__():
    return __all__
