"""The project's exception classes. Every message says what was wrong, where, and what to do.

They are defined in ``passes.errors`` (the lower layer, which must not import ``sepfx``) and
re-exported here as the same class objects."""

import functools
import inspect
from collections.abc import Callable
from typing import Any, TypeVar, cast

from passes.errors import (
    ExportError,
    InputError,
    InternalError,
    KeepSetError,
    SepfxError,
    SlimError,
    TraceError,
    describe_error,
)

__all__ = [
    "SepfxError",
    "InputError",
    "TraceError",
    "KeepSetError",
    "ExportError",
    "SlimError",
    "InternalError",
    "describe_error",
    "sepfx_errors_only",
]

Function = TypeVar("Function", bound=Callable[..., Any])


def sepfx_errors_only(function: Function) -> Function:
    """``function`` (a public entry point: compile, analyze, prune) raising only sepfx errors:
    any other exception becomes an ``InternalError`` that names the entry point and the error,
    chained to it (its traceback says whether it came from sepfx or from the model's code)."""

    signature = inspect.signature(function)
    params = signature.parameters.values()
    positional = [p.name for p in params if p.kind is p.POSITIONAL_OR_KEYWORD]
    keyword = [p.name for p in params if p.kind is p.KEYWORD_ONLY]
    takes = f"it takes {', '.join(positional)} by position or keyword"
    takes += f", and {', '.join(keyword)} by keyword only" if keyword else ""

    @functools.wraps(function)
    def only_sepfx_errors(*args: Any, **kwargs: Any) -> Any:
        try:  # a call that does not fit the signature is the caller's error, not sepfx's
            signature.bind(*args, **kwargs)
        except TypeError as error:
            raise InputError(f"sepfx.{function.__name__}: {error}; {takes}") from None
        try:
            return function(*args, **kwargs)
        except SepfxError:
            raise
        except Exception as error:
            raise InternalError(
                f"sepfx.{function.__name__} failed: {describe_error(error)}. sepfx does not "
                "expect this: if the traceback above points into sepfx or passes, please "
                "report it with the model; if it points into the model's own code, the model "
                "fails on what sepfx ran it with (example_input, or a batch of data)"
            ) from error

    return cast(Function, only_sepfx_errors)
