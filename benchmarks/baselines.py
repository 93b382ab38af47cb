"""The bundled checkpoints on the bundled synthetic test split and on the real-voice set, with
every metric of sepfx.metrics (SI-SNRi, BSS-eval SDRi, STOI, PESQ-NB).

    python benchmarks/baselines.py      # writes benchmarks/results/baselines.{json,md}
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from common import machine, markdown_table, write  # noqa: E402

from sepfx import metrics  # noqa: E402
from sepfx.data import RealVoiceSet, bundled_test_set  # noqa: E402
from sepfx.models import pretrained, pretrained_names  # noqa: E402


def main() -> int:
    torch.set_num_threads(1)
    rows = []
    for name in pretrained_names():
        model = pretrained(name)
        sets = {
            "synthetic": bundled_test_set(sample_rate=model.sample_rate),
            "real": RealVoiceSet(sample_rate=model.sample_rate),
        }
        for set_name, dataset in sets.items():
            start = time.perf_counter()
            scores = metrics.evaluate(model, dataset, model.sample_rate)
            rows.append(dict(model=name, set=set_name, mixtures=len(dataset), **scores))
            print(f"{name} {set_name}: {scores} ({time.perf_counter() - start:.0f} s)")
    columns = ["model", "set", "mixtures", "si_snri", "sdri", "stoi", "pesq"]
    note = (
        "\n\nsynthetic: the 20 committed espeak-ng test mixtures (sepfx/assets/mixtures); real: "
        "sepfx.data.RealVoiceSet (24 mixtures of 14 recordings of 6 real speakers). SI-SNRi and "
        "SDRi in dB (SDR: BSS-eval, fast-bss-eval); STOI (pystoi) and PESQ-NB (pesq) of the "
        "estimates."
    )
    print(
        write("baselines", dict(machine=machine(), rows=rows), markdown_table(rows, columns) + note)
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
