"""The analysis front end: the caller's model is never modified, results are deterministic, the
cost model agrees with torch's FLOP counter, unknown ops are frozen (not guessed), channel groups
agree with Torch-Pruning's dependency graph, errors are clear, and the report is complete."""

from __future__ import annotations

import copy
import json
import warnings

import numpy as np
import pytest
import torch
from torch import fx, nn
from torch.utils.flop_counter import FlopCounterMode

import sepfx
from sepfx.errors import InputError, KeepSetError

from conftest import ZOO_NAMES, build_seeded, max_relative_error, random_keep, wav


def counted_macs(module, *args) -> float:
    """MACs that FlopCounterMode sees (FLOPs / 2) when ``module(*args)`` runs."""
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        module(*args)
    return counter.get_total_flops() / 2


# -- the caller's model is never modified; determinism ------------------------------------
def _snapshot(model: nn.Module):
    tensors = {
        k: (v, v.detach().clone(), v.requires_grad)
        for k, v in model.state_dict(keep_vars=True).items()
    }
    modules = {}
    for name, m in model.named_modules():
        attributes = {
            k: repr(v)
            for k, v in vars(m).items()
            if k not in ("_parameters", "_buffers", "_modules")
        }
        modules[name] = (
            type(m),
            m.training,
            attributes,
            dict(m._parameters).keys(),
            dict(m._buffers).keys(),
            dict(m._modules).keys(),
        )
    return tensors, modules


def _assert_unchanged(model: nn.Module, snapshot, when: str):
    tensors, modules = snapshot
    now = model.state_dict(keep_vars=True)
    assert now.keys() == tensors.keys(), f"{when}: state_dict keys changed"
    for k, (obj, value, requires_grad) in tensors.items():
        assert now[k] is obj, f"{when}: {k} was replaced by another tensor object"
        assert now[k].dtype == value.dtype and now[k].shape == value.shape, f"{when}: {k}"
        assert torch.equal(
            now[k].detach().contiguous().view(torch.uint8), value.contiguous().view(torch.uint8)
        ), f"{when}: {k} changed"
        assert now[k].requires_grad == requires_grad, f"{when}: {k}.requires_grad changed"
    _, now_modules = _snapshot(model)
    assert now_modules.keys() == modules.keys(), f"{when}: the module tree changed"
    for name, before in modules.items():
        assert now_modules[name] == before, f"{when}: module {name!r} changed"


@pytest.mark.parametrize("name", ZOO_NAMES)
def test_callers_model_is_never_modified(name):
    model = build_seeded(name).train()  # train mode: sepfx must not switch it to eval
    x = wav(1, 8000, seed=3)
    model.eval()
    with torch.no_grad():
        before = model(x)
    model.train()
    snapshot = _snapshot(model)
    slim = sepfx.prune(model, ratio=0.5)
    _assert_unchanged(model, snapshot, "after sepfx.prune(model, ratio=0.5)")
    analysis = sepfx.analyze(model)
    _assert_unchanged(model, snapshot, "after sepfx.analyze(model)")
    for keep in (analysis.keep_ratio(0.3), random_keep(analysis, np.random.default_rng(0))):
        analysis.slim(keep)
        analysis.gated(keep)
    _assert_unchanged(model, snapshot, "after analysis.slim/gated")
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x), before)
        # the analysis' own dense graph is not modified by slimming either
        assert max_relative_error(before, analysis.capture.graph_module(x)) <= 1e-6
    assert slim is not model and all(
        p is not q for p in slim.parameters() for q in model.parameters()
    )


@pytest.mark.parametrize("name", ["conv_tasnet", "dprnn", "sepformer"])
def test_same_seed_same_result(name):
    x = wav(2, 8037, seed=4)
    outputs, reports = [], []
    for _ in range(2):
        model = build_seeded(name)
        analysis = sepfx.analyze(model)
        keeps = [
            analysis.keep_ratio(0.5),
            analysis.keep_ratio(0.4, "random", seed=7),
            random_keep(analysis, np.random.default_rng(11)),
        ]
        with torch.no_grad():
            outputs.append(
                [analysis.slim(k)(x) for k in keeps]
                + [sepfx.prune(model, ratio=0.5)(x), sepfx.prune(model, keep=keeps[2])(x)]
            )
        reports.append([{g: list(map(int, v)) for g, v in k.items()} for k in keeps])
    assert reports[0] == reports[1], "same seed, different keep sets"
    for a, b in zip(*outputs):
        assert torch.equal(a, b), "same model, same keep set, different slim outputs"
    # prune(model, ratio=0.5) is analysis.slim(keep_ratio(0.5)); prune(keep=k) is slim(k)
    assert torch.equal(outputs[0][0], outputs[0][3])
    assert torch.equal(outputs[0][2], outputs[0][4])
    # a different seed for random importance gives a different keep set
    analysis = sepfx.analyze(build_seeded(name))
    assert any(
        not np.array_equal(
            analysis.keep_ratio(0.4, "random", seed=7)[g],
            analysis.keep_ratio(0.4, "random", seed=8)[g],
        )
        for g in range(len(analysis.groups))
    )


# -- MACs ----------------------------------------------------------------------------------
def test_conv_tasnet_half_keep_cuts_macs(zoo):
    analysis = zoo("conv_tasnet").analysis
    slim = analysis.slim(analysis.keep_ratio(0.5))
    report = slim.sepfx_report
    print(
        f"\nconv_tasnet keep_ratio(0.5): {report.macs:.0f} / {report.dense_macs:.0f} MACs "
        f"= {report.macs_ratio:.3f}"
    )
    assert report.dense_macs == analysis.cost.dense_macs > 0
    assert report.macs <= 0.55 * report.dense_macs
    assert report.reference_input == tuple(analysis.example_input.shape) == (1, 8000)


@pytest.mark.parametrize("name", ["conv_tasnet", "sudormrf"])
def test_predicted_macs_match_counted_slim_macs(zoo, name):
    analysis = zoo(name).analysis
    x = analysis.example_input
    rng = np.random.default_rng(3)
    keeps = [
        analysis.keep_all(),
        random_keep(analysis, rng, single=True),
        analysis.keep_ratio(0.5),
    ] + [random_keep(analysis, rng) for _ in range(5)]
    for keep in keeps:
        slim = analysis.slim(keep)
        predicted = slim.sepfx_report.macs
        assert predicted == pytest.approx(
            analysis.cost.macs(
                analysis.channels.keep_vector({k: np.asarray(v) for k, v in keep.items()})
            )
        )
        measured = counted_macs(slim, x)
        print(f"\n{name}: predicted {predicted:.0f} MACs, counted on the slim model {measured:.0f}")
        assert measured > 0
        assert abs(predicted - measured) <= 0.005 * measured


class _ElementCounter(fx.Interpreter):
    """Runs a GraphModule and adds up the elements of every tensor its calls return."""

    total = 0

    def run_node(self, n):
        result = super().run_node(n)
        if n.op in ("call_function", "call_method", "call_module") and isinstance(
            result, torch.Tensor
        ):
            self.total += result.numel()
        return result


@pytest.mark.parametrize("name", ZOO_NAMES)
def test_predicted_elements_match_counted_slim_elements(zoo, name):
    """The cost model's activation elements (what the latency allocation spends by) are the
    elements the slim graph's calls really write, for any keep set."""
    analysis = zoo(name).analysis
    rng = np.random.default_rng(4)
    keeps = [analysis.keep_all(), analysis.keep_ratio(0.5)]
    keeps += [random_keep(analysis, rng) for _ in range(3)]
    for keep in keeps:
        slim = analysis.slim(keep)
        assert isinstance(slim, fx.GraphModule), f"{name} no longer traces whole"
        counter = _ElementCounter(slim)
        counter.run(analysis.example_input)
        predicted = analysis.cost.elements(analysis.channels.keep_vector(keep))
        assert counter.total > 0
        assert predicted == pytest.approx(counter.total, rel=1e-9), (name, predicted, counter.total)


def _rnn_macs(rnn: nn.RNNBase, x: torch.Tensor) -> float:
    """gates * H * (I + H) per step, per direction, per layer, times batch (closed form)."""
    gates = {nn.LSTM: 4, nn.GRU: 3}[type(rnn)]
    steps, batch = (x.shape[1], x.shape[0]) if rnn.batch_first else (x.shape[0], x.shape[1])
    directions = 2 if rnn.bidirectional else 1
    h = rnn.hidden_size
    total = 0
    for layer in range(rnn.num_layers):
        i = rnn.input_size if layer == 0 else directions * h
        total += directions * gates * h * (i + h) * steps * batch
    return float(total)


def _attention_macs(mha: nn.MultiheadAttention, q, k, v) -> float:
    """q/k/v/out projections plus QK^T and attention x V (closed form)."""
    seq, batch = (1, 0) if mha.batch_first else (0, 1)
    b, lq, lk = q.shape[batch], q.shape[seq], k.shape[seq]
    e = mha.embed_dim
    projections = b * lq * q.shape[-1] * e + b * lk * k.shape[-1] * e + b * lk * v.shape[-1] * e
    out = b * lq * e * e
    scores = b * mha.num_heads * lq * lk * mha.head_dim
    weighted = b * mha.num_heads * lq * mha.head_dim * lk
    return float(projections + out + scores + weighted)


class _ClosedForms(fx.Interpreter):
    """Runs a GraphModule; for each LSTM/GRU/MultiheadAttention node records what the FLOP
    counter sees of it alone and the closed form."""

    def __init__(self, gm):
        super().__init__(gm)
        self.rows = []

    def run_node(self, n):
        if n.op == "call_module":
            module = self.module.get_submodule(n.target)
            if isinstance(module, (nn.LSTM, nn.GRU, nn.MultiheadAttention)):
                args, kwargs = self.fetch_args_kwargs_from_env(n)
                with FlopCounterMode(display=False) as counter:
                    result = module(*args, **kwargs)
                if isinstance(module, nn.MultiheadAttention):
                    q = args[0]
                    k = args[1] if len(args) > 1 else kwargs["key"]
                    v = args[2] if len(args) > 2 else kwargs["value"]
                    closed = _attention_macs(module, q, k, v)
                else:
                    closed = _rnn_macs(module, args[0])
                self.rows.append(
                    (n.name, type(module).__name__, counter.get_total_flops() / 2, closed)
                )
                return result
        return super().run_node(n)


@pytest.mark.parametrize("name", ZOO_NAMES)
def test_dense_macs_cross_check(zoo, name):
    analysis = zoo(name).analysis
    gm, x = analysis.capture.graph_module, analysis.example_input
    counted = counted_macs(gm, x)
    interpreter = _ClosedForms(gm)
    with torch.no_grad():
        interpreter.run(x)
    correction = sum(closed - seen for _, _, seen, closed in interpreter.rows)
    expected = counted + correction
    print(f"\n{name}: FlopCounterMode on the traced graph {counted:.0f} MACs")
    for node, kind, seen, closed in interpreter.rows:
        print(f"    {node} ({kind}): counter {seen:.0f}, closed form {closed:.0f}")
    print(
        f"  expected dense {expected:.0f}, sepfx cost model {analysis.cost.dense_macs:.0f} "
        f"({100 * (analysis.cost.dense_macs / expected - 1):+.2f}%)"
    )
    assert expected > 0
    assert abs(analysis.cost.dense_macs - expected) <= 0.02 * expected
    if name in ("dprnn",):
        assert any(kind == "LSTM" for _, kind, _, _ in interpreter.rows)
    if name in ("tdanet", "sepformer"):
        assert any(kind == "MultiheadAttention" for _, kind, _, _ in interpreter.rows)


# -- frozen ops: what sepfx has no rule for is kept whole, the rest still prunes ------------
class _Opaque(nn.Module):
    """Not traceable (control flow on a tensor value), so it becomes an opaque leaf. With
    ``mix`` it mixes channels (a cumulative sum over them): no channel subset commutes with it;
    without, it acts on each channel alone."""

    def __init__(self, mix: bool):
        super().__init__()
        self.mix = mix

    def forward(self, x):
        if x.abs().sum() < 0:  # a tensor-valued condition (never true)
            x = -x
        if self.mix:
            return x + 0.1 * torch.cumsum(x, dim=1)
        return x * torch.sigmoid(x)


class _Net(nn.Module):
    """encoder -> conv_a -> [op] -> gLN -> conv_b -> PReLU -> conv_c -> mask -> decoder."""

    def __init__(self, mode: str):
        super().__init__()
        self.mode = mode
        self.encoder = nn.Conv1d(1, 16, 16, stride=8)
        self.conv_a = nn.Conv1d(16, 24, 1)
        self.odd = _Opaque(mix=mode != "channelwise leaf")
        self.norm = nn.GroupNorm(1, 24)
        self.conv_b = nn.Conv1d(24, 20, 3, padding=1)
        self.act = nn.PReLU(20)
        self.conv_c = nn.Conv1d(20, 16, 1)
        self.decoder = nn.ConvTranspose1d(16, 1, 16, stride=8)

    def forward(self, wav):
        w = torch.relu(self.encoder(wav.unsqueeze(1)))
        y = self.conv_a(w)
        y = torch.cumsum(y, dim=1) if self.mode == "cumsum" else self.odd(y)
        y = self.act(self.conv_b(self.norm(y)))
        return self.decoder(w * torch.sigmoid(self.conv_c(y))).squeeze(1)


FROZEN_MIDDLE = {"conv_a out", "norm channels", "conv_b in"}


def _check_rest_prunes(model, analysis, middle_frozen: bool):
    members = {m for g in analysis.groups for m in g.members}
    if middle_frozen:
        assert not members & FROZEN_MIDDLE, members
    else:
        assert any(FROZEN_MIDDLE <= set(g.members) for g in analysis.groups), members
    # encoder/mask channels and the conv_b -> conv_c channels prune in any case
    assert any("encoder out" in g.members and "conv_c out" in g.members for g in analysis.groups)
    assert any(
        "conv_b out" in g.members and "act weight" in g.members and "conv_c in" in g.members
        for g in analysis.groups
    )
    keep = analysis.keep_ratio(0.5)
    slim, gated = analysis.slim(keep), analysis.gated(keep)
    middle = 24 if middle_frozen else 12
    assert slim.conv_a.out_channels == middle and slim.conv_b.in_channels == middle
    assert slim.norm.num_channels == middle
    assert slim.conv_b.out_channels == 10 and slim.encoder.out_channels == 8
    with torch.no_grad():
        for x in (wav(1, 8000, seed=5), wav(2, 8037, seed=6)):
            assert max_relative_error(gated(x), slim(x)) <= 1e-5
            assert max_relative_error(model(x), analysis.gated()(x)) <= 1e-5
    return slim


@pytest.mark.parametrize("mode", ["cumsum", "mixing leaf"])
def test_op_without_rule_is_frozen(mode):
    torch.manual_seed(0)
    model = _Net(mode).eval()
    analysis = sepfx.analyze(model, wav(1, 8000))
    name = "cumsum"  # in the model's graph, or recorded from the eager module "odd"
    if mode == "mixing leaf":  # "odd" cannot be traced: it and its parent run eagerly
        assert set(analysis.capture.shells) == {"", "odd"}, analysis.capture.shells
    else:
        assert not analysis.capture.shells
    frozen = analysis.channels.frozen
    frozen_params = {p for f in frozen for p in f.parameters}
    assert FROZEN_MIDDLE <= frozen_params, frozen
    reasons = [f.reason for f in frozen if {"conv_a out", "conv_b in"} & set(f.parameters)]
    assert reasons and all(name in r for r in reasons), reasons
    if mode == "cumsum":
        assert all("no rule" in r for r in reasons), reasons
    slim = _check_rest_prunes(model, analysis, middle_frozen=True)
    text = str(slim.sepfx_report)
    print("\n" + text)
    assert "conv_a out" in text and name in text
    if mode == "mixing leaf":
        assert slim.sepfx_report.shells.keys() == {"", "odd"}
        assert "eager shells" in text


def test_channelwise_eager_module_passes_channels_through():
    """A module that cannot be traced but acts on each channel alone is not a reason to
    freeze: its recorded run shows the channels pass through (its data-dependent condition
    sums over them, which the gated model computes exactly as the slim one); the slim model
    runs its forward on the kept channels."""
    torch.manual_seed(0)
    model = _Net("channelwise leaf").eval()
    analysis = sepfx.analyze(model, wav(1, 8000))
    assert set(analysis.capture.shells) == {"", "odd"}, analysis.capture.shells
    _check_rest_prunes(model, analysis, middle_frozen=False)


class _Limiter(nn.Module):
    """Control flow on a tensor *value* (``.item()``), not on a shape."""

    def forward(self, x):
        if x.abs().max().item() > 10.0:
            x = x.clamp(-10.0, 10.0)
        return x


class _LimiterNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = nn.Conv1d(1, 8, 16, stride=8)
        self.limiter = _Limiter()
        self.decoder = nn.ConvTranspose1d(8, 1, 16, stride=8)

    def forward(self, wav):
        return self.decoder(self.limiter(self.encoder(wav.unsqueeze(1)))).squeeze(1)


def test_data_dependent_control_flow_is_not_baked_in():
    torch.manual_seed(0)
    model = _LimiterNet().eval()
    analysis = sepfx.analyze(model, wav(1, 8000))
    loud = 1000 * wav(1, 8000, seed=9)
    with torch.no_grad():
        expected = model(loud)
        # (the analysis graph is a recorded run of the eager code: the models sepfx hands
        # out run that code as written)
        assert max_relative_error(expected, analysis.slim(analysis.keep_all())(loud)) <= 1e-5
        assert max_relative_error(expected, analysis.gated()(loud)) <= 1e-5


class _RoundSTE(torch.autograd.Function):
    """Straight-through rounding: forward rounds, backward passes the gradient through."""

    @staticmethod
    def forward(ctx, x):
        return torch.round(x)

    @staticmethod
    def backward(ctx, grad):
        return grad


class _Quantize(nn.Module):
    def forward(self, y):
        return _RoundSTE.apply(4 * y) / 4


class _STENet(nn.Module):
    def __init__(self, in_root: bool = False):
        super().__init__()
        self.encoder = nn.Conv1d(1, 8, 16, stride=8)
        self.mid = nn.Conv1d(8, 8, 1)
        self.quantize = _Quantize()
        self.decoder = nn.ConvTranspose1d(8, 1, 16, stride=8)
        self.in_root = in_root

    def forward(self, wav):
        y = self.mid(self.encoder(wav.unsqueeze(1)))
        y = _RoundSTE.apply(4 * y) / 4 if self.in_root else self.quantize(y)
        return self.decoder(y).squeeze(1)


@pytest.mark.parametrize("in_root", [False, True])
def test_custom_autograd_function_keeps_its_backward(in_root):
    """Tracing would inline the function's forward and lose its backward, so the code calling
    it runs eagerly (an eager shell, the root included): the slim model's gradient is the
    custom one."""
    torch.manual_seed(0)
    model = _STENet(in_root=in_root)
    analysis = sepfx.analyze(model, wav(1, 8000))
    assert "" in analysis.capture.shells
    assert ("quantize" in analysis.capture.shells) != in_root
    x = wav(1, 8000, seed=12)
    model(x).sum().backward()
    expected = model.mid.weight.grad.clone()
    slim = analysis.slim(analysis.keep_all())
    slim(x).sum().backward()
    assert expected.abs().sum() > 0
    assert torch.allclose(slim.mid.weight.grad, expected, rtol=1e-4, atol=1e-6)


# -- Torch-Pruning cross-check ---------------------------------------------------------------
def _sepfx_keys(model: nn.Module, names: dict, pnames: dict, analysis, dep):
    """The sepfx axis keys a Torch-Pruning dependency prunes, or None for TP's own pseudo ops
    (elementwise, reshape, concat...) and for modules that hold no prunable parameter."""
    target = dep.target.module
    handler = dep.handler.__name__
    out = handler == "prune_out_channels"
    channels = analysis.channels
    if isinstance(target, nn.Parameter):
        name = pnames.get(id(target))
        return ("param", name, list(channels.attr_axes.get(name, {}).values()))
    name = names.get(id(target))
    if name is None:
        return None  # a TP pseudo op
    axes = channels.module_axes.get(name, {})
    if isinstance(target, nn.modules.conv._ConvNd):
        wanted = ["out"] if out else ["in"]
        if out and target.groups > 1 and target.groups == target.in_channels:
            wanted.append("in")  # depthwise: TP prunes in and out together
    elif isinstance(target, nn.Linear):
        wanted = ["out"] if out else ["in"]
    elif isinstance(target, (nn.GroupNorm, nn.modules.batchnorm._BatchNorm)):
        wanted = ["channels"]
    elif isinstance(target, nn.PReLU):
        if target.num_parameters == 1:
            return None
        wanted = ["weight"]
    elif isinstance(target, nn.LayerNorm):
        if not target.elementwise_affine:
            return None
        wanted = ["dim0"]
    elif isinstance(target, nn.RNNBase):
        wanted = ["hidden"] if out else ["input"]
    elif isinstance(target, nn.MultiheadAttention):
        # TP prunes the embedding (and with it the inner width); sepfx has the embedding axes
        # and a separate heads group
        wanted = ["in", "out"] if target._qkv_same_embed_dim else ["in_q", "in_k", "in_v", "out"]
    else:
        return ("unknown", name, [])
    return ("module", name, [axes[w] for w in wanted if w in axes])


def _unit_group(analysis):
    starts = np.array([g.offset for g in analysis.groups])

    def group_of(unit: int):
        if unit == 0:
            return None
        return int(np.searchsorted(starts, unit, side="right") - 1)

    return group_of


@pytest.mark.parametrize("name", ZOO_NAMES)
def test_torch_pruning_groups_agree(zoo, name):
    tp = pytest.importorskip("torch_pruning")
    entry = zoo(name)
    analysis = entry.analysis
    model = copy.deepcopy(entry.model)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dg = tp.DependencyGraph().build_dependency(
                model, example_inputs=wav(1, 8000), verbose=False
            )
            tp_groups = list(dg.get_all_groups())
    except Exception as error:
        if name in ("conv_tasnet", "sudormrf"):
            raise
        pytest.skip(f"Torch-Pruning cannot build the dependency graph of {name}: {error}")
    names = {id(m): n for n, m in model.named_modules()}
    pnames = {id(p): n for n, p in model.named_parameters()}
    group_of = _unit_group(analysis)
    channels = analysis.channels
    print(f"\n{name}: {len(tp_groups)} Torch-Pruning groups, {len(analysis.groups)} sepfx groups")
    touched: set[int] = set()
    disagreements = []
    for tp_group in tp_groups:
        root_dep, root_idxs = tp_group[0]
        root = (
            f"{names.get(id(root_dep.target.module))} ({root_dep.handler.__name__}, "
            f"{len(root_idxs)})"
        )
        found: dict[int, list[str]] = {}
        frozen, absent = [], []
        for dep, idxs in tp_group:
            mapped = _sepfx_keys(model, names, pnames, analysis, dep)
            if mapped is None:
                continue
            kind, member, keys = mapped
            label = f"{member} {dep.handler.__name__.replace('prune_', '')}"
            if not keys:
                absent.append(label)
                continue
            for key in keys:
                units = channels.axis_units(key)
                idx = np.asarray([i for i in idxs if i < len(units)], dtype=np.int64)
                groups = {group_of(int(u)) for u in units[idx]}
                if None in groups:
                    frozen.append(label)
                for g in groups - {None}:
                    found.setdefault(g, []).append(label)
        touched |= set(found)
        verdict = (
            f"sepfx group {next(iter(found))}"
            if len(found) == 1
            else "frozen in sepfx"
            if not found
            else f"SPLIT over sepfx groups {sorted(found)}"
        )
        print(f"  TP group rooted at {root}: {verdict}")
        if frozen:
            print(f"      frozen in sepfx: {', '.join(sorted(set(frozen)))}")
        if absent:
            print(f"      no sepfx axis: {', '.join(sorted(set(absent)))}")
        if len(found) > 1:
            disagreements.append(
                f"TP group rooted at {root} spans sepfx groups "
                + "; ".join(f"{g}: {sorted(set(m))}" for g, m in sorted(found.items()))
            )
        _print_index_differences(dg, tp_group, root_dep, model, names, pnames, analysis)
    for g in analysis.groups:
        if g.index not in touched:
            print(
                f"  sepfx group {g.index} ({g.size} units) is in no TP group (TP roots are "
                f"Conv/Linear out channels): {', '.join(g.members[:4])}"
            )
    assert not disagreements, "\n".join(disagreements)


def _print_index_differences(dg, tp_group, root_dep, model, names, pnames, analysis):
    """Index level, printed only: TP's channel i of the root vs sepfx's unit of each member."""
    size = len(tp_group[0][1])
    for i in sorted({0, size - 1}):
        single = dg.get_pruning_group(root_dep.target.module, root_dep.handler, [i])
        units = {}
        for dep, idxs in single:
            mapped = _sepfx_keys(model, names, pnames, analysis, dep)
            if mapped is None or not mapped[2]:
                continue
            for key in mapped[2]:
                axis_units = analysis.channels.axis_units(key)
                label = f"{mapped[1]} {key[-1]}{list(idxs)}"
                beyond = [int(j) for j in idxs if j >= len(axis_units)]
                if beyond:
                    label += f" (TP index {beyond} beyond the axis size {len(axis_units)})"
                units[label] = sorted({int(axis_units[j]) for j in idxs if j < len(axis_units)})
        distinct = {tuple(u) for u in units.values() if u and u != [0]}
        if len(distinct) > 1:
            print(
                f"      index level, root channel {i}: TP's members fall in different sepfx "
                f"units: " + ", ".join(f"{k} -> units {v}" for k, v in units.items())
            )


# -- errors --------------------------------------------------------------------------------
class _ValueBranch(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(1, 4, 3)

    def forward(self, x):
        if x.sum() > 0:  # control flow on a tensor value in the root forward
            x = -x
        return self.conv(x.unsqueeze(1))


@pytest.mark.parametrize("bad", ["model", lambda x: x, {"weight": torch.ones(2)}, None])
def test_non_module_is_input_error(bad):
    with pytest.raises(InputError, match="nn.Module"):
        sepfx.analyze(bad)
    with pytest.raises(InputError, match="nn.Module"):
        sepfx.prune(bad, ratio=0.5)


def test_prune_arguments():
    model = build_seeded("conv_tasnet")
    with pytest.raises(InputError, match="keep="):
        sepfx.prune(model)
    with pytest.raises(InputError, match="keep="):
        sepfx.prune(model, keep={}, ratio=0.5)
    analysis = sepfx.analyze(model)
    for ratio in (0, 1.5, -0.1):
        with pytest.raises(InputError, match="ratio"):
            analysis.keep_ratio(ratio)
    with pytest.raises(InputError, match="importance"):
        analysis.keep_ratio(0.5, importance="loudest")


def test_non_tensor_example_input_is_input_error():
    with pytest.raises(InputError, match="example_input"):
        sepfx.analyze(build_seeded("conv_tasnet"), example_input=[[0.0] * 8000])


def test_untraceable_root_runs_eagerly_and_says_why():
    analysis = sepfx.analyze(_ValueBranch(), wav(1, 800))
    assert list(analysis.capture.shells) == [""]
    assert "x.sum() > 0" in analysis.capture.shells[""], analysis.capture.shells
    text = str(analysis.report())
    assert "(the model)" in text and "x.sum() > 0" in text, text


def _keep_cases(analysis):
    base = {g.index: list(range(g.size)) for g in analysis.groups}
    g = analysis.groups[-1]
    n = g.index

    def variant(value=None, drop=False):
        keep = dict(base)
        if drop:
            del keep[n]
        else:
            keep[n] = value
        return keep

    return (
        n,
        g.size,
        {
            "missing group": (variant(drop=True), f"group {n}"),
            "empty": (variant([]), f"keep[{n}] is empty"),
            "out of range": (variant([0, g.size]), f"keep[{n}] has index {g.size} out of range"),
            "negative": (variant([-1, 0]), f"keep[{n}] has index -1 out of range"),
            "duplicate": (variant([1, 1, 2]), f"keep[{n}] repeats an index"),
            "floats": (variant([0.0, 1.0]), f"keep[{n}] must be"),
            "string": (variant("01"), f"keep[{n}] must be"),
            "scalar": (variant(2), f"keep[{n}] must be"),
            "2-D": (variant([[0, 1]]), f"keep[{n}] must be"),
            "unknown group": ({**base, 99: [0]}, "unknown groups [99]"),
        },
    )


@pytest.mark.parametrize("method", ["slim", "gated", "report"])
def test_bad_keep_sets_are_keep_set_errors(zoo, method):
    analysis = zoo("conv_tasnet").analysis
    _, _, cases = _keep_cases(analysis)
    for label, (keep, expected) in cases.items():
        with pytest.raises(KeepSetError) as info:
            getattr(analysis, method)(keep)
        assert expected in str(info.value), f"{label}: {info.value}"
    with pytest.raises(KeepSetError, match="dict"):
        getattr(analysis, method)([[0]] * len(analysis.groups))
    # numpy and torch index arrays are fine
    keep = {g.index: np.arange(0, g.size, 2) for g in analysis.groups}
    keep[0] = torch.arange(3)
    getattr(analysis, method)(keep)


# -- the report ------------------------------------------------------------------------------
def test_report_text_and_dict(zoo):
    analysis = zoo("conv_tasnet").analysis
    keep = analysis.keep_ratio(0.5)
    slim = analysis.slim(keep, budget=0.4, notes=["a note"])
    report = slim.sepfx_report
    text = str(report)
    print("\n" + text)
    assert "ConvTasNet" in text
    assert "MACs" in text and "params" in text
    assert f"channel groups ({len(analysis.groups)})" in text
    for g in analysis.groups:
        assert f"#{g.index}" in text
        assert f"{len(keep[g.index])}/{g.size}" in text.replace(" ", "")
    for shell in report.shells:  # eager shells are listed with their reason
        assert f"{shell or '(the model)'}:" in text
    assert "budget 40%" in text and "a note" in text
    assert report.params < report.dense_params
    assert report.macs < report.dense_macs
    data = report.to_dict()
    round_trip = json.loads(json.dumps(data))
    assert round_trip["macs"] == report.macs and round_trip["params"] == report.params
    assert round_trip["macs_ratio"] == pytest.approx(report.macs / report.dense_macs)
    assert len(round_trip["groups"]) == len(analysis.groups)
    assert round_trip["shells"].keys() == report.shells.keys()
    assert round_trip["assumptions"] == report.assumptions
    for assumption in report.assumptions:
        assert assumption in text
    # the report of the dense model
    dense = analysis.report()
    assert dense.macs == dense.dense_macs and dense.params == dense.dense_params
    json.dumps(dense.to_dict())


@pytest.mark.parametrize("name", ZOO_NAMES)
def test_every_report_is_json(zoo, name):
    analysis = zoo(name).analysis
    report = analysis.slim(analysis.keep_ratio(0.5)).sepfx_report
    json.dumps(report.to_dict())
    assert str(report).startswith("sepfx report:")
    assert 0 < report.macs_ratio < 1
    assert 0 < report.prunable_macs_share <= 1
