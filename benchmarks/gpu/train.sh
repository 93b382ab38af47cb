#!/usr/bin/env bash
# Continue a baseline's training on a GPU machine (torch with CUDA, no network) on dynamic
# mixtures of the committed source bank, and write its checkpoint and card to OUTDIR.
#
#   benchmarks/gpu/train.sh OUTDIR [MODEL] [more train_baseline.py options]
#
# Resumes from OUTDIR/MODEL.pt if an earlier run left one there, else from the last committed
# checkpoint (benchmarks/results/checkpoints, then sepfx/assets/checkpoints); trains for
# MINUTES (default 8) of wall time, so that training, the evaluations and the start fit a
# 10-minute command; evaluates on the bank's test speakers, the bundled synthetic split, the
# CMU ARCTIC pair and the real-voice set; writes OUTDIR/MODEL.pt (the best on validation),
# OUTDIR/MODEL.json (its card) and OUTDIR/train.log. Options given later override the
# defaults below (argparse keeps the last), e.g. `--lr 2e-4` or `--device cpu --batch 2`.
# Environment: MINUTES, BANK (default benchmarks/data/bank.npz), PYTHON (default python3).
set -euo pipefail
if [ $# -lt 1 ]; then
    echo "usage: $0 OUTDIR [MODEL] [train_baseline.py options]" >&2
    exit 2
fi
out=$1
model=${2:-conv_tasnet}
shift $(($# >= 2 ? 2 : 1))
root=$(cd "$(dirname "$0")/../.." && pwd)
cd "$root"
# sepfx from this checkout, without installing it: it needs nothing that is not there
# (torch, numpy, tqdm), and the machine's environment is left as it was.
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
python=${PYTHON:-python3}
mkdir -p "$out"
if [ ! -f "$out/$model.pt" ]; then
    for dir in benchmarks/results/checkpoints sepfx/assets/checkpoints; do
        if [ -f "$dir/$model.pt" ] && [ -f "$dir/$model.json" ]; then
            cp "$dir/$model.pt" "$dir/$model.json" "$out/"
            echo "resuming from $dir/$model.pt"
            break
        fi
    done
fi
if [ ! -f "$out/$model.pt" ]; then
    echo "no committed checkpoint of $model to resume from" >&2
    exit 1
fi
cores=$(nproc)
workers=$((cores > 4 ? cores - 2 : 1))
# DataLoader workers pass batches through shared memory; if that fails on this machine, draw
# in the main process rather than lose the run (about 150 mixtures/s per core).
if ! "$python" -c "
import sys, torch
from sepfx.data import DynamicMixtures
data = DynamicMixtures(sys.argv[1], 'valid', count=4)
assert len(list(torch.utils.data.DataLoader(data, batch_size=2, num_workers=2))) == 2
" "${BANK:-benchmarks/data/bank.npz}"; then
    echo "DataLoader workers failed here: drawing mixtures in the main process" >&2
    workers=0
fi
config=$("$python" -c "import json, sys; print(json.load(open(sys.argv[1]))['config'])" "$out/$model.json")
"$python" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
set -o pipefail
PYTHONUNBUFFERED=1 "$python" benchmarks/train_baseline.py "$model" --config "$config" --resume \
    --dynamic "${BANK:-benchmarks/data/bank.npz}" --out "$out" --minutes "${MINUTES:-8}" \
    --batch 8 --workers "$workers" --eval-every 1000 --lr 5e-4 "$@" 2>&1 | tee "$out/train.log"
ls -l "$out"
