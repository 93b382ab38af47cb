"""The exception classes the passes raise. ``sepfx.errors`` re-exports them (the same class
objects), so ``except sepfx.errors.SlimError`` catches what a pass raises. Every message says what
was wrong, where, and what to do."""

from __future__ import annotations

import re


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


class InternalError(SepfxError):
    """sepfx failed in a way it does not expect (an op rule or a pass raised): the message says
    where, and the error it comes from is chained to it. Please report it with the model."""


def describe_error(error: BaseException) -> str:
    """What went wrong, in one line: the error's type and the line that says why. The dynamo
    exporter's message opens with boilerplate ("Failed to export the model with torch.export.
    This is step 1/3 ...") and states its cause under "## Exception summary", with the model's
    line that raised it; an error with no message is described by its cause, or its type."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(error))  # terminal colours
    lines = [line.strip() for line in text.splitlines()]
    kind = type(error).__name__
    if "## Exception summary" in lines:
        after = [line for line in lines[lines.index("## Exception summary") + 1 :] if line]
        cause = after[0] if after else ""
        match = re.match(r"<class '(?:[\w.]*\.)?(\w+)'>: (.*)", cause)
        kind, why = (match.group(1), match.group(2)) if match else (kind, cause)
        if "The following call raised this error:" in lines:
            where = lines[lines.index("The following call raised this error:") + 1 :][:2]
            why += f" (raised by {' '.join(where)})" if where else ""
    else:
        why = next((line for line in lines if line), "")
    if not why and error.__cause__ is not None:
        return f"{kind}: {describe_error(error.__cause__)}"
    why = why.split("  [Caused by the value")[0]  # TorchScript appends its whole graph value
    return f"{kind}: {why[:400]}" if why else f"{kind} (with no message)"


__all__ = [
    "SepfxError",
    "InputError",
    "TraceError",
    "KeepSetError",
    "ExportError",
    "SlimError",
    "InternalError",
    "describe_error",
]
