"""Dynamic mixing (sepfx.data.DynamicMixtures) over a source bank (make_bank, SourceBank).

The dataset tests run on a tiny bank written in the test from tones and noise (no synthesiser
needed, under a second); make_bank itself is tested where espeak-ng and pyroomacoustics are
installed.
"""

from __future__ import annotations

import importlib.util
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from sepfx import data
from sepfx.errors import InputError

ROOT = Path(__file__).resolve().parents[1]
RATE = 8000


def fake_bank(path: Path, voices: list[str], utterances: int = 3, rooms: int = 10) -> Path:
    """A bank whose speaker i says ``utterances`` 1-2 s tones of its own pitch with noise;
    speakers are split by pairs (:func:`data._held_out_split`), rooms decaying noise."""
    rng = np.random.default_rng(0)
    table, said = [], []
    for i, voice in enumerate(voices):
        table.append(
            dict(
                voice=voice,
                person=data._PERSONS.get(voice, voice),
                pitch=-1,
                speed=175,
                split=data._held_out_split(i // 2),
            )
        )
        spoken = []
        for k in range(utterances):
            t = np.arange(int(rng.uniform(1.0, 2.0) * RATE)) / RATE
            tone = 0.5 * np.sin(2 * np.pi * (100 + 20 * i) * t) + 0.05 * rng.standard_normal(len(t))
            spoken.append((f"utterance {k} of {voice}", data._to_int16(tone)))
        said.append(spoken)
    impulses = []
    for r in range(rooms):
        h = rng.standard_normal(800) * np.exp(-np.arange(800) / 150.0)
        impulses.append((h / np.abs(h).max(), 0.2 + 0.01 * r))
    params = dict(bank_version=data.BANK_VERSION, fake=True)
    data._write_bank(path, table, said, impulses, RATE, params, {})
    return path


@pytest.fixture(scope="module")
def bank(tmp_path_factory) -> Path:
    voices = [f"en+m{i % 7 + 1}" if i % 2 == 0 else f"fr+f{i % 5 + 1}" for i in range(20)]
    return fake_bank(tmp_path_factory.mktemp("bank") / "bank.npz", voices)


def snr_db(sources: torch.Tensor) -> float:
    power = sources.double().pow(2).mean(-1)
    return 10 * math.log10(float(power[0] / power[1]))


def test_items_have_the_promised_shapes(bank):
    dataset = data.DynamicMixtures(bank, "train", count=6, segment=1.5)
    assert len(dataset) == 6 and dataset.length == int(1.5 * RATE)
    for i in range(len(dataset)):
        mixture, sources = dataset[i]
        assert mixture.shape == (int(1.5 * RATE),) and sources.shape == (2, int(1.5 * RATE))
        assert mixture.dtype == sources.dtype == torch.float32
        assert torch.equal(mixture, sources.sum(0))
        assert torch.isfinite(sources).all() and (sources.abs().amax(-1) > 1e-3).all()
        assert sources.abs().max() <= 0.9 + 1e-6  # peak-normalised like make_mixtures
    batch = next(iter(DataLoader(dataset, batch_size=3)))
    assert batch[0].shape == (3, int(1.5 * RATE)) and batch[1].shape == (3, 2, int(1.5 * RATE))
    with pytest.raises(IndexError):
        dataset[6]


def test_same_seed_same_mixtures_in_any_order_and_worker(bank):
    def items(dataset, order):
        return {i: dataset[i] for i in order}

    first = items(data.DynamicMixtures(bank, "train", count=8, segment=1.0, seed=3), range(8))
    again = items(
        data.DynamicMixtures(bank, "train", count=8, segment=1.0, seed=3), [5, 2, 7, 0, 1, 3, 4, 6]
    )
    for i in range(8):
        assert torch.equal(first[i][0], again[i][0]) and torch.equal(first[i][1], again[i][1])
    # DataLoader workers draw the same items as the main process.
    dataset = data.DynamicMixtures(bank, "train", count=8, segment=1.0, seed=3)
    batches = list(DataLoader(dataset, batch_size=4, num_workers=2))
    assert torch.equal(batches[1][1], torch.stack([first[i][1] for i in range(4, 8)]))
    # Another seed or epoch draws other mixtures.
    other_seed = data.DynamicMixtures(bank, "train", count=8, segment=1.0, seed=4)[0]
    dataset.set_epoch(1)
    other_epoch = dataset[0]
    for other in (other_seed, other_epoch):
        assert other[0].shape == first[0][0].shape and not torch.equal(other[0], first[0][0])


def test_snr_lies_in_range_and_is_what_was_drawn(bank):
    dataset = data.DynamicMixtures(bank, "train", count=60, segment=1.0, seed=1)
    drawn = []
    for i in range(len(dataset)):
        item = dataset.draw(i)
        assert -5.0 <= item["snr_db"] <= 5.0
        assert abs(snr_db(item["sources"]) - item["snr_db"]) < 1e-3, i
        drawn.append(item["snr_db"])
    assert min(drawn) < -3.0 and max(drawn) > 3.0  # the whole range is used


def test_two_different_speakers_of_the_split(bank):
    loaded = data.SourceBank(bank)
    for split in data.SPLITS:
        dataset = data.DynamicMixtures(loaded, split, count=30, segment=1.0)
        speakers = set()
        for i in range(len(dataset)):
            item = dataset.draw(i)
            assert item["persons"][0] != item["persons"][1]
            for utterances in item["utterances"]:
                assert 1 <= len(utterances) <= 4 and len(set(utterances)) == len(utterances)
                owners = {int(loaded.utterance_speaker[u]) for u in utterances}
                assert len(owners) == 1  # one source, one speaker
                (owner,) = owners
                assert loaded.speaker_split[owner] == data._SPLIT_CODE[split]
                speakers.add(owner)
            for recording in item["recordings"]:
                assert 0.88 <= recording["warp"] <= 1.12
                if "room" in recording:  # rooms of the split only
                    assert loaded.room_split[recording["room"]] == data._SPLIT_CODE[split]
        assert len(speakers) >= 2
    # Voices that are one person are never paired: here every mixture needs en+m1.
    voices = ["flite:kal", "festival:kal_diphone", "flite:kal16", "en+m1"] * 5
    only_kal = fake_bank(Path(bank).with_name("kal.npz"), voices)
    dataset = data.DynamicMixtures(only_kal, "train", count=20, segment=1.0)
    for i in range(len(dataset)):
        assert "en+m1" in dataset.draw(i)["voices"]


def test_clean_sources_are_bank_audio(bank):
    """Without augment a source is its speaker's utterances as stored (and pauses, zeros)."""
    loaded = data.SourceBank(bank)
    dataset = data.DynamicMixtures(loaded, "train", count=5, segment=0.5, augment=False)
    for i in range(len(dataset)):
        item = dataset.draw(i)
        assert item["recordings"] == [{}, {}]
        for source, utterances in zip(item["sources"].double().numpy(), item["utterances"]):
            stored = np.concatenate([loaded.utterance(u) for u in utterances])
            first = int(np.flatnonzero(source)[0])  # after the zero padding, if any
            piece = source[first : first + 50]
            windows = np.lib.stride_tricks.sliding_window_view(stored, 50)
            # The piece is some 50 stored samples times one gain: cosine similarity 1.
            cosine = windows @ piece / (np.linalg.norm(windows, axis=1) * np.linalg.norm(piece))
            assert cosine.max() > 1 - 1e-6, cosine.max()


def test_bank_refuses_real_voice_speakers_and_bad_files(bank, tmp_path):
    assert {"flite:awb", "flite:slt"} <= data.HELD_OUT_VOICES
    # make_bank's speakers, whatever their number, never speak with a held-out voice.
    table = [data._bank_speaker(0, i, data.ENGINES, tuple(data.LANGUAGES)) for i in range(400)]
    voices = {speaker["voice"] for speaker in table}
    assert not voices & data.HELD_OUT_VOICES
    assert {f"flite:{v}" for v in data.FLITE_VOICES} <= voices  # every other voice speaks
    assert {f"festival:{v}" for v in data.FESTIVAL_VOICES} <= voices
    assert sum(":" not in v for v in (s["voice"] for s in table)) == 200  # half espeak-ng
    splits = [speaker["split"] for speaker in table]
    assert splits.count(1) == splits.count(2) == 40
    held_out = fake_bank(tmp_path / "awb.npz", ["flite:awb"] + ["en+m1", "fr+f1"] * 10)
    with pytest.raises(InputError, match="real-voice"):
        data.SourceBank(held_out)
    (tmp_path / "junk.npz").write_bytes(b"not a bank")
    with pytest.raises(InputError, match="not a source bank"):
        data.SourceBank(tmp_path / "junk.npz")
    np.savez(tmp_path / "other.npz", audio=np.zeros(3))
    with pytest.raises(InputError, match="not a source bank"):
        data.SourceBank(tmp_path / "other.npz")
    lonely = fake_bank(tmp_path / "lonely.npz", ["en+m1"] * 20)
    with pytest.raises(InputError, match="two different"):
        data.DynamicMixtures(lonely, "train")


@pytest.mark.skipif(
    shutil.which("espeak-ng") is None or importlib.util.find_spec("pyroomacoustics") is None,
    reason="espeak-ng or pyroomacoustics is not installed",
)
def test_make_bank_is_deterministic_and_mixes(tmp_path):
    kwargs = dict(speakers=20, utterances=1, rooms=10, engines=("espeak",), progress=False)
    summary = data.make_bank(tmp_path / "a.npz", **kwargs)
    data.make_bank(tmp_path / "b.npz", **kwargs, workers=1)
    with np.load(tmp_path / "a.npz") as a, np.load(tmp_path / "b.npz") as b:
        assert a.files == b.files
        for key in a.files:
            assert np.array_equal(a[key], b[key]), key
    bank = data.SourceBank(tmp_path / "a.npz")
    assert summary["utterance_count"] == 20 == len(bank.texts)
    assert summary["hours"] == pytest.approx(len(bank.audio) / RATE / 3600, abs=1e-4)
    for u, text in enumerate(bank.texts):  # each speaker says sentences of its own split
        split = data.SPLITS[bank.speaker_split[bank.utterance_speaker[u]]]
        assert data.sentence_split(str(text)) == split
    assert np.abs(bank.room_audio.astype(np.float64)).max() == 1.0
    mixture, sources = data.DynamicMixtures(bank, "test", count=1, segment=1.0)[0]
    assert torch.equal(mixture, sources.sum(0)) and sources.shape == (2, RATE)
    with pytest.raises(InputError, match="speakers >= 20"):
        data.make_bank(tmp_path / "c.npz", speakers=4, progress=False)


def test_committed_bank_is_compact_and_clean():
    path = ROOT / "benchmarks" / "data" / "bank.npz"
    if not path.exists():
        pytest.skip("no committed bank")
    assert path.stat().st_size <= 24 * 2**20
    bank = data.SourceBank(path)  # refuses held-out voices
    assert bank.info["utterance_count"] == len(bank.texts) and bank.info["hours"] > 0.3
    for split in data.SPLITS:
        assert len(data.DynamicMixtures(bank, split, count=1).pool) > 0


def test_train_baseline_on_dynamic_mixtures_resumes(bank, tmp_path):
    """Two short runs of train_baseline.py --dynamic: checkpoint and card written, the second
    run extends the first's card."""
    out = tmp_path / "checkpoints"
    common = [sys.executable, str(ROOT / "benchmarks" / "train_baseline.py"), "conv_tasnet"]
    common += ["--config", "tiny", "--dynamic", str(bank), "--out", str(out), "--device", "cpu"]
    common += ["--minutes", "0.02", "--batch", "2", "--segment", "0.5", "--eval-every", "2"]
    common += ["--valid-count", "2", "--test-count", "2"]
    env = {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    for extra in ([], ["--resume"]):
        proc = subprocess.run(
            common + extra, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
    card = json.loads((out / "conv_tasnet.json").read_text())
    assert len(card["runs"]) == 2 and len(card["commands"]) == 2
    assert card["steps"] == sum(run["steps"] for run in card["runs"]) > 0
    assert card["device"].startswith("cpu") and card["data_params"]["dynamic"]
    assert "interim" not in card
    for key in ("test_si_snri", "bundled_test_si_snri", "arctic_si_snri", "real_voice_si_snri"):
        assert math.isfinite(card[key]), key
    state = torch.load(out / "conv_tasnet.pt")
    assert all(v.device.type == "cpu" for v in state.values())


@pytest.mark.slow
def test_gpu_train_script_runs_on_the_cpu(bank, tmp_path):
    """benchmarks/gpu/train.sh resumes the committed conv_tasnet checkpoint, trains a few
    seconds (on the CPU here) and writes checkpoint, card and log to OUTDIR (~12 s)."""
    out = tmp_path / "out"
    env = {
        "MINUTES": "0.05",
        "BANK": str(bank),
        "PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin",
    }
    env["PYTHON"] = sys.executable
    small = ["--device", "cpu", "--batch", "2", "--segment", "0.5", "--eval-every", "2"]
    small += ["--valid-count", "2", "--test-count", "2", "--workers", "0", "--threads", "1"]
    proc = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu" / "train.sh"), str(out), "conv_tasnet", *small],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    card = json.loads((out / "conv_tasnet.json").read_text())
    committed = json.loads((ROOT / "benchmarks/results/checkpoints/conv_tasnet.json").read_text())
    assert card["steps"] > committed["steps"] and card["runs"][-1]["data"] == str(bank)
    assert (out / "conv_tasnet.pt").stat().st_size < 16 * 2**20 and (out / "train.log").exists()
    assert math.isfinite(card["real_voice_si_snri"])
