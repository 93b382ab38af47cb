"""Gate learning and fine-tuning under ``torchrun --nproc_per_node=2`` (CPU, gloo).

One torchrun launch (module fixture) runs a script whose phases each record their result or
their error per rank, so that one broken phase does not hide the others:

- ``learn``: ``sepfx.learn_gates`` directly on rank-specific data (the gate logits);
- ``compile``: ``sepfx.compile(model, budget=0.4, data=..., steps=20)`` (keep sets, weights);
- ``finetune``: ``sepfx.finetune(slim, data, steps=5)`` on that compiled model;
- ``finetune_data_free``: the same on a model compiled without data (every parameter
  trainable), which separates "fine-tuning a learned compile" from "DDP fine-tuning at all".
"""

from __future__ import annotations

import socket
import subprocess
import sys
import textwrap

import pytest
import torch

import sepfx
import sepfx.models

# one torchrun launch of two ranks: about 25 s on one core
pytestmark = pytest.mark.slow

STEPS = 20
BUDGET = 0.4


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


SCRIPT = textwrap.dedent("""
    import datetime, os, sys, traceback
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=90))
    rank, world = dist.get_rank(), dist.get_world_size()
    import sepfx
    import sepfx.models

    out_dir, steps, budget = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])


    def rank_data(rank):
        generator = torch.Generator().manual_seed(1000 + rank)  # different data on each rank
        batches = []
        for _ in range(4):
            sources = 0.1 * torch.randn(2, 2, 2000, generator=generator)
            batches.append((sources.sum(dim=1), sources))
        return batches


    def build():
        torch.manual_seed(0)
        return sepfx.models.build("conv_tasnet", "tiny").eval()


    def state(module):
        return {k: v.detach().clone() for k, v in module.state_dict().items()}


    data = rank_data(rank)
    results = {"rank": rank, "world": world}


    def phase(name, fn):
        try:
            results[name] = {"ok": True, **fn()}
        except Exception as error:
            results[name] = {"ok": False, "error": f"{type(error).__name__}: {error}",
                             "traceback": traceback.format_exc()}


    def learn():
        analysis = sepfx.analyze(build())
        bank, history = sepfx.learn_gates(analysis, data, budget, steps=steps, progress=False)
        return {"alpha": bank.alpha.detach().clone(), "loss": history.loss,
                "expected_macs_ratio": history.expected_macs_ratio}


    slims = {}


    def compiled():
        slim = sepfx.compile(build(), budget=budget, data=data, steps=steps, progress=False)
        slims["learned"] = slim
        report = slim.sepfx_report
        return {"kept": [(g.index, g.kept) for g in report.groups],
                "macs_ratio": report.macs_ratio, "state": state(slim),
                "expected_macs_ratio": slim.sepfx_gate_history.expected_macs_ratio}


    def tune(slim):
        before = state(slim)
        out = sepfx.finetune(slim, data, steps=5, progress=False)
        return {"before": before, "state": state(out), "training": out.training}


    phase("learn", learn)
    phase("compile", compiled)
    phase("finetune", lambda: tune(slims["learned"]))
    phase("finetune_data_free",
          lambda: tune(sepfx.compile(build(), budget=budget, progress=False)))
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()
""")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    work = tmp_path_factory.mktemp("ddp")
    script = work / "ddp_script.py"
    script.write_text(SCRIPT)
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(_free_port()),
        str(script),
        str(work),
        str(STEPS),
        str(BUDGET),
    ]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=180, cwd=work)
    except subprocess.TimeoutExpired as error:
        pytest.fail(f"torchrun did not finish in 180 s:\n{(error.stderr or b'')[-3000:]}")
    assert done.returncode == 0, f"torchrun failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}"
    results = [torch.load(work / f"rank{r}.pt", weights_only=False) for r in range(2)]
    assert [r["rank"] for r in results] == [0, 1] and all(r["world"] == 2 for r in results)
    return results


def _require(ranks, name):
    for r in ranks:
        assert r[name]["ok"], (
            f"phase {name!r} failed on rank {r['rank']}: {r[name]['error']}\n{r[name]['traceback']}"
        )
    return [r[name] for r in ranks]


def _state_difference(a: dict, b: dict) -> tuple[list, float]:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    worst = max(
        (float((a[k].double() - b[k].double()).abs().max()) for k in different), default=0.0
    )
    return different, worst


def test_gate_logits_agree_across_ranks(ranks):
    zero, one = _require(ranks, "learn")
    assert torch.equal(zero["alpha"], one["alpha"]), (
        f"ranks ended with different gate logits (max diff "
        f"{float((zero['alpha'] - one['alpha']).abs().max())})"
    )
    assert zero["expected_macs_ratio"] == one["expected_macs_ratio"]
    # the data differs, so the per-rank losses do: this really ran on two different shards
    assert zero["loss"] != one["loss"]


def test_gate_gradients_are_combined_over_ranks(ranks):
    """The shared gate logits are not those of either rank's data alone. (They need not equal one
    process on the concatenated batches either: the straight-through gradient is clipped to
    [-1, 1] on each rank before DDP averages it.)"""
    zero, _ = _require(ranks, "learn")
    torch.manual_seed(0)
    model = sepfx.models.build("conv_tasnet", "tiny").eval()
    distances = []
    for rank in (0, 1):
        alone, _ = sepfx.learn_gates(
            sepfx.analyze(model), _rank_data(rank), BUDGET, steps=STEPS, progress=False
        )
        distances.append(float((alone.alpha.detach() - zero["alpha"]).abs().max()))
    print(f"\n[ddp] max |alpha(ddp) - alpha(rank r data alone)| for r = 0, 1: {distances}")
    assert min(distances) > 1e-3, (
        "the DDP gates equal those learned on one rank's data alone: gradients not averaged"
    )


def _rank_data(rank):
    generator = torch.Generator().manual_seed(1000 + rank)
    batches = []
    for _ in range(4):
        sources = 0.1 * torch.randn(2, 2, 2000, generator=generator)
        batches.append((sources.sum(dim=1), sources))
    return batches


def test_compile_agrees_across_ranks(ranks):
    zero, one = _require(ranks, "compile")
    print(f"\n[ddp] kept per group: {zero['kept']}, MACs {zero['macs_ratio']:.4f}")
    assert zero["kept"] == one["kept"]
    assert BUDGET - 0.02 <= zero["macs_ratio"] <= BUDGET
    different, worst = _state_difference(zero["state"], one["state"])
    assert not different, f"compiled weights differ between ranks: {different} (max {worst})"


@pytest.mark.parametrize("phase", ["finetune", "finetune_data_free"])
def test_finetune_agrees_across_ranks(ranks, phase):
    zero, one = _require(ranks, phase)
    assert not zero["training"] and not one["training"]
    changed, _ = _state_difference(zero["before"], zero["state"])
    assert changed, "fine-tuning changed nothing"
    different, worst = _state_difference(zero["state"], one["state"])
    assert worst <= 1e-6, f"fine-tuned weights differ between ranks: {different} (max {worst})"
