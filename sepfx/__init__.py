"""sepfx: structured pruning of speech-separation networks as a torch.fx compiler pass.

    import sepfx
    slim = sepfx.compile(model, budget=0.4, data=loader)   # <= 40% of the dense MACs
    sepfx.export_onnx(slim, "slim.onnx")

See README.md. ``sepfx.analyze`` / ``sepfx.prune`` give the compiler's pieces directly.
"""
from passes.export import ExportResult, export_onnx
from sepfx import errors
from sepfx.io import load, save
from sepfx.core import Analysis, analyze, default_example_input, prune
from sepfx.learn import compile, finetune, learn_gates
from sepfx.report import Report

__all__ = ["Analysis", "ExportResult", "Report", "analyze", "compile", "default_example_input",
           "errors", "export_onnx", "finetune", "learn_gates", "load", "prune", "save"]
__version__ = "0.1.0"
