"""Random separation-like models for testing sepfx (issue 11: never a silently wrong model).

A model is described by a JSON-able **spec**::

    {"version": 1, "seed": 7, "length": 480, "n_src": 2,
     "encoder": {"channels": 8, "stride": 4, "activation": "relu"},
     "shared": [{"name": "shared0", "kind": "block", "channels": 8}],
     "unused_module": false,
     "nodes": [{"id": 1, "op": "conv", "in": ["v0"], "out": ["v1"], "channels": 8, ...},
               {"id": 2, "op": "shared", "module": "shared0", "calls": 2, ...}, ...],
     "output": "v5",
     "decoder": {"kind": "mask"}}

``v0`` is the encoder's output ``[B, E, T]``; every node reads named values and writes new ones,
all ``[B, C, T]`` (C and the length T follow from the inputs: see ``shapes``). ``source(spec)``
writes the model as ordinary Python (an ``nn.Module`` subclass with attribute layers and a
forward of plain torch calls, as a user would write it) and ``build(spec)`` imports that source,
so a failing case can be saved (the spec), replayed and minimised (``minimise``), and the
minimal model printed as a standalone regression test (``regression_source``).

The checks (``check``) return a list of failures by kind; each kind starts with its severity:

- ``silent:...``: a wrong model handed out without an error (output mismatch, NaN, wrong
  parameter count, changed caller model, ONNX Runtime disagreeing, budget exceeded);
- ``crash:...``: an exception that is not a ``sepfx.errors`` class (a defect too);
- ``loud:...``: a sepfx error (acceptable when its message is clear, counted by kind);
- ``note:...``: not a failure (float32 rounding of an ill-conditioned model, a budget that the
  channel granularity cannot meet closely, an export fixed to one shape...).

Run ``python tests/random_models.py --seed 3`` to check one generated model and print its
source; ``--spec case.json`` replays a saved spec; ``--minimise KIND`` shrinks it.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import importlib.util
import json
import math
import random
import re
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

SPEC_VERSION = 1
CHANNELS = (4, 6, 8, 12, 16)
MAX_CHANNELS = 32  # a concatenation wider than this is not generated
BROADCAST = "*"  # the time tag of a value with one frame ([B, C, 1]: broadcasts over time)

# Kinds of op the generator draws, with their weights. ``ops=`` of ``generate`` picks a subset.
OP_WEIGHTS = {
    "conv": 10,
    "convt": 2,
    "convt_up": 2,
    "linear": 3,
    "bn": 2,
    "gn": 3,
    "ln": 2,
    "gln": 2,
    "cln": 2,
    "prelu": 2,
    "act": 5,
    "binary": 6,
    "stat": 3,
    "se": 2,
    "softmax": 1,
    "cat": 3,
    "split": 2,
    "chunk": 2,
    "slice": 2,
    "view4d": 2,
    "fold": 2,
    "mha": 2,
    "rnn": 2,
    "shared": 2,
    "pool": 2,
    "upsample": 1,
    "norule": 2,
    "padconv": 1,
}
BASIC_OPS = ("conv", "act", "binary", "bn", "gn", "prelu", "linear", "cat", "split", "slice")
DECODERS = ("convt", "convt_mono", "head", "mask", "mask_loop")


class InvalidSpec(ValueError):
    """A spec that describes no valid model (a channel count that a group size does not
    divide, operands of different lengths, an unknown value...)."""


# ============================================================================================
# shapes: every value's channel count and time tag
# ============================================================================================


@dataclass(frozen=True)
class Value:
    """A value ``[B, channels, T]``. Values with equal ``tag`` have equal lengths at every input
    length; ``BROADCAST`` is a single frame."""

    channels: int
    tag: str


def conv_tag(tag: str, kernel: int, stride: int, padding: int, dilation: int = 1) -> str:
    """The tag of a convolution's (or pool's) output: its length as an expression of the input
    length, so that two layers with the same arithmetic give the same tag."""
    shift = 2 * padding - dilation * (kernel - 1) - 1
    if stride == 1 and shift == -1:
        return tag
    return f"({tag}{shift:+d})//{stride}+1"


def _conv_groups(rec: dict, c_in: int) -> int:
    groups = rec.get("groups", 1)
    return c_in if groups == "depthwise" else int(groups)


def _need(condition: bool, message: str) -> None:
    if not condition:
        raise InvalidSpec(message)


def _infer(rec: dict, ins: list[Value], spec: dict) -> list[Value]:
    """The values node ``rec`` writes, from the values it reads; InvalidSpec where it cannot
    run on them."""
    op = rec["op"]
    x = ins[0]
    c, tag = x.channels, x.tag
    timed = tag != BROADCAST
    if op in ("conv", "padconv"):
        groups = _conv_groups(rec, c)
        out = rec["channels"]
        _need(c % groups == 0 and out % groups == 0, f"groups {groups} vs {c} -> {out}")
        if op == "padconv":
            _need(timed, "padconv over a single frame")
            return [Value(out, f"ceil({tag}/{rec['factor']})")]
        k, s, p, d = (
            rec["kernel"],
            rec.get("stride", 1),
            rec.get("padding", 0),
            rec.get("dilation", 1),
        )
        _need(timed or (k - 1) * d <= 2 * p and s == 1, "a wide kernel over a single frame")
        return [Value(out, tag if not timed else conv_tag(tag, k, s, p, d))]
    if op in ("convt", "convt_up"):
        groups = int(rec.get("groups", 1))
        out = rec["channels"]
        _need(c % groups == 0 and out % groups == 0, f"groups {groups} vs {c} -> {out}")
        _need(timed, "transposed convolution over a single frame")
        if op == "convt":
            return [Value(out, tag)]
        _need(ins[1].tag != BROADCAST, "upsampling to a single frame")
        return [Value(out, ins[1].tag)]
    if op == "linear":
        return [Value(rec["channels"], tag)]
    if op in ("bn", "ln", "gln", "cln", "prelu", "act", "softmax", "norule", "se"):
        if op == "norule" and rec.get("dim", 1) == 2:
            _need(timed, "a time op over a single frame")
        return [Value(c, tag)]
    if op == "gn":
        groups = {"one": 1, "all": c}.get(rec["groups"], rec["groups"])
        _need(isinstance(groups, int) and c % groups == 0, f"GroupNorm({groups}, {c})")
        return [Value(c, tag)]
    if op == "binary":
        y = ins[1]
        _need(
            x.channels == y.channels or 1 in (x.channels, y.channels),
            f"channels {x.channels} vs {y.channels}",
        )
        _need(x.tag == y.tag or BROADCAST in (x.tag, y.tag), f"lengths {x.tag} vs {y.tag}")
        return [Value(max(x.channels, y.channels), y.tag if x.tag == BROADCAST else x.tag)]
    if op == "stat":
        if rec["over"] == "channels":
            return [Value(1, tag)]
        if rec["over"] == "time":
            return [Value(c, BROADCAST)]
        return [Value(1, BROADCAST)]
    if op == "cat":
        _need(len({v.tag for v in ins}) == 1, "concatenated lengths differ")
        return [Value(sum(v.channels for v in ins), tag)]
    if op == "split":
        _need(sum(rec["sizes"]) == c and min(rec["sizes"]) > 0, f"split {rec['sizes']} of {c}")
        _need(len(rec["out"]) == len(rec["sizes"]), "split outputs")
        return [Value(n, tag) for n in rec["sizes"]]
    if op == "chunk":
        n = len(rec["out"])
        _need(c % n == 0, f"chunk {n} of {c}")
        return [Value(c // n, tag)] * n
    if op == "slice":
        start, stop, step = rec["start"], rec["stop"], rec.get("step", 1)
        _need(0 <= start < stop <= c, f"slice {start}:{stop} of {c}")
        return [Value(len(range(start, stop, step)), tag)]
    if op == "view4d":
        k = rec["k"]
        _need(c % k == 0 and c // k > 1, f"view of {c} as {k} x {c // max(k, 1)}")
        return [Value(c if rec["reduce"] == "softmax" else c // k, tag)]
    if op == "fold":
        k = rec["k"]
        _need(c % k == 0 and timed, f"fold of {c} channels into {k}")
        return [Value(k * rec["channels"], tag)]
    if op == "mha":
        _need(c % rec["heads"] == 0 and timed, f"{rec['heads']} heads of {c}")
        return [Value(c, tag)]
    if op == "rnn":
        _need(timed, "recurrence over a single frame")
        return [Value(rec["hidden"] * (2 if rec["bidirectional"] else 1), tag)]
    if op == "shared":
        module = _shared(spec, rec["module"])
        _need(c == module["channels"], f"shared module of {module['channels']} on {c}")
        _need(timed, "shared block over a single frame")
        return [Value(c, tag)]
    if op == "pool":
        _need(timed, "pooling a single frame")
        return [Value(c, conv_tag(tag, rec["factor"], rec["factor"], 0))]
    if op == "upsample":
        _need(ins[1].tag != BROADCAST, "upsampling to a single frame")
        return [Value(c, ins[1].tag)]
    raise InvalidSpec(f"unknown op {op!r}")


# how many inputs each op reads (binary, convt_up, upsample and cross attention read two)
def _arity_ok(rec: dict) -> bool:
    n = len(rec["in"])
    if rec["op"] in ("binary", "convt_up", "upsample"):
        return n == 2
    if rec["op"] == "mha":
        return n == (2 if rec.get("cross") else 1)
    if rec["op"] == "cat":
        return n >= 2
    return n == 1


def _shared(spec: dict, name: str) -> dict:
    for module in spec.get("shared", []):
        if module["name"] == name:
            return module
    raise InvalidSpec(f"no shared module {name!r}")


def shapes(spec: dict) -> dict[str, Value]:
    """Every value of ``spec``: InvalidSpec where it describes no valid model."""
    enc = spec["encoder"]
    values = {"v0": Value(enc["channels"], "t0")}
    for rec in spec["nodes"]:
        _need(_arity_ok(rec), f"node {rec['id']} ({rec['op']}) reads {len(rec['in'])} inputs")
        for name in rec["in"]:
            _need(name in values, f"node {rec['id']} reads {name}, not defined before it")
        outs = _infer(rec, [values[n] for n in rec["in"]], spec)
        _need(len(outs) == len(rec["out"]), f"node {rec['id']} writes {len(rec['out'])} values")
        for name, value in zip(rec["out"], outs):
            _need(name not in values, f"{name} written twice")
            _need(1 <= value.channels <= 4 * MAX_CHANNELS, f"{name} has {value.channels} channels")
            values[name] = value
    _need(spec["output"] in values, f"output {spec['output']} is not defined")
    out = values[spec["output"]]
    _need(out.tag == "t0", f"the output {spec['output']} is not at the encoder's frame rate")
    _need(spec["decoder"]["kind"] in DECODERS, f"decoder {spec['decoder']['kind']}")
    return values


def live_nodes(spec: dict) -> list[dict]:
    """The nodes whose outputs reach the model's output (the others are dead branches)."""
    needed = {spec["output"]}
    live = []
    for rec in reversed(spec["nodes"]):
        if needed & set(rec["out"]):
            live.append(rec)
            needed |= set(rec["in"])
    return live[::-1]


# ============================================================================================
# generation
# ============================================================================================


class _Pool:
    """The values defined so far, and how often each was read (unread ones are preferred as
    inputs, so that few branches end up dead)."""

    def __init__(self, rng: random.Random):
        self.rng = rng
        self.values: dict[str, Value] = {}
        self.reads: dict[str, int] = {}
        self.order: list[str] = []

    def add(self, name: str, value: Value) -> None:
        self.values[name] = value
        self.reads[name] = 0
        self.order.append(name)

    def pick(self, where=lambda v: True, exclude=()) -> str | None:
        names = [n for n in self.order if where(self.values[n]) and n not in exclude]
        if not names:
            return None
        # recent and unread values are likelier: deep chains, few dead ends
        weights = [(1 + i) * (4 if self.reads[n] == 0 else 1) for i, n in enumerate(names)]
        name = self.rng.choices(names, weights)[0]
        self.reads[name] += 1
        return name


def _timed(v: Value) -> bool:
    return v.tag != BROADCAST


def _divisors(n: int, low: int = 2, high: int | None = None) -> list[int]:
    high = n if high is None else high
    return [d for d in range(low, min(n, high) + 1) if n % d == 0]


def _make(op: str, rng: random.Random, pool: _Pool, spec: dict) -> dict | None:
    """A random node of kind ``op`` over the pool's values (its "id" and "out" are set by the
    caller), or None where no value fits."""
    V = pool.values
    ch = rng.choice
    if op == "conv":
        x = pool.pick(_timed)
        if x is None:
            return None
        c = V[x].channels
        mode = ch(
            ["dense", "dense", "dense", "pointwise", "depthwise", "grouped", "dilated", "strided"]
        )
        rec = {
            "op": "conv",
            "in": [x],
            "channels": ch(CHANNELS),
            "kernel": 3,
            "padding": 1,
            "bias": ch([True, False]),
            "mode": mode,
        }
        if mode == "pointwise":
            rec.update(kernel=1, padding=0)
        elif mode == "depthwise":
            rec.update(groups="depthwise", channels=min(c * ch([1, 1, 2]), MAX_CHANNELS))
            if rec["channels"] % c:
                rec["channels"] = c
        elif mode == "grouped":
            groups = _divisors(c, 2, c // 2)
            if not groups:
                return None
            g = ch(groups)
            rec.update(groups=g, channels=g * ch([1, 2, 3]))
        elif mode == "dilated":
            d = ch([2, 3, 4])
            rec.update(dilation=d, padding=d)
        elif mode == "strided":
            s = ch([2, 2, 3])
            rec.update(stride=s, kernel=ch([s, 2 * s]), padding=0)
            if rec["kernel"] == 2 * s:
                rec["padding"] = s // 2
        return rec
    if op in ("convt", "convt_up"):
        x = pool.pick(_timed)
        if x is None:
            return None
        c = V[x].channels
        g = ch([1, 1] + _divisors(c, 2, c // 2))
        rec = {
            "op": op,
            "in": [x],
            "channels": g * max(1, ch(CHANNELS) // g),
            "groups": g,
            "bias": ch([True, False]),
        }
        if op == "convt":
            rec["kernel"] = ch([1, 3, 5])
            return rec
        ref = (
            pool.pick(lambda v: _timed(v) and v.tag != V[x].tag, exclude=[x])
            or pool.pick(_timed, exclude=[x])
            or "v0"
        )
        rec["in"].append(ref)
        rec["stride"] = ch([2, 3])
        return rec
    if op == "linear":
        x = pool.pick()
        return (
            None
            if x is None
            else {"op": "linear", "in": [x], "channels": ch(CHANNELS), "bias": ch([True, False])}
        )
    if op in ("bn", "ln", "gln", "cln"):
        x = pool.pick(lambda v: v.channels > 1 and (op != "gln" or _timed(v)))
        if x is None:
            return None
        rec = {"op": op, "in": [x]}
        if op == "ln":
            rec["affine"] = ch([True, False])
        return rec
    if op == "gn":
        x = pool.pick(lambda v: v.channels > 1 and _timed(v))
        if x is None:
            return None
        c = V[x].channels
        return {"op": "gn", "in": [x], "groups": ch(["one", "all"] + _divisors(c, 2, c // 2))}
    if op == "prelu":
        x = pool.pick()
        return None if x is None else {"op": "prelu", "in": [x], "per_channel": ch([True, False])}
    if op == "act":
        x = pool.pick()
        return (
            None
            if x is None
            else {
                "op": "act",
                "in": [x],
                "fn": ch(
                    ["relu", "relu_module", "gelu", "tanh", "sigmoid", "leaky_relu", "silu", "elu"]
                ),
            }
        )
    if op == "binary":
        x = pool.pick(_timed)
        if x is None:
            return None
        vx = V[x]
        y = pool.pick(
            lambda v: (
                (v.channels == vx.channels or v.channels == 1)
                and (v.tag == vx.tag or v.tag == BROADCAST)
            ),
            exclude=[x],
        )
        if y is None:
            return None
        return {"op": "binary", "in": [x, y], "fn": ch(["add", "add", "mul", "sub", "torch.add"])}
    if op == "stat":
        x = pool.pick(lambda v: v.channels > 1 and _timed(v))
        if x is None:
            return None
        over = ch(["channels", "channels", "channels", "time", "all"])
        fns = (
            ["mean", "var", "std", "max", "amax", "logsumexp"]
            if over == "channels"
            else ["mean", "amax", "var"]
        )
        return {"op": "stat", "in": [x], "over": over, "fn": ch(fns)}
    if op == "se":
        x = pool.pick(lambda v: _timed(v) and v.channels > 1)
        return None if x is None else {"op": "se", "in": [x]}
    if op == "softmax":
        x = pool.pick(lambda v: v.channels > 1)
        return (
            None
            if x is None
            else {"op": "softmax", "in": [x], "style": ch(["torch", "functional", "module"])}
        )
    if op == "cat":
        x = pool.pick(_timed)
        if x is None:
            return None
        ins = [x]
        for _ in range(ch([1, 1, 2])):
            y = pool.pick(lambda v: v.tag == V[x].tag, exclude=ins)
            if y is not None:
                ins.append(y)
        if len(ins) < 2 and ch([True, False]):
            ins.append(x)  # torch.cat([x, x], 1): the same value twice
        if len(ins) < 2 or sum(V[n].channels for n in ins) > MAX_CHANNELS:
            return None
        return {"op": "cat", "in": ins}
    if op in ("split", "chunk"):
        x = pool.pick(lambda v: v.channels >= 4)
        if x is None:
            return None
        c = V[x].channels
        if op == "chunk":
            n = ch([n for n in (2, 3, 4) if c % n == 0] or [1])
            if n == 1:
                return None
            return {"op": "chunk", "in": [x], "n": n, "style": ch(["method", "torch"])}
        first = rng.randint(1, c - 1)
        sizes = [first, c - first]
        if c - first >= 2 and ch([True, False]):
            second = rng.randint(1, c - first - 1)
            sizes = [first, second, c - first - second]
        return {"op": "split", "in": [x], "sizes": sizes, "style": ch(["method", "torch"])}
    if op == "slice":
        x = pool.pick(lambda v: v.channels >= 3)
        if x is None:
            return None
        c = V[x].channels
        start = rng.randint(0, c - 2)
        stop = rng.randint(start + 1, c)
        return {"op": "slice", "in": [x], "start": start, "stop": stop, "step": ch([1, 1, 1, 2])}
    if op == "view4d":
        x = pool.pick(lambda v: len(_divisors(v.channels, 2, v.channels // 2)) > 0)
        if x is None:
            return None
        c = V[x].channels
        return {
            "op": "view4d",
            "in": [x],
            "k": ch(_divisors(c, 2, c // 2)),
            "where": ch(["outer", "inner"]),
            "reduce": ch(["mean", "sum", "softmax", "amax"]),
            "literal": ch([True, False]),
        }
    if op == "fold":
        x = pool.pick(lambda v: _timed(v) and len(_divisors(v.channels, 2, v.channels // 2)) > 0)
        if x is None:
            return None
        c = V[x].channels
        return {
            "op": "fold",
            "in": [x],
            "k": ch(_divisors(c, 2, c // 2)),
            "channels": ch((2, 4, 6)),
            "literal": ch([True, False]),
        }
    if op == "mha":
        x = pool.pick(lambda v: _timed(v) and v.channels >= 4)
        if x is None:
            return None
        c = V[x].channels
        heads = ch([h for h in (1, 2, 4) if c % h == 0 and c // h >= 2])
        rec = {
            "op": "mha",
            "in": [x],
            "heads": heads,
            "batch_first": ch([True, False]),
            "cross": ch([False, True]),
            "need_weights": ch([True, False]),
        }
        if rec["cross"]:
            y = pool.pick(exclude=[x])
            if y is None:
                rec["cross"] = False
            else:
                rec["in"].append(y)
        return rec
    if op == "rnn":
        x = pool.pick(_timed)
        return (
            None
            if x is None
            else {
                "op": "rnn",
                "in": [x],
                "cell": ch(["lstm", "gru"]),
                "hidden": ch((4, 6, 8)),
                "layers": ch([1, 1, 2]),
                "bidirectional": ch([True, False]),
                "batch_first": ch([True, False]),
            }
        )
    if op == "shared":
        # a module called at several sites: a new one, or one called before
        existing = [
            m
            for m in spec["shared"]
            if any(v.channels == m["channels"] and _timed(v) for v in V.values())
        ]
        if existing and ch([True, True, False]):
            module = ch(existing)
        else:
            x = pool.pick(lambda v: _timed(v) and v.channels > 1)
            if x is None:
                return None
            module = {
                "name": f"shared{len(spec['shared'])}",
                "kind": ch(["conv", "block"]),
                "channels": V[x].channels,
            }
            spec["shared"].append(module)
        x = pool.pick(lambda v: v.channels == module["channels"] and _timed(v))
        # applied once, or two or three times in a row (a weight-shared recurrent block)
        return (
            None
            if x is None
            else {"op": "shared", "in": [x], "module": module["name"], "calls": ch([1, 2, 2, 3])}
        )
    if op == "pool":
        x = pool.pick(_timed)
        return (
            None
            if x is None
            else {"op": "pool", "in": [x], "kind": ch(["avg", "max"]), "factor": ch([2, 2, 3])}
        )
    if op == "upsample":
        x = pool.pick()
        if x is None:
            return None
        ref = pool.pick(lambda v: _timed(v) and v.tag != V[x].tag, exclude=[x])
        if ref is None:
            return None
        return {"op": "upsample", "in": [x, ref], "mode": ch(["nearest", "linear"])}
    if op == "norule":
        x = pool.pick(lambda v: v.channels > 1 and _timed(v))
        if x is None:
            return None
        return {
            "op": "norule",
            "in": [x],
            "fn": ch(["cumsum", "flip", "sort", "cummax", "roll"]),
            "dim": ch([1, 1, 1, 2]),
        }
    if op == "padconv":
        x = pool.pick(_timed)
        return (
            None
            if x is None
            else {"op": "padconv", "in": [x], "factor": ch([2, 4]), "channels": ch(CHANNELS)}
        )
    raise ValueError(f"unknown op {op!r}")


def _draft(seed: int, attempt: int, max_nodes: int, ops) -> dict:
    rng = random.Random(f"{seed}/{attempt}")
    stride = rng.choice([4, 8])
    spec = {
        "version": SPEC_VERSION,
        "seed": seed,
        "length": rng.randrange(240, 800, 2) + 1,
        "n_src": rng.choice([1, 2, 2, 3]),
        "encoder": {
            "channels": rng.choice(CHANNELS),
            "stride": stride,
            "activation": rng.choice(["relu", "relu", "none"]),
        },
        "shared": [],
        "unused_module": rng.random() < 0.15,
        "nodes": [],
        "output": "v0",
        "decoder": {"kind": rng.choice(DECODERS)},
    }
    pool = _Pool(rng)
    pool.add("v0", Value(spec["encoder"]["channels"], "t0"))
    names = [op for op in OP_WEIGHTS if op in ops]
    weights = [OP_WEIGHTS[op] for op in names]
    target = rng.randint(2, max_nodes)
    tries = 0
    while len(spec["nodes"]) < target and tries < 10 * max_nodes:
        tries += 1
        op = rng.choices(names, weights)[0]
        rec = _make(op, rng, pool, spec)
        if rec is None:
            continue
        _append(spec, rec, pool)
    last = spec["nodes"][-1]["out"][0] if spec["nodes"] else "v0"
    _finish(spec, last, pool)
    return spec


def _append(spec: dict, rec: dict, pool: _Pool | None = None) -> None:
    """Give node ``rec`` an id and output names and append it (InvalidSpec if it cannot run)."""
    node_id = 1 + max([0] + [r["id"] for r in spec["nodes"]])
    n_out = {"split": len(rec.get("sizes", [])), "chunk": rec.get("n", 1)}.get(rec["op"], 1)
    rec = {
        "id": node_id,
        **rec,
        "out": [f"v{node_id}" if n_out == 1 else f"v{node_id}_{i}" for i in range(n_out)],
    }
    rec.pop("n", None)
    values = shapes({**spec, "output": "v0", "nodes": spec["nodes"]})
    outs = _infer(rec, [values[n] for n in rec["in"]], spec)
    spec["nodes"].append(rec)
    if pool is not None:
        for name, value in zip(rec["out"], outs):
            pool.add(name, value)


def _finish(spec: dict, last: str, pool: _Pool) -> None:
    """Make ``last`` (or a value derived from it) the output, at the encoder's frame rate."""
    value = pool.values[last]
    if value.tag == BROADCAST:  # a single frame: gate the encoding with it
        if value.channels not in (1, spec["encoder"]["channels"]):
            _append(
                spec,
                {
                    "op": "linear",
                    "in": [last],
                    "channels": spec["encoder"]["channels"],
                    "bias": True,
                },
                pool,
            )
            last = spec["nodes"][-1]["out"][0]
        _append(spec, {"op": "binary", "in": ["v0", last], "fn": "mul"}, pool)
    elif value.tag != "t0":
        _append(spec, {"op": "upsample", "in": [last, "v0"], "mode": "nearest"}, pool)
    spec["output"] = spec["nodes"][-1]["out"][0] if spec["nodes"] else "v0"


def generate(seed: int, max_nodes: int = 12, ops=tuple(OP_WEIGHTS)) -> dict:
    """The random model spec of ``seed``: up to ``max_nodes`` nodes drawn from ``ops``, checked
    to run (float32, finite) at every shape the checks use. Deterministic in its arguments."""
    error = None
    for attempt in range(50):
        try:
            spec = _draft(seed, attempt, max_nodes, ops)
            shapes(spec)
            if runs(spec):
                return spec
        except InvalidSpec as e:  # a generator slip: draw again
            error = e
    raise RuntimeError(f"no valid model for seed {seed} in 50 attempts (last: {error})")


def runs(spec: dict) -> bool:
    """Whether the model of ``spec`` runs with a finite, not all-zero output at every check
    shape, in float32 and float64."""
    try:
        for dtype in (torch.float32, torch.float64):
            model = build(spec, dtype)
            with torch.no_grad():
                for x in check_inputs(spec, dtype, with_onnx=True):
                    y = model(x)
                    if not torch.isfinite(y).all() or float(y.abs().max()) == 0.0:
                        return False
    except InvalidSpec:
        raise
    except Exception:  # an invalid model (a length too short for a kernel...)
        return False
    return True


# ============================================================================================
# source code: the model as a user would write it
# ============================================================================================

HELPERS = {
    "gln": '''
class GlobalLayerNorm(nn.Module):
    """gLN (Conv-TasNet): statistics over channels and time."""

    def __init__(self, channels, eps=1e-8):
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(1, channels, 1))
        self.beta = nn.Parameter(torch.zeros(1, channels, 1))
        self.eps = eps

    def forward(self, x):
        mean = x.mean(dim=(1, 2), keepdim=True)
        var = ((x - mean) ** 2).mean(dim=(1, 2), keepdim=True)
        return self.gamma * (x - mean) / torch.sqrt(var + self.eps) + self.beta
''',
    "cln": '''
class ChannelLayerNorm(nn.Module):
    """cLN: statistics over channels, per frame."""

    def __init__(self, channels, eps=1e-8):
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(1, channels, 1))
        self.beta = nn.Parameter(torch.zeros(1, channels, 1))
        self.eps = eps

    def forward(self, x):
        mean = torch.mean(x, dim=1, keepdim=True)
        var = torch.var(x, dim=1, keepdim=True, unbiased=False)
        return self.gamma * (x - mean) / (var + self.eps).sqrt() + self.beta
''',
    "block": '''
class Block(nn.Module):
    """conv -> PReLU -> gLN-style GroupNorm, with a residual."""

    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv1d(channels, channels, 3, padding=1)
        self.act = nn.PReLU()
        self.norm = nn.GroupNorm(1, channels)

    def forward(self, x):
        return x + self.norm(self.act(self.conv(x)))
''',
}

MAKE_MODEL = '''
def make_model(seed={seed}, dtype=torch.float32):
    """Seeded weights; norm and PReLU parameters and BatchNorm statistics away from their
    defaults (so that slicing the wrong entries shows in the output); eval mode."""
    torch.manual_seed(seed)
    model = Model()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.running_mean.normal_(0, 0.3)
                module.running_var.uniform_(0.5, 2.0)
            if isinstance(module, nn.PReLU):
                module.weight.uniform_(0.05, 0.5)
        for name, p in model.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            owner = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
            norm = isinstance(owner, (nn.modules.batchnorm._BatchNorm, nn.GroupNorm,
                                      nn.LayerNorm)) or leaf in ("gamma", "beta")
            if norm and leaf in ("weight", "gamma"):
                p.uniform_(0.5, 1.5)
            elif norm:
                p.normal_(0, 0.3)
    return model.to(dtype).eval()
'''


class _Writer:
    """Collects a model's ``__init__`` and ``forward`` lines."""

    def __init__(self):
        self.init: list[str] = []
        self.forward: list[str] = []
        self.helpers: set[str] = set()

    def layer(self, name: str, text: str) -> str:
        self.init.append(f"self.{name} = {text}")
        return f"self.{name}"

    def line(self, text: str) -> None:
        self.forward.append(text)


def _kwargs(**kwargs) -> str:
    return "".join(f", {k}={v!r}" for k, v in kwargs.items())


def _emit(rec: dict, ins: list[Value], w: _Writer, spec: dict) -> None:
    """Write node ``rec``: its layers into ``__init__`` and its computation into ``forward``."""
    op, i = rec["op"], rec["id"]
    xs, outs = rec["in"], rec["out"]
    x, y = xs[0], outs[0]
    c = ins[0].channels
    if op in ("conv", "padconv"):
        extra = {}
        if op == "conv":
            for key, default in (("stride", 1), ("padding", 0), ("dilation", 1)):
                if rec.get(key, default) != default:
                    extra[key] = rec[key]
            k = rec["kernel"]
        else:
            k = extra["stride"] = rec["factor"]
        g = _conv_groups(rec, c)
        if g != 1:
            extra["groups"] = g
        if not rec.get("bias", True):
            extra["bias"] = False
        layer = w.layer(f"{op}{i}", f"nn.Conv1d({c}, {rec['channels']}, {k}{_kwargs(**extra)})")
        if op == "padconv":  # Python control flow on the length: not traceable
            f = rec["factor"]
            w.line(f"padded = {x}")
            w.line(f"rest = {x}.shape[-1] % {f}")
            w.line("if rest:")
            w.line(f"    padded = F.pad({x}, (0, {f} - rest))")
            w.line(f"{y} = {layer}(padded)")
        else:
            w.line(f"{y} = {layer}({x})")
    elif op in ("convt", "convt_up"):
        extra = {}
        if op == "convt":
            k = rec["kernel"]
            if k > 1:
                extra["padding"] = (k - 1) // 2
        else:
            s = rec["stride"]
            k = 2 * s
            extra.update(stride=s, padding=s // 2)
        if rec.get("groups", 1) != 1:
            extra["groups"] = rec["groups"]
        if not rec.get("bias", True):
            extra["bias"] = False
        layer = w.layer(
            f"{op}{i}", f"nn.ConvTranspose1d({c}, {rec['channels']}, {k}{_kwargs(**extra)})"
        )
        w.line(f"{y} = {layer}({x})")
        if op == "convt_up":  # crop or pad to the reference's length (a U-Net's skip)
            w.line(f"{y} = F.pad({y}, (0, {xs[1]}.shape[-1] - {y}.shape[-1]))")
    elif op == "linear":
        bias = "" if rec.get("bias", True) else ", bias=False"
        layer = w.layer(f"linear{i}", f"nn.Linear({c}, {rec['channels']}{bias})")
        w.line(f"{y} = {layer}({x}.transpose(1, 2)).transpose(1, 2)")
    elif op == "bn":
        w.line(f"{y} = {w.layer(f'bn{i}', f'nn.BatchNorm1d({c})')}({x})")
    elif op == "gn":
        groups = {"one": 1, "all": c}.get(rec["groups"], rec["groups"])
        w.line(f"{y} = {w.layer(f'gn{i}', f'nn.GroupNorm({groups}, {c})')}({x})")
    elif op == "ln":
        affine = "" if rec["affine"] else ", elementwise_affine=False"
        layer = w.layer(f"ln{i}", f"nn.LayerNorm({c}{affine})")
        w.line(f"{y} = {layer}({x}.transpose(1, 2)).transpose(1, 2)")
    elif op in ("gln", "cln"):
        w.helpers.add(op)
        cls = "GlobalLayerNorm" if op == "gln" else "ChannelLayerNorm"
        w.line(f"{y} = {w.layer(f'{op}{i}', f'{cls}({c})')}({x})")
    elif op == "prelu":
        layer = w.layer(f"prelu{i}", f"nn.PReLU({c})" if rec["per_channel"] else "nn.PReLU()")
        w.line(f"{y} = {layer}({x})")
    elif op == "act":
        fn = rec["fn"]
        if fn == "relu_module":
            w.line(f"{y} = {w.layer(f'act{i}', 'nn.ReLU()')}({x})")
        elif fn == "silu":
            w.line(f"{y} = {w.layer(f'act{i}', 'nn.SiLU()')}({x})")
        else:
            call = {
                "relu": "torch.relu({})",
                "gelu": "F.gelu({})",
                "tanh": "torch.tanh({})",
                "sigmoid": "{}.sigmoid()",
                "leaky_relu": "F.leaky_relu({}, 0.1)",
                "elu": "F.elu({})",
            }[fn]
            w.line(f"{y} = {call.format(x)}")
    elif op == "binary":
        a, b = xs
        text = {
            "add": f"{a} + {b}",
            "mul": f"{a} * {b}",
            "sub": f"{a} - {b}",
            "torch.add": f"torch.add({a}, {b})",
        }[rec["fn"]]
        w.line(f"{y} = {text}")
    elif op == "stat":
        dim = {"channels": "1", "time": "-1", "all": "(1, 2)"}[rec["over"]]
        text = {
            "mean": f"{x}.mean(dim={dim}, keepdim=True)",
            "var": f"{x}.var(dim={dim}, keepdim=True)",
            "std": f"torch.std({x}, dim={dim}, keepdim=True)",
            "max": f"{x}.max(dim={dim}, keepdim=True).values",
            "amax": f"torch.amax({x}, dim={dim}, keepdim=True)",
            "logsumexp": f"torch.logsumexp({x}, dim={dim}, keepdim=True)",
        }[rec["fn"]]
        w.line(f"{y} = {text}")
    elif op == "se":  # squeeze-and-excitation: a gate per channel from the time average
        layer = w.layer(f"se{i}", f"nn.Conv1d({c}, {c}, 1)")
        w.line(f"{y} = {x} * torch.sigmoid({layer}({x}.mean(dim=-1, keepdim=True)))")
    elif op == "softmax":
        if rec["style"] == "module":
            w.line(f"{y} = {w.layer(f'softmax{i}', 'nn.Softmax(dim=1)')}({x})")
        else:
            fn = "torch.softmax" if rec["style"] == "torch" else "F.softmax"
            w.line(f"{y} = {fn}({x}, dim=1)")
    elif op == "cat":
        w.line(f"{y} = torch.cat([{', '.join(xs)}], dim=1)")
    elif op == "split":
        call = (
            f"{x}.split({rec['sizes']}, dim=1)"
            if rec["style"] == "method"
            else f"torch.split({x}, {rec['sizes']}, dim=1)"
        )
        w.line(f"{', '.join(outs)} = {call}")
    elif op == "chunk":
        n = len(outs)
        call = (
            f"{x}.chunk({n}, dim=1)"
            if rec["style"] == "method"
            else f"torch.chunk({x}, {n}, dim=1)"
        )
        w.line(f"{', '.join(outs)} = {call}")
    elif op == "slice":
        step = rec.get("step", 1)
        w.line(f"{y} = {x}[:, {rec['start']}:{rec['stop']}{f':{step}' if step != 1 else ''}]")
    elif op == "view4d":
        k, inner = rec["k"], c // rec["k"]
        dims = (k, inner) if rec["where"] == "outer" else (inner, k)
        size = f"{dims[0]}, {dims[1]}" if rec["literal"] else f"{dims[0]}, -1"
        dim = 1 if rec["where"] == "outer" else 2
        w.line(f"{y} = {x}.view({x}.shape[0], {size}, {x}.shape[-1])")
        if rec["reduce"] == "softmax":
            w.line(f"{y} = torch.softmax({y}, dim={dim}).reshape({x}.shape)")
        elif rec["reduce"] == "amax":
            w.line(f"{y} = {y}.amax(dim={dim})")
        else:
            w.line(f"{y} = {y}.{rec['reduce']}(dim={dim})")
    elif op == "fold":  # fold a channel factor into the batch, a layer per piece, unfold
        k, m = rec["k"], rec["channels"]
        layer = w.layer(f"fold{i}", f"nn.Conv1d({c // k}, {m}, 3, padding=1)")
        w.line(f"batch = {x}.shape[0]")
        if rec["literal"]:
            w.line(f"{y} = {x}.reshape(batch * {k}, {c // k}, -1)")
            w.line(f"{y} = {layer}({y})")
            w.line(f"{y} = {y}.reshape(batch, {k * m}, -1)")
        else:
            w.line(f"{y} = {x}.reshape(batch * {k}, -1, {x}.shape[-1])")
            w.line(f"{y} = {layer}({y})")
            w.line(f"{y} = {y}.reshape(batch, -1, {y}.shape[-1])")
    elif op == "mha":
        first = rec["batch_first"]
        extra = {"batch_first": True} if first else {}
        kv = None
        if rec["cross"]:
            kv = xs[1]
            ck = ins[1].channels
            if ck != c:
                extra.update(kdim=ck, vdim=ck)
        layer = w.layer(f"mha{i}", f"nn.MultiheadAttention({c}, {rec['heads']}{_kwargs(**extra)})")
        to_seq = ".transpose(1, 2)" if first else ".permute(2, 0, 1)"
        w.line(f"q = {x}{to_seq}")
        if kv is not None:
            w.line(f"kv = {kv}{to_seq}")
        source = "kv" if kv is not None else "q"
        weights = "" if rec["need_weights"] else ", need_weights=False"
        w.line(f"{y}, _ = {layer}(q, {source}, {source}{weights})")
        w.line(f"{y} = {y}" + (".transpose(1, 2)" if first else ".permute(1, 2, 0)"))
    elif op == "rnn":
        cls = {"lstm": "nn.LSTM", "gru": "nn.GRU"}[rec["cell"]]
        extra = {}
        if rec["layers"] > 1:
            extra["num_layers"] = rec["layers"]
        if rec["bidirectional"]:
            extra["bidirectional"] = True
        if rec["batch_first"]:
            extra["batch_first"] = True
        layer = w.layer(f"{rec['cell']}{i}", f"{cls}({c}, {rec['hidden']}{_kwargs(**extra)})")
        if rec["batch_first"]:
            w.line(f"{y}, _ = {layer}({x}.transpose(1, 2))")
            w.line(f"{y} = {y}.transpose(1, 2)")
        else:
            w.line(f"{y}, _ = {layer}({x}.permute(2, 0, 1))")
            w.line(f"{y} = {y}.permute(1, 2, 0)")
    elif op == "shared":
        w.line(f"{y} = self.{rec['module']}({x})")
        for _ in range(rec.get("calls", 1) - 1):
            w.line(f"{y} = self.{rec['module']}({y})")
    elif op == "pool":
        f = rec["factor"]
        if rec["kind"] == "avg":
            w.line(f"{y} = F.avg_pool1d({x}, {f})")
        else:
            w.line(f"{y} = {w.layer(f'pool{i}', f'nn.MaxPool1d({f})')}({x})")
    elif op == "upsample":
        mode = rec["mode"]
        w.line(f"{y} = F.interpolate({x}, size={xs[1]}.shape[-1], mode={mode!r})")
    elif op == "norule":
        d = rec["dim"]
        text = {
            "cumsum": f"torch.cumsum({x}, dim={d})",
            "flip": f"torch.flip({x}, dims=[{d}])",
            "sort": f"torch.sort({x}, dim={d}).values",
            "cummax": f"torch.cummax({x}, dim={d}).values",
            "roll": f"torch.roll({x}, 1, dims={d})",
        }[rec["fn"]]
        w.line(f"{y} = {text}")
    else:
        raise InvalidSpec(f"unknown op {op!r}")


def source(spec: dict, live_only: bool = False) -> str:
    """Python source of the model: ``Model`` and ``make_model(seed, dtype)``. ``live_only``
    leaves out the dead branches (for a readable regression test)."""
    values = shapes(spec)
    w = _Writer()
    enc = spec["encoder"]
    e, s, n = enc["channels"], enc["stride"], spec["n_src"]
    w.layer("encoder", f"nn.Conv1d(1, {e}, {2 * s}, stride={s}, bias=False)")
    for module in spec.get("shared", []):
        c = module["channels"]
        if module["kind"] == "block":
            w.helpers.add("block")
            w.layer(module["name"], f"Block({c})")
        else:
            w.layer(module["name"], f"nn.Conv1d({c}, {c}, 3, padding=1)")
    if spec.get("unused_module"):
        w.layer("unused", f"nn.Linear({e}, {e})")  # defined, never called
    encode = "self.encoder(wav.unsqueeze(1))"
    w.line(f"v0 = torch.relu({encode})" if enc["activation"] == "relu" else f"v0 = {encode}")
    nodes = live_nodes(spec) if live_only else spec["nodes"]
    for rec in nodes:
        _emit(rec, [values[name] for name in rec["in"]], w, spec)
    out = spec["output"]
    c = values[out].channels
    kind = spec["decoder"]["kind"]
    if kind in ("convt", "convt_mono"):
        w.layer(
            "decoder",
            f"nn.ConvTranspose1d({c}, {n if kind == 'convt' else 1}, {2 * s}, "
            f"stride={s}, bias=False)",
        )
        w.line(f"return self.decoder({out})" + (".squeeze(1)" if kind == "convt_mono" else ""))
    elif kind == "head":
        w.layer("decoder", f"nn.Conv1d({c}, {n}, 1)")
        w.line(f"return self.decoder({out})" + (".squeeze(1)" if n == 1 else ""))
    else:  # a mask per source on the encoding, viewed [B, n_src, E, T]
        w.layer("mask", f"nn.Conv1d({c}, {n * e}, 1)")
        w.layer("decoder", f"nn.ConvTranspose1d({e}, 1, {2 * s}, stride={s}, bias=False)")
        w.line(f"m = torch.sigmoid(self.mask({out})).view({out}.shape[0], {n}, {e}, -1)")
        w.line("masked = v0.unsqueeze(1) * m")
        if kind == "mask":  # sources folded into the batch
            w.line(f"y = self.decoder(masked.view(-1, {e}, masked.shape[-1]))")
            w.line(f"return y.view(wav.shape[0], {n}, -1)")
        else:
            w.line(
                f"return torch.stack([self.decoder(masked[:, i]) for i in range({n})], "
                "dim=1).squeeze(2)"
            )
    lines = [
        '"""A generated model (tests/random_models.py)."""',
        "import torch",
        "import torch.nn as nn",
        "import torch.nn.functional as F",
        "",
    ]
    for helper in ("gln", "cln", "block"):
        if helper in w.helpers:
            lines += [HELPERS[helper].strip("\n"), "", ""]
    lines += [
        "class Model(nn.Module):",
        "    sample_rate = 8000",
        f"    n_src = {n}",
        "",
        "    def __init__(self):",
        "        super().__init__()",
    ]
    lines += [f"        {t}" for t in w.init]
    lines += ["", "    def forward(self, wav):"]
    lines += [f"        {t}" for t in w.forward]
    lines += ["", MAKE_MODEL.format(seed=spec["seed"]).strip("\n"), ""]
    return "\n".join(lines)


_CACHE = Path(tempfile.gettempdir()) / "sepfx_random_models"


def load_source(text: str):
    """Import model source ``text`` as a module (from a file, so that ``inspect`` and
    tracebacks see the code)."""
    digest = hashlib.sha1(text.encode()).hexdigest()[:16]
    name = f"sepfx_random_model_{digest}"
    if name in sys.modules:
        return sys.modules[name]
    _CACHE.mkdir(parents=True, exist_ok=True)
    path = _CACHE / f"{name}.py"
    if not path.exists() or path.read_text() != text:
        path.write_text(text)
    module_spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module
    module_spec.loader.exec_module(module)
    return module


def build(spec: dict, dtype: torch.dtype = torch.float32) -> nn.Module:
    """The model of ``spec`` (seeded weights, eval mode) in ``dtype``."""
    return load_source(source(spec)).make_model(spec["seed"], dtype)


def check_inputs(spec: dict, dtype=torch.float32, with_onnx: bool = False):
    """The example input (batch 1) and a batch 2 input at an odd length (a multiple of no
    stride); with ``with_onnx``, a third shape (batch 3, another odd length) for ONNX."""
    length = spec["length"]
    shapes_ = [(1, length), (2, length + 2 * (length // 5) + 37)]
    if with_onnx:
        shapes_.append((3, 2 * length + 7))
    return [_wav(b, t, 11 + i, dtype) for i, (b, t) in enumerate(shapes_)]


def _wav(batch: int, length: int, seed: int, dtype) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, length, generator=generator, dtype=torch.float64).to(dtype)


# ============================================================================================
# checks
# ============================================================================================

F32_TOLERANCE = 1e-5  # relative to the output's scale (DESIGN.md, invariant 1)
F64_TOLERANCE = 1e-9
ONNX_TOLERANCE = 1e-4  # invariant 4


@dataclass
class Failure:
    kind: str  # "severity:what", e.g. "silent:gated_vs_slim", "loud:slim:SlimError"
    detail: str

    @property
    def severity(self) -> str:
        return self.kind.split(":", 1)[0]


@dataclass
class Outcome:
    """What ``check`` found for one model."""

    seed: int
    failures: list[Failure] = field(default_factory=list)
    checks: int = 0  # comparisons made (one per keep set, input and precision, and so on)
    frozen: list[tuple[str, str]] = field(default_factory=list)  # (axis label, reason)
    groups: int = 0
    traced: bool | None = None
    onnx: bool = False
    latency: float | None = None  # slim / dense time measured by a latency compile, if any
    seconds: float = 0.0

    def kinds(self, severities=("silent", "crash", "loud", "note")) -> list[str]:
        return [f.kind for f in self.failures if f.severity in severities]

    @property
    def defects(self) -> list[Failure]:
        """Silent failures and crashes: what must not happen."""
        return [f for f in self.failures if f.severity in ("silent", "crash")]


class _Found(Exception):
    """Raised by ``_Checker.fail`` when the failure kind being looked for was found."""


def relative_error(expected: torch.Tensor, got: torch.Tensor) -> float:
    """Max abs difference over the max abs expected value, where both are finite; inf where the
    shapes differ or one is finite where the other is not."""
    if expected.shape != got.shape:
        return math.inf
    finite_e, finite_g = torch.isfinite(expected), torch.isfinite(got)
    if not torch.equal(finite_e, finite_g):
        return math.inf
    if not finite_e.any():
        return 0.0
    e, g = expected[finite_e].double(), got[finite_e].double()
    return float((e - g).abs().max() / e.abs().max().clamp_min(1e-30))


def _run(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x)


def snapshot(model: nn.Module) -> dict:
    """Everything of the caller's model that sepfx must leave as it is (invariant 5)."""
    module = sys.modules.get(type(model).__module__)
    return {
        "state": {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()},
        "objects": {
            k: (id(v), v.requires_grad) for k, v in model.state_dict(keep_vars=True).items()
        },
        "modes": [(name, m.training) for name, m in model.named_modules()],
        "classes": [(name, type(m)) for name, m in model.named_modules()],
        "attributes": {name: sorted(vars(m)) for name, m in model.named_modules()},
        "hooks": {
            name: [
                len(getattr(m, h))
                for h in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks")
            ]
            for name, m in model.named_modules()
        },
        "globals": {k: id(v) for k, v in vars(module).items()} if module else {},
    }


def changes(model: nn.Module, before: dict) -> list[str]:
    """What differs between ``model`` and its ``snapshot``."""
    after = snapshot(model)
    out = []
    for key in ("objects", "modes", "classes", "attributes", "hooks", "globals"):
        if after[key] != before[key]:
            out.append(key)
    state = before["state"]
    now = {k: v.detach() for k, v in model.state_dict(keep_vars=True).items()}
    if state.keys() != now.keys():
        out.append("state_dict keys")
    else:
        for k, v in state.items():
            w = now[k]
            if v.dtype != w.dtype or v.shape != w.shape or not torch.equal(v, w):
                out.append(f"state_dict[{k}]")
    return out


def _keep_sets(analysis, rng: np.random.Generator) -> dict[str, dict[int, list[int]]]:
    """One unit per group (at least the group's min_size), all units, and two random subsets."""
    sets = {"one": {}, "all": {}, "random1": {}, "random2": {}}
    for g in analysis.groups:
        least = max(1, g.min_size)
        pick = lambda n: sorted(int(i) for i in rng.choice(g.size, n, replace=False))  # noqa: E731
        sets["one"][g.index] = pick(least)
        sets["all"][g.index] = list(range(g.size))
        for name in ("random1", "random2"):
            sets[name][g.index] = pick(int(rng.integers(least, g.size + 1)))
    return sets


# parameter entries that a keep set leaves, per module type, from the kept element indices of
# the module's channel axes (an independent count of what slimming should leave)
def _kept_entries(module: nn.Module, kept) -> int | None:
    """``kept(axis, size)`` -> the kept indices of that axis of ``module``."""

    def n(axis, size):
        return len(kept(axis, size))

    own = sum(p.numel() for p in module.parameters(recurse=False))
    if own == 0:
        return 0
    if isinstance(module, (nn.Conv1d, nn.ConvTranspose1d)):
        c_in, c_out, g = module.in_channels, module.out_channels, module.groups
        k_in, k_out = kept("in", c_in), kept("out", c_out)
        # a weight entry exists where its input and output channel are in the same conv group
        # (the same count for a transposed convolution, whose weight is [in, out / g, k])
        per_in, per_out = c_in // g, c_out // g
        in_groups = np.bincount(np.asarray(k_in, dtype=int) // per_in, minlength=g)
        out_groups = np.bincount(np.asarray(k_out, dtype=int) // per_out, minlength=g)
        total = int((in_groups * out_groups).sum()) * module.kernel_size[0]
        return total + (len(k_out) if module.bias is not None else 0)
    if isinstance(module, nn.Linear):
        i, o = n("in", module.in_features), n("out", module.out_features)
        return i * o + (o if module.bias is not None else 0)
    if isinstance(module, (nn.BatchNorm1d, nn.GroupNorm)):
        size = module.num_features if isinstance(module, nn.BatchNorm1d) else module.num_channels
        return (2 if module.weight is not None else 0) * n("channels", size)
    if isinstance(module, nn.LayerNorm):
        if module.weight is None:
            return 0
        return (1 + (module.bias is not None)) * n("dim0", module.normalized_shape[0])
    if isinstance(module, nn.PReLU):
        return 1 if module.num_parameters == 1 else n("weight", module.num_parameters)
    if isinstance(module, (nn.LSTM, nn.GRU)):
        gates = 4 if isinstance(module, nn.LSTM) else 3
        dirs = 2 if module.bidirectional else 1
        h = n("hidden", module.hidden_size)
        total = 0
        for layer in range(module.num_layers):
            inputs = n("input", module.input_size) if layer == 0 else dirs * h
            total += dirs * (gates * h * inputs + gates * h * h + 2 * gates * h)
        return total
    if isinstance(module, nn.MultiheadAttention):
        e = module.embed_dim
        heads, out = n("heads", e), n("out", e)
        if module._qkv_same_embed_dim:
            total = 3 * heads * n("in", e)
        else:
            total = heads * (n("in_q", e) + n("in_k", module.kdim) + n("in_v", module.vdim))
        total += 3 * heads if module.in_proj_bias is not None else 0
        return total + out * heads + (out if module.out_proj.bias is not None else 0)
    if set(dict(module.named_parameters(recurse=False))) <= {"gamma", "beta"}:
        # the hand-written gLN / cLN: [1, C, 1] parameters, an attribute axis each
        return sum(
            len(kept(("attr", name), p.shape[1]))
            for name, p in module.named_parameters(recurse=False)
        )
    return None


def implied_params(analysis, keep: dict, modules: list[str]) -> int | None:
    """The parameter count the keep set implies for the dense model's ``modules`` (qualified
    names): each parameter entry whose channel indices are all kept. None where a module type
    is not known here."""
    model = analysis.capture.root
    removed: dict[tuple, set[int]] = {}  # (module, axis) or ("attr", name) -> pruned indices
    for g in analysis.groups:
        pruned = np.setdiff1d(np.arange(g.size), np.asarray(keep[g.index], dtype=int))
        for key, positions in g.positions.items():
            if key[0] == "module":
                where = (key[1], key[2])
            elif key[0] == "attr":
                where = (key[1], "attr")
            else:
                continue
            removed.setdefault(where, set()).update(int(i) for i in positions[pruned].ravel())
    total = 0
    for name in modules:
        module = model.get_submodule(name)

        def kept(axis, size, name=name):
            if isinstance(axis, tuple):  # an attribute: ("attr", parameter name)
                where = (f"{name}.{axis[1]}" if name else axis[1], "attr")
            else:
                where = (name, axis)
            return sorted(set(range(size)) - removed.get(where, set()))

        count = _kept_entries(module, kept)
        if count is None:
            return None
        total += count
    return total


def _live_modules(spec: dict, model: nn.Module, traced: bool) -> list[str]:
    """Qualified names of the modules whose parameters the slim model should hold: the ones the
    live nodes use (a traced model drops dead code), or all (eager shells keep it)."""
    # an attention's out_proj is counted with the attention (its axes are the attention's)
    names = [
        name
        for name, m in model.named_modules()
        if not (
            name.endswith(".out_proj")
            and isinstance(model.get_submodule(name.rsplit(".", 1)[0]), nn.MultiheadAttention)
        )
    ]
    if not traced:
        return names
    live = {"encoder", "decoder", "mask"}
    for rec in live_nodes(spec):
        live.add(rec["module"] if rec["op"] == "shared" else f"{rec['op']}{rec['id']}")
        if rec["op"] == "rnn":
            live.add(f"{rec['cell']}{rec['id']}")
        if rec["op"] == "act":
            live.add(f"act{rec['id']}")
    return [n for n in names if n and n.split(".")[0] in live]


def normalised_reason(reason: str) -> str:
    """A frozen axis's reason without the node it names: "no rule for function torch.sort"."""
    return reason.split("): ", 1)[1] if "): " in reason else reason


class _Checker:
    def __init__(self, spec: dict, outcome: Outcome, look_for: str | None):
        self.spec = spec
        self.outcome = outcome
        self.look_for = look_for

    def fail(self, kind: str, detail: str) -> None:
        self.outcome.failures.append(Failure(kind, detail))
        if self.look_for is not None and kind == self.look_for:
            raise _Found

    def guard(self, stage: str, call, *args, **kwargs):
        """``call(...)``, or None after recording its exception as loud (a sepfx error) or a
        crash (any other)."""
        from sepfx.errors import SepfxError

        try:
            return call(*args, **kwargs)
        except _Found:
            raise
        except SepfxError as error:
            self.fail(f"loud:{stage}:{type(error).__name__}", _first_line(error))
        except Exception as error:  # not a sepfx error: a defect
            self.fail(
                f"crash:{stage}:{type(error).__name__}",
                _first_line(error) + "\n" + traceback.format_exc(limit=-4),
            )
        return None

    def run(self, stage: str, model: nn.Module, x: torch.Tensor):
        """``model(x)``, or None after recording why it did not run (a model sepfx handed out
        that does not run where the dense model does is a defect)."""
        return self.guard(stage, _run, model, x)

    def count(self, n: int = 1) -> None:
        self.outcome.checks += n


def _first_line(error: Exception) -> str:
    text = str(error).strip().splitlines()
    return (text[0] if text else type(error).__name__)[:400]


def check(
    spec: dict,
    *,
    onnx: bool | None = None,
    compile_budget: bool = True,
    look_for: str | None = None,
) -> Outcome:
    """Run every check on the model of ``spec``; ``onnx`` (default: 1 seed in 5) adds the ONNX
    Runtime parity check. With ``look_for`` (a failure kind) it stops once that kind is found
    (for the minimiser)."""
    import sepfx

    start = time.perf_counter()
    outcome = Outcome(spec["seed"])
    c = _Checker(spec, outcome, look_for)
    if onnx is None:
        onnx = spec["seed"] % 5 == 0
    try:
        _check(spec, c, sepfx, onnx, compile_budget)
    except _Found:
        pass
    outcome.seconds = time.perf_counter() - start
    return outcome


def _check(spec, c: _Checker, sepfx, onnx: bool, compile_budget: bool) -> None:
    rng = np.random.default_rng(spec["seed"])
    reference = build(spec)  # the dense model in eval mode, never given to sepfx
    model = build(spec)
    if spec["seed"] % 4 == 1:  # the caller's model may be in training mode: it must stay so
        model.train()
    before = snapshot(model)
    inputs = check_inputs(spec)
    analysis = c.guard("analyze", sepfx.analyze, model, inputs[0])
    if analysis is None:
        return
    o = c.outcome
    o.traced = analysis.capture.traced_whole
    o.groups = len(analysis.groups)
    o.frozen = [(f.label, f.reason) for f in analysis.channels.frozen]
    dense = [_run(reference, x) for x in inputs]
    lazy64 = {}

    def analysis64():
        """The float64 model and its analysis, made once when first needed."""
        if "a" not in lazy64:
            model64 = build(spec, torch.float64)
            lazy64["model"] = model64
            lazy64["a"] = c.guard(
                "analyze_f64", sepfx.analyze, model64, check_inputs(spec, torch.float64)[0]
            )
            if lazy64["a"] is not None and [(g.size, g.min_size) for g in lazy64["a"].groups] != [
                (g.size, g.min_size) for g in analysis.groups
            ]:
                c.fail("silent:groups_differ_f64", "the float64 analysis finds other groups")
                lazy64["a"] = None
        return lazy64["a"]

    def compare(stage, reference, candidate, keep, label):
        """``candidate`` against ``reference`` at both inputs in float32; where they differ,
        the same comparison in float64 tells a defect from float32 rounding."""
        for x in inputs:
            c.count()
            expected = c.run("run_model" if stage == "capture" else "run_gated", reference, x)
            got = c.run("run_gated" if stage == "capture" else "run_slim", candidate, x)
            if expected is None or got is None:
                return
            error = relative_error(expected, got)
            if error <= F32_TOLERANCE:
                continue
            a64 = analysis64()
            if a64 is None:
                return
            x64 = x.double()
            ref64 = lazy64["model"] if stage == "capture" else c.guard("gated_f64", a64.gated, keep)
            got64 = (
                c.guard("gated_f64", a64.gated, a64.keep_all())
                if stage == "capture"
                else c.guard("slim_f64", a64.slim, keep)
            )
            if got64 is None or ref64 is None:
                return
            c.count()
            expected, got = c.run("run_gated_f64", ref64, x64), c.run("run_slim_f64", got64, x64)
            if expected is None or got is None:
                return
            error64 = relative_error(expected, got)
            if error64 <= F64_TOLERANCE:
                c.fail(
                    f"note:{stage}_f32_rounding",
                    f"{label} at {list(x.shape)}: float32 {error:.3g}, float64 {error64:.3g}",
                )
            else:
                c.fail(
                    f"silent:{stage}",
                    f"{label} at {list(x.shape)}: relative error "
                    f"{error:.3g} (float64: {error64:.3g})",
                )
            return

    # 1. capture: the gated model with every unit kept is the model
    gated_all = c.guard("gated", analysis.gated, analysis.keep_all())
    if gated_all is not None:
        compare("capture", reference, gated_all, None, "keep all")

    # 2. no-rule ops are frozen and named
    reasons = " | ".join(r for _, r in o.frozen)
    for rec in live_nodes(spec):
        if rec["op"] == "norule" and f"torch.{rec['fn']}" not in reasons:
            c.count()
            c.fail(
                "silent:no_rule_not_frozen",
                f"torch.{rec['fn']} (node {rec['id']}) is not named among the frozen axes",
            )

    # 3. hard-gated == slim for several keep sets; finite; parameter counts
    keep_sets = _keep_sets(analysis, rng)
    modules = _live_modules(spec, analysis.capture.root, bool(o.traced))
    for label, keep in keep_sets.items():
        slim = c.guard(f"slim_{label}" if label == "one" else "slim", analysis.slim, keep)
        gated = c.guard("gated", analysis.gated, keep)
        if slim is None or gated is None:
            continue
        compare("gated_vs_slim", gated, slim, keep, f"keep set {label}")
        for x, d in zip(inputs, dense):
            c.count()
            y = c.run("run_slim", slim, x)
            if (
                y is not None
                and y.shape == d.shape
                and bool((torch.isfinite(d) & ~torch.isfinite(y)).any())
            ):
                c.fail("silent:non_finite", f"keep set {label} at {list(x.shape)}")
        actual = sum(p.numel() for p in slim.parameters())
        c.count()
        if slim.sepfx_report.params != actual:
            c.fail(
                "silent:params_report",
                f"keep set {label}: report {slim.sepfx_report.params}, slim model {actual}",
            )
        implied = implied_params(analysis, keep, modules)
        if implied is not None:
            c.count()
            if implied != actual:
                c.fail(
                    "silent:params_implied",
                    f"keep set {label}: the keep set implies "
                    f"{implied}, the slim model has {actual}",
                )

    # 4. float64: tighter, for the one-unit and a random keep set
    a64 = analysis64()
    if a64 is not None:
        inputs64 = check_inputs(spec, torch.float64)
        for label in ("one", "random1", "random2"):
            keep = keep_sets[label]
            slim = c.guard("slim_f64", a64.slim, keep)
            if slim is None:
                continue
            gated = c.guard("gated_f64", a64.gated, keep)
            if gated is None:
                continue
            for x in inputs64:
                c.count()
                expected = c.run("run_gated_f64", gated, x)
                got = c.run("run_slim_f64", slim, x)
                if expected is None or got is None:
                    break
                error = relative_error(expected, got)
                if error > F64_TOLERANCE:
                    c.fail(
                        "silent:gated_vs_slim_f64",
                        f"keep set {label} at {list(x.shape)}: relative error {error:.3g}",
                    )

    # 5. compile, data-free
    if compile_budget:
        budget = float(rng.choice([0.3, 0.5, 0.7]))
        compiled = c.guard(
            "compile", sepfx.compile, model, budget=budget, example_input=inputs[0], progress=False
        )
        reachable = (
            re.search(r"use a budget >= ([0-9.]+)", c.outcome.failures[-1].detail)
            if compiled is None and c.outcome.failures
            else None
        )
        if reachable and float(reachable.group(1)) < 1:  # again, at the budget it names
            budget = float(reachable.group(1))
            compiled = c.guard(
                "compile_at_reachable_budget",
                sepfx.compile,
                model,
                budget=budget,
                example_input=inputs[0],
                progress=False,
            )
        if compiled is not None:
            c.count()
            ratio = compiled.sepfx_report.macs_ratio
            if ratio > budget + 1e-9:
                c.fail("silent:budget_exceeded", f"budget {budget}: MACs ratio {ratio:.4f}")
            elif ratio < budget - 0.02 and not any(
                "does not allow" in n for n in compiled.sepfx_report.notes
            ):
                c.fail("note:budget_undershoot", f"budget {budget}: MACs ratio {ratio:.4f}")
            for x, d in zip(inputs, dense):
                c.count()
                y = c.run("run_compiled", compiled, x)
                if (
                    y is not None
                    and y.shape == d.shape
                    and bool((torch.isfinite(d) & ~torch.isfinite(y)).any())
                ):
                    c.fail("silent:non_finite_compiled", f"budget {budget} at {list(x.shape)}")
            # the same call gives the same model (invariant 5)
            again = c.guard(
                "compile",
                sepfx.compile,
                model,
                budget=budget,
                example_input=inputs[0],
                progress=False,
            )
            if again is not None:
                c.count()
                kept = [g.kept for g in compiled.sepfx_report.groups]
                first, second = (
                    c.run("run_compiled", compiled, inputs[1]),
                    c.run("run_compiled", again, inputs[1]),
                )
                if kept != [g.kept for g in again.sepfx_report.groups] or (
                    first is not None and second is not None and not torch.equal(first, second)
                ):
                    c.fail(
                        "silent:compile_not_deterministic",
                        f"budget {budget}: kept {kept} "
                        f"then {[g.kept for g in again.sepfx_report.groups]}",
                    )

    # 5b. compile under a latency budget (PyTorch on the CPU, no cache), 1 seed in 4: the
    # measured ratio holds the request (timing noise may make it a loud SlimError, never a
    # silent miss) and the slim model runs where the dense model does
    if compile_budget and spec["seed"] % 4 == 2:
        request = 0.7
        timed = c.guard(
            "compile_latency",
            sepfx.compile,
            model,
            latency=request,
            target="torch-cpu",
            cache=False,
            example_input=inputs[0],
            progress=False,
        )
        reachable = (
            re.search(r"ask for latency >= ([0-9.]+)", c.outcome.failures[-1].detail)
            if timed is None and c.outcome.failures
            else None
        )
        if reachable and float(reachable.group(1)) + 0.05 < 1:  # again, at what it names
            request = float(reachable.group(1)) + 0.05
            timed = c.guard(
                "compile_latency_at_reachable",
                sepfx.compile,
                model,
                latency=request,
                target="torch-cpu",
                cache=False,
                example_input=inputs[0],
                progress=False,
            )
        if timed is not None:
            c.count()
            row = timed.sepfx_report.latency
            o.latency = None if row is None else row.measured
            if row is None or row.measured > request:
                c.fail("silent:latency_exceeded", f"latency {request}: report {row}")
            for x, d in zip(inputs, dense):
                c.count()
                y = c.run("run_compiled", timed, x)
                if y is not None and y.shape != d.shape:
                    c.fail("silent:latency_shape", f"{list(y.shape)} vs {list(d.shape)}")

    # 6. the caller's model is unchanged
    c.count()
    changed = changes(model, before)
    if changed:
        c.fail("silent:caller_modified", ", ".join(changed[:5]))

    # 7. ONNX Runtime parity at a third shape
    if onnx:
        o.onnx = True
        slim = c.guard("slim", analysis.slim, keep_sets["random1"])
        if slim is not None:
            _check_onnx(spec, c, sepfx, slim)


def _check_onnx(spec, c: _Checker, sepfx, slim) -> None:
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "slim.onnx"
        result = c.guard("export", sepfx.export_onnx, slim, path)
        if result is None:
            return
        c.count(len(result.errors))
        worst = max(result.errors.values(), default=0.0)
        if worst > ONNX_TOLERANCE:
            c.fail("silent:onnx_mismatch", f"export_onnx's own check: {result.errors}")
        if not (result.dynamic_batch and result.dynamic_time):
            c.fail(
                "note:onnx_static",
                f"dynamic batch {result.dynamic_batch}, time {result.dynamic_time}",
            )
            return
        x = check_inputs(spec, with_onnx=True)[2]
        options = ort.SessionOptions()
        options.log_severity_level = 4
        options.intra_op_num_threads = 1
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        c.count()
        try:
            got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
        except Exception as error:  # ONNX Runtime refuses a shape the export claims dynamic
            c.fail("silent:onnx_refuses_shape", f"{list(x.shape)}: {_first_line(error)}")
            return
        expected = c.run("run_slim", slim, x)
        if expected is None:
            return
        error = relative_error(expected, torch.from_numpy(got))
        if error > ONNX_TOLERANCE:
            c.fail("silent:onnx_mismatch", f"at {list(x.shape)}: relative error {error:.3g}")


# ============================================================================================
# the delta-debugger: a failing spec made small
# ============================================================================================


def _valid(spec: dict) -> bool:
    try:
        shapes(spec)
    except (InvalidSpec, KeyError, TypeError, IndexError):
        return False
    return runs(spec)


def _without_dead_code(spec: dict) -> dict:
    out = copy.deepcopy(spec)
    out["nodes"] = copy.deepcopy(live_nodes(spec))
    used = {r["module"] for r in out["nodes"] if r["op"] == "shared"}
    out["shared"] = [m for m in out.get("shared", []) if m["name"] in used]
    out["unused_module"] = False
    return out


def _substitutes(spec: dict, index: int) -> list[dict]:
    """Specs without node ``index``: each of its outputs replaced by an earlier value of the
    same shape (its own inputs first), else of the same length (the readers' channel counts
    follow, where they can: ``_valid`` tells)."""
    values = shapes(spec)
    rec = spec["nodes"][index]
    earlier = list(values)[: list(values).index(rec["out"][0])]
    read = {n for r in spec["nodes"] for n in r["in"]} | {spec["output"]}
    out = []
    for same in (lambda a, b: a == b, lambda a, b: a.tag == b.tag):
        renamed = {}
        for name in rec["out"]:
            if name not in read:  # nobody reads it: nothing to replace
                continue
            fits = [n for n in rec["in"] + earlier if same(values[n], values[name])]
            if not fits:
                break
            renamed[name] = fits[0]
        else:
            out.append(_renamed(spec, index, renamed))
    return out


def _renamed(spec: dict, index: int, renamed: dict[str, str]) -> dict:
    """``spec`` without node ``index``, its readers reading ``renamed`` values instead."""
    out = copy.deepcopy(spec)
    del out["nodes"][index]
    for r in out["nodes"]:
        r["in"] = [renamed.get(n, n) for n in r["in"]]
    out["output"] = renamed.get(out["output"], out["output"])
    used = {r["module"] for r in out["nodes"] if r["op"] == "shared"}
    out["shared"] = [m for m in out.get("shared", []) if m["name"] in used]
    return out


# simpler settings tried for each field of a node, first the simplest
_SIMPLER = {
    "bias": [False],
    "groups": [1],
    "mode": ["dense"],
    "dilation": [1],
    "layers": [1],
    "bidirectional": [False],
    "heads": [1],
    "need_weights": [False],
    "per_channel": [False],
    "batch_first": [True],
    "literal": [True],
    "affine": [True],
    "step": [1],
    "fn": ["relu", "add", "mean", "cumsum"],
    "style": ["method", "torch"],
    "channels": [1, 2, 4, 6, 8, 12],
    "hidden": [2, 4, 6],
    "kernel": [1, 3],
    "calls": [1, 2],
}


def _options(rec: dict, key: str) -> list:
    """The simpler settings of field ``key`` of node ``rec``, simplest first."""
    if key == "mode" and rec["op"] != "conv":
        return ["nearest"]  # upsampling's mode
    return _SIMPLER[key]


def _reductions(spec: dict):
    """Candidate specs smaller or simpler than ``spec``, the largest cuts first."""
    yield _without_dead_code(spec)
    values = shapes(spec)
    # an earlier value (at the encoder's rate) as the output: everything after it goes
    for name, value in values.items():
        if name != spec["output"] and value.tag == "t0":
            yield _without_dead_code({**spec, "output": name})
    for index in reversed(range(len(spec["nodes"]))):
        yield from _substitutes(spec, index)
    simpler_decoders = [d for d in ("convt", "head") if d != spec["decoder"]["kind"]]
    for kind in simpler_decoders:
        yield {**spec, "decoder": {"kind": kind}}
    if spec["n_src"] > 1:
        yield {**spec, "n_src": 1}
    if spec["encoder"]["activation"] != "none":
        yield {**spec, "encoder": {**spec["encoder"], "activation": "none"}}
    for e in CHANNELS:
        if e < spec["encoder"]["channels"]:
            yield {**spec, "encoder": {**spec["encoder"], "channels": e}}
    for index, rec in enumerate(spec["nodes"]):
        for key, options in _SIMPLER.items():
            if key not in rec:
                continue
            options = _options(rec, key)
            for option in options:
                smaller = (
                    isinstance(option, int)
                    and not isinstance(option, bool)
                    and isinstance(rec[key], int)
                    and option < rec[key]
                )
                if option == rec[key] or (
                    isinstance(option, int)
                    and not isinstance(option, bool)
                    and not smaller
                    and key in ("channels", "hidden")
                ):
                    continue
                out = copy.deepcopy(spec)
                out["nodes"][index][key] = option
                if key == "mode" and option == "dense":
                    out["nodes"][index].update(
                        groups=1,
                        dilation=1,
                        stride=1,
                        padding=(out["nodes"][index]["kernel"] - 1) // 2,
                    )
                yield out
    for module in range(len(spec.get("shared", []))):
        if spec["shared"][module]["kind"] != "conv":
            out = copy.deepcopy(spec)
            out["shared"][module]["kind"] = "conv"
            yield out
    if spec["length"] > 200:
        yield {**spec, "length": spec["length"] // 2 + 1 - (spec["length"] // 2) % 2}


def _complexity(spec: dict) -> tuple[int, float]:
    """(nodes, a score of channel counts and settings): what the minimiser makes smaller; a
    setting scores its position in ``_SIMPLER`` (an unlisted value scores most)."""
    score = spec["encoder"]["channels"] + spec["n_src"] + spec["length"] / 100
    score += len(spec.get("shared", [])) + sum(m["kind"] != "conv" for m in spec.get("shared", []))
    score += {"convt": 0, "head": 0.5}.get(spec["decoder"]["kind"], 1)
    score += spec["encoder"]["activation"] != "none"
    for rec in spec["nodes"]:
        for key, options in _SIMPLER.items():
            if key in ("channels", "hidden"):
                score += rec.get(key, 0)
            elif key in rec:
                value, options = rec[key], _options(rec, key)
                score += options.index(value) if value in options else len(options)
    return len(spec["nodes"]), score


def renumber(spec: dict) -> dict:
    """Node ids 1, 2, ... and value names to match (for readable source)."""
    out = copy.deepcopy(spec)
    names = {"v0": "v0"}
    for number, rec in enumerate(out["nodes"], 1):
        rec["id"] = number
        rec["in"] = [names[n] for n in rec["in"]]
        new = [
            f"v{number}" if len(rec["out"]) == 1 else f"v{number}_{i}"
            for i in range(len(rec["out"]))
        ]
        names.update(zip(rec["out"], new))
        rec["out"] = new
    out["output"] = names[out["output"]]
    return out


def minimise(spec: dict, kind: str, *, seconds: float = 600, log=None) -> dict:
    """Greedily shrink ``spec`` (remove nodes, simplify their settings, fewer channels, a
    shorter input) while its check still fails with ``kind``. Returns the smallest spec found
    within ``seconds``."""
    onnx = kind.split(":")[1] in ("export", "onnx_mismatch", "onnx_refuses_shape")
    needs_compile = "compile" in kind or "budget" in kind

    def fails(candidate: dict) -> bool:
        if not _valid(candidate):
            return False
        outcome = check(candidate, onnx=onnx, compile_budget=needs_compile, look_for=kind)
        return kind in outcome.kinds()

    if not fails(spec):
        raise ValueError(f"the spec does not fail with {kind}")
    # candidates are renumbered as they are tried (names can matter: they order the groups,
    # hence the random keep sets), unless the renumbered spec itself no longer fails
    tidy = renumber if fails(renumber(spec)) else (lambda s: s)
    current = tidy(spec)
    deadline = time.monotonic() + seconds
    progress = True
    while progress and time.monotonic() < deadline:
        progress = False
        size = _complexity(current)
        for candidate in _reductions(current):
            if time.monotonic() > deadline:
                break
            if _complexity(candidate) >= size:
                continue
            candidate = tidy(candidate)
            if fails(candidate):
                current = candidate
                progress = True
                if log:
                    log(f"  {len(current['nodes'])} nodes: {[r['op'] for r in current['nodes']]}")
                break
    return current


def regression_source(spec: dict, failure: Failure | None = None) -> str:
    """Standalone source of the model of ``spec``, headed by the failure it shows and the spec,
    for a regression test. (Dead code stays: it runs in eager code, and may be what makes a
    module an eager shell; ``minimise`` removes it where the failure allows.)"""
    text = source(spec)
    header = f"# spec: {json.dumps(spec)}\n"
    if failure is not None:
        header = f"# {failure.kind}: {failure.detail.splitlines()[0]}\n" + header
    return header + text


# ============================================================================================
# command line
# ============================================================================================


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=0, help="generate the model of this seed")
    parser.add_argument("--spec", help="check the spec in this JSON file instead")
    parser.add_argument(
        "--minimise",
        metavar="KIND",
        help="shrink the model while it fails with KIND; print the minimal model's source",
    )
    parser.add_argument("--onnx", action="store_true", help="also check ONNX Runtime parity")
    parser.add_argument("--source", action="store_true", help="print the model's source")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    spec = json.loads(Path(args.spec).read_text()) if args.spec else generate(args.seed)
    if args.minimise:
        small = minimise(spec, args.minimise, log=print)
        outcome = check(small, onnx=args.onnx or None)
        failure = next((f for f in outcome.failures if f.kind == args.minimise), None)
        if failure is None:
            print(
                f"# (the renumbered minimal model no longer fails with {args.minimise}: "
                f"it fails with {sorted(set(outcome.kinds()))})"
            )
        print(regression_source(small, failure))
        return 0
    if args.source:
        print(source(spec))
    outcome = check(spec, onnx=args.onnx or None)
    print(
        f"seed {outcome.seed}: {outcome.checks} checks in {outcome.seconds:.1f} s, "
        f"{outcome.groups} groups, {'traced' if outcome.traced else 'eager shells'}"
    )
    for f in outcome.failures:
        print(f"  {f.kind}: {f.detail.splitlines()[0]}")
    return 1 if outcome.defects else 0


if __name__ == "__main__":
    sys.exit(main())
