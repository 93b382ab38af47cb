"""Train a zoo model on the espeak-ng mixtures and write its checkpoint and model card.

    python benchmarks/make_data.py --out data/mixtures --train 2000 --valid 200 --test 200
    python benchmarks/train_baseline.py conv_tasnet --config small --minutes 30

Writes ``sepfx/assets/checkpoints/NAME.pt`` (state_dict, fp32) and ``NAME.json`` (config, the
command, steps, time, SI-SNRi on the test split, the bundled split and the CMU ARCTIC pair).
Training: Adam 1e-3, gradient clip 5, negative SI-SNR with PIT, batch 4 x 4 s; the checkpoint
kept is the one with the best validation SI-SNRi. The learning rate halves after
``--patience`` evaluations without a new best. ``--resume`` continues from the bundled
checkpoint (fresh optimizer) and appends to its card: step counts, minutes and history add up.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import evaluate, evaluate_arctic  # noqa: E402

from sepfx.data import MixtureDataset, RealVoiceSet, _load_index, bundled_test_set, loader  # noqa: E402
from sepfx.losses import pit_si_snr_loss  # noqa: E402
from sepfx.models import build  # noqa: E402

CHECKPOINTS = Path(__file__).resolve().parents[1] / "sepfx" / "assets" / "checkpoints"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--config", default="small")
    parser.add_argument("--data", default="data/mixtures")
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--segment", type=float, default=4.0)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--threads", type=int, default=1)
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
    model = build(args.model, args.config)
    valid = MixtureDataset(args.data, "valid")
    command = "python benchmarks/train_baseline.py " + " ".join(
        sys.argv[1:] if argv is None else argv
    )
    best, best_state, step, epoch, past_minutes, history, commands = -1e9, None, 0, 0, 0.0, [], []
    if args.resume:
        previous = json.loads((args.out / f"{args.model}.json").read_text())
        if previous["config"] != args.config:
            sys.exit(f"--resume: the checkpoint was trained with config {previous['config']!r}")
        model.load_state_dict(torch.load(args.out / f"{args.model}.pt"))
        step, past_minutes, history = previous["steps"], previous["minutes"], previous["history"]
        commands = previous.get("commands", [previous["command"]])
        best, best_state = evaluate(model, valid, limit=50), copy.deepcopy(model.state_dict())
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimizer, mode="max", factor=0.5, patience=args.patience
    )
    start = time.time()
    while time.time() - start < 60 * args.minutes:
        train = loader(args.data, "train", args.batch, segment=args.segment, seed=args.seed + epoch)
        for mixture, sources in train:
            model.train()
            loss, _ = pit_si_snr_loss(model(mixture), sources)
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
            optimizer.step()
            step += 1
            if step % args.eval_every == 0:
                score = evaluate(model, valid, limit=50)
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
            if time.time() - start >= 60 * args.minutes:
                break
        epoch += 1
    if best_state is not None:
        model.load_state_dict(best_state)
    card = {
        "model": args.model,
        "config": args.config,
        "command": command,
        "commands": commands + [command],
        "data": str(args.data),
        "data_params": (_load_index(Path(args.data)) or {}).get("params"),
        "steps": step,
        "minutes": past_minutes + (time.time() - start) / 60,
        "batch": args.batch,
        "segment_s": args.segment,
        "threads": args.threads,
        "params": sum(p.numel() for p in model.parameters()),
        "valid_si_snri_best": best,
        "test_si_snri": evaluate(model, MixtureDataset(args.data, "test")),
        "bundled_test_si_snri": evaluate(model, bundled_test_set()),
        "arctic_si_snri": evaluate_arctic(model),
        "real_voice_si_snri": evaluate(model, RealVoiceSet(sample_rate=model.sample_rate)),
        "history": history,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    torch.save(
        {k: v.detach().clone() for k, v in model.state_dict().items()},
        args.out / f"{args.model}.pt",
    )
    (args.out / f"{args.model}.json").write_text(json.dumps(card, indent=2))
    print(json.dumps({k: v for k, v in card.items() if k != "history"}, indent=2))


if __name__ == "__main__":
    main()
