"""The project's exception classes. Every message says what was wrong, where, and what to do.

They are defined in ``passes.errors`` (the lower layer, which must not import ``sepfx``) and
re-exported here as the same class objects."""

from passes.errors import ExportError, InputError, KeepSetError, SepfxError, SlimError, TraceError

__all__ = ["SepfxError", "InputError", "TraceError", "KeepSetError", "ExportError", "SlimError"]
