"""The exception classes the passes raise. ``sepfx.errors`` re-exports them (the same class
objects), so ``except sepfx.errors.SlimError`` catches what a pass raises. Every message says what
was wrong, where, and what to do."""


class SepfxError(Exception):
    """Base class of every error sepfx raises on purpose."""


class InputError(SepfxError, ValueError):
    """An argument given to sepfx is not what it accepts (model, input, budget, data...)."""


class TraceError(SepfxError):
    """The model cannot be turned into a torch.fx graph, not even with leaf fallbacks."""


class KeepSetError(SepfxError, ValueError):
    """A keep set does not fit the channel groups it is meant for."""


class ExportError(SepfxError):
    """ONNX export failed, or ONNX Runtime disagrees with PyTorch."""


class SlimError(SepfxError):
    """The slim rewrite produced a graph that does not check out (a bug: please report it)."""


__all__ = ["SepfxError", "InputError", "TraceError", "KeepSetError", "ExportError", "SlimError"]
