"""Train a zoo model on speech mixtures and write its checkpoint and model card.

    python benchmarks/make_data.py --out data/mixtures --train 2000 --valid 200 --test 200
    python benchmarks/train_baseline.py conv_tasnet --config small --minutes 30
    python benchmarks/train_baseline.py conv_tasnet --dynamic benchmarks/data/bank.npz \
        --resume --out benchmarks/results/checkpoints --device cuda --batch 8 --workers 12

Writes ``sepfx/assets/checkpoints/NAME.pt`` (state_dict, fp32) and ``NAME.json`` (config, the
commands, device, steps, time, SI-SNRi on the test split, the bundled split, the CMU ARCTIC pair
and the real-voice set). ``--data`` trains on a folder of fixed mixtures
(``make_data.py --out``); ``--dynamic`` on mixtures drawn afresh from a source bank
(``make_data.py --bank``, ``sepfx.data.DynamicMixtures``), validated and tested on fixed
mixtures of the bank's held-out speakers. Training: Adam (``--lr``), gradient clip 5, negative
SI-SNR with PIT; the checkpoint kept is the one with the best validation SI-SNRi, written (with
an interim card) whenever one is found, so a run cut short keeps its best. The learning rate
halves after ``--patience`` evaluations without a new best. Training stops after ``--minutes``
of wall time. ``--resume`` continues from the checkpoint in ``--out`` (fresh optimizer) and
appends to its card: step counts, minutes, history and runs add up.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import evaluate, evaluate_arctic  # noqa: E402

from sepfx.data import (  # noqa: E402
    DynamicMixtures,
    MixtureDataset,
    RealVoiceSet,
    SourceBank,
    _load_index,
    bundled_test_set,
    loader,
)
from sepfx.losses import pit_si_snr_loss  # noqa: E402
from sepfx.models import build  # noqa: E402

CHECKPOINTS = Path(__file__).resolve().parents[1] / "sepfx" / "assets" / "checkpoints"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--config", default="small")
    parser.add_argument("--data", default="data/mixtures", help="a make_mixtures folder")
    parser.add_argument(
        "--dynamic",
        type=Path,
        default=None,
        help="train on dynamic mixtures of this source bank (.npz) instead of --data",
    )
    parser.add_argument("--valid-count", type=int, default=100, help="--dynamic validation set")
    parser.add_argument("--test-count", type=int, default=200, help="--dynamic test set")
    parser.add_argument("--minutes", type=float, default=30.0, help="training wall time")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--segment", type=float, default=4.0)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--workers", type=int, default=0, help="DataLoader worker processes")
    parser.add_argument(
        "--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda"
    )
    parser.add_argument("--eval-every", type=int, default=200)
    parser.add_argument(
        "--patience",
        type=int,
        default=3,
        help="evaluations without a new best before the learning rate halves",
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="start from the checkpoint in --out and extend its card",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=CHECKPOINTS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed shapes: pick the fastest kernels once
    model = build(args.model, args.config)
    if args.dynamic is not None:
        bank = SourceBank(args.dynamic)
        if bank.sample_rate != model.sample_rate:
            sys.exit(
                f"{args.dynamic}: {bank.sample_rate} Hz, the model runs at {model.sample_rate}"
            )
        train_set = DynamicMixtures(
            bank, "train", count=args.batch * args.eval_every, segment=args.segment, seed=args.seed
        )
        # Fixed sets (seed 0, 4 s, recorded like the training mixtures) whatever the seed.
        valid = DynamicMixtures(bank, "valid", count=args.valid_count, seed=0)
        test = DynamicMixtures(bank, "test", count=args.test_count, seed=0)
        data, data_params = str(args.dynamic), {**bank.info, "dynamic": True}
    else:
        valid, test = MixtureDataset(args.data, "valid"), MixtureDataset(args.data, "test")
        data, data_params = str(args.data), (_load_index(Path(args.data)) or {}).get("params")
    command = "python benchmarks/train_baseline.py " + " ".join(
        sys.argv[1:] if argv is None else argv
    )
    device_name = (
        f"cuda: {torch.cuda.get_device_name(device)}"
        if device.type == "cuda"
        else f"cpu ({args.threads} threads)"
    )
    best, best_state, step, epoch, past_minutes, history, commands = -1e9, None, 0, 0, 0.0, [], []
    runs: list = []
    if args.resume:
        previous = json.loads((args.out / f"{args.model}.json").read_text())
        if previous["config"] != args.config:
            sys.exit(f"--resume: the checkpoint was trained with config {previous['config']!r}")
        model.load_state_dict(torch.load(args.out / f"{args.model}.pt", map_location="cpu"))
        step, past_minutes, history = previous["steps"], previous["minutes"], previous["history"]
        commands = previous.get("commands", [previous["command"]])
        runs = previous.get("runs", [])
    model.to(device)
    if args.resume:
        best, best_state = evaluate(model, valid, limit=100), copy.deepcopy(model.state_dict())
    first_step = step
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimizer, mode="max", factor=0.5, patience=args.patience
    )
    start = time.time()

    def card(**scores) -> dict:
        minutes = (time.time() - start) / 60
        run = dict(command=command, device=device_name, data=data, steps=step - first_step)
        return {
            "model": args.model,
            "config": args.config,
            "command": command,
            "commands": commands + [command],
            "runs": runs + [{**run, "minutes": minutes}],
            "device": device_name,
            "data": data,
            "data_params": data_params,
            "steps": step,
            "minutes": past_minutes + minutes,
            "batch": args.batch,
            "segment_s": args.segment,
            "threads": args.threads,
            "params": sum(p.numel() for p in model.parameters()),
            "valid_si_snri_best": best,
            **scores,
            "history": history,
        }

    def save(state: dict, written: dict) -> None:
        args.out.mkdir(parents=True, exist_ok=True)
        torch.save(
            {k: v.detach().cpu().clone() for k, v in state.items()}, args.out / f"{args.model}.pt"
        )
        (args.out / f"{args.model}.json").write_text(json.dumps(written, indent=2))

    while time.time() - start < 60 * args.minutes:
        if args.dynamic is not None:
            # New mixtures every epoch, drawn by the step count: a resumed run draws new ones.
            train_set.set_epoch(step)
            train = DataLoader(
                train_set,
                batch_size=args.batch,
                drop_last=True,
                num_workers=args.workers,
                pin_memory=device.type == "cuda",
            )
        else:
            train = loader(
                args.data, "train", args.batch, segment=args.segment, seed=args.seed + epoch
            )
        for mixture, sources in train:
            model.train()
            mixture, sources = mixture.to(device), sources.to(device)
            loss, _ = pit_si_snr_loss(model(mixture), sources)
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
            optimizer.step()
            step += 1
            if step % args.eval_every == 0:
                score = evaluate(model, valid, limit=100)
                scheduler.step(score)
                history.append(
                    {
                        "step": step,
                        "minutes": past_minutes + (time.time() - start) / 60,
                        "train_loss": float(loss.detach()),
                        "valid_si_snri": score,
                        "lr": optimizer.param_groups[0]["lr"],
                    }
                )
                print(history[-1], flush=True)
                if score > best:
                    best, best_state = score, copy.deepcopy(model.state_dict())
                    save(best_state, card(interim=True))
            if time.time() - start >= 60 * args.minutes:
                break
        epoch += 1
    if best_state is not None:
        model.load_state_dict(best_state)
    final = card(
        test_si_snri=evaluate(model, test),
        bundled_test_si_snri=evaluate(model, bundled_test_set()),
        arctic_si_snri=evaluate_arctic(model),
        real_voice_si_snri=evaluate(model, RealVoiceSet(sample_rate=model.sample_rate)),
    )
    save(model.state_dict(), final)
    print(json.dumps({k: v for k, v in final.items() if k != "history"}, indent=2))


if __name__ == "__main__":
    main()
