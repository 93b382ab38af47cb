"""A second device on a CPU-only machine, for tests: tensors that say they live on ``meta`` but
hold real values on the CPU.

Inside ``another_device()``, ``model.to(AWAY)`` moves a model there; every op on such tensors
runs on their CPU values, and an op that mixes them with an ordinary CPU tensor (other than a
0-dim one, an index or a copy source, which CUDA accepts too) raises ``DeviceMismatch``, as CUDA
would. So a tensor made on the CPU where the model's device was meant fails here as it would on
a GPU. ``.numpy()`` refuses them, as CUDA does; ``.item()``, ``.tolist()`` and ``.cpu()`` work.
"""

from __future__ import annotations

import contextlib

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_map

HOST = torch.device("cpu")
AWAY = torch.device("meta")  # the device the tensors claim; their values stay on HOST

# ops that CUDA runs with CPU operands beside device ones (indices, a copy's source)
_MIXING = {
    torch.ops.aten.index.Tensor,
    torch.ops.aten.index_put.default,
    torch.ops.aten.index_put_.default,
    torch.ops.aten._index_put_impl_.default,
    torch.ops.aten.copy_.default,
}


class DeviceMismatch(RuntimeError):
    pass


class Away(torch.Tensor):
    """A tensor on ``AWAY`` whose values are the CPU tensor ``value``."""

    value: torch.Tensor

    @staticmethod
    def __new__(cls, value: torch.Tensor):
        return torch.Tensor._make_wrapper_subclass(
            cls,
            value.shape,
            strides=value.stride(),
            storage_offset=value.storage_offset(),
            dtype=value.dtype,
            device=AWAY,
            requires_grad=value.requires_grad,
        )

    def __init__(self, value: torch.Tensor):
        self.value = value

    def __repr__(self):
        return f"Away({self.value!r})"

    def tolist(self):
        return self.value.tolist()

    __torch_function__ = torch._C._disabled_torch_function_impl

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is torch.ops.aten._to_copy.default and kwargs.get("device") is not None:
            if torch.device(kwargs["device"]).type == HOST.type:
                return func(_value(args[0]), **kwargs)
        if kwargs.get("device") is not None:
            kwargs["device"] = HOST
        host = []

        def unwrap(x):
            if isinstance(x, Away):
                return x.value
            if isinstance(x, torch.Tensor) and x.device.type == AWAY.type:
                # a value-less scalar torch's C++ made on our device: the zero of a backward
                # formula (where(mask, grad, 0)); a wrong guess shows as a mismatch with the
                # CPU path, which every test compares with
                assert x.dim() == 0, f"{func}: a real meta tensor of shape {tuple(x.shape)}"
                return torch.zeros((), dtype=x.dtype)
            if isinstance(x, torch.Tensor) and x.dim() > 0:
                host.append(x)
            return x

        args, kwargs = tree_map(unwrap, (args, kwargs))
        if host and func not in _MIXING:
            shapes = ", ".join(f"{tuple(t.shape)} on {t.device}" for t in host)
            raise DeviceMismatch(f"{func}: the model's device meets tensors made on {shapes}")
        out = func(*args, **kwargs)
        return tree_map(lambda x: Away(x) if isinstance(x, torch.Tensor) else x, out)


def _value(x: torch.Tensor) -> torch.Tensor:
    return x.value if isinstance(x, Away) else x


class _ToAway(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x if isinstance(x, Away) else Away(x.detach().clone())

    @staticmethod
    def backward(ctx, grad):
        return _value(grad)


class _ToHost(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return _value(x).detach().clone()

    @staticmethod
    def backward(ctx, grad):
        return Away(grad)


def _is_away(device) -> bool:
    return device is not None and torch.device(device).type == AWAY.type


class _Moves(TorchFunctionMode):
    """Factories asked for ``AWAY`` and moves between ``AWAY`` and the CPU (Python calls; what
    runs on ``Away`` tensors is handled by their dispatch)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.to and isinstance(args[0], torch.Tensor):
            device, dtype, _, _ = torch._C._nn._parse_to(*args[1:], **kwargs)
            x = args[0]
            if device is not None:
                moved_away = isinstance(x, Away)
                if _is_away(device) and not moved_away:
                    x = _ToAway.apply(x)
                elif device.type == HOST.type and moved_away:
                    x = _ToHost.apply(x)
            return x if dtype is None else x.to(dtype)
        if func is torch.Tensor.__setitem__ and isinstance(args[0], Away):
            if not isinstance(args[2], torch.Tensor):  # else made on the (value-less) meta device
                args = (args[0], args[1], torch.tensor(args[2], dtype=args[0].dtype))
            return func(*args, **kwargs)
        if func is torch.Tensor.cpu:
            return _ToHost.apply(args[0]) if isinstance(args[0], Away) else args[0]
        if _is_away(kwargs.get("device")):
            out = func(*args, **{**kwargs, "device": HOST})
            return tree_map(lambda x: Away(x) if isinstance(x, torch.Tensor) else x, out)
        return func(*args, **kwargs)


@contextlib.contextmanager
def another_device():
    with _Moves():
        yield
