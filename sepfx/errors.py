"""The project's exception classes. Every message says what was wrong, where, and what to do.

They are defined in ``passes.errors`` (the lower layer, which must not import ``sepfx``) and
re-exported here as the same class objects."""

import functools
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

    @functools.wraps(function)
    def only_sepfx_errors(*args: Any, **kwargs: Any) -> Any:
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
