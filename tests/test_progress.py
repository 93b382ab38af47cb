"""Progress output: a tqdm bar on a terminal; on any other stream (CI, nohup, a log file, a
notebook's captured output) a plain line every ~10%, with no carriage returns."""

from __future__ import annotations

import io

import torch
from tqdm import tqdm

import sepfx
from sepfx.progress import PlainProgress, progress_bar

from wild import patterns


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_plain_lines_every_tenth_when_not_a_terminal():
    log = io.StringIO()
    bar = progress_bar(total=250, desc="learning gates", file=log)
    assert isinstance(bar, PlainProgress)
    for step in range(250):
        bar.set_postfix(loss=f"{-step / 10:.2f}")
        bar.update()
    bar.close()
    text = log.getvalue()
    assert "\r" not in text and text.endswith("\n")
    lines = text.splitlines()
    assert len(lines) == 10, lines  # 10%, 20%, ... 100%: not one line per step
    assert lines[0].startswith("learning gates: 25/250 it (10%), ")
    assert lines[-1].startswith("learning gates: 250/250 it (100%), ")
    assert lines[-1].endswith("loss=-24.90")


def test_a_bar_on_a_terminal():
    screen = Terminal()
    bar = progress_bar(total=50, desc="fine-tuning", file=screen)
    assert isinstance(bar, tqdm)
    for _ in range(50):
        bar.update()
    bar.close()
    assert "\r" in screen.getvalue()  # redrawn in place, as a bar is


def test_iteration_and_a_short_or_unfinished_run():
    log = io.StringIO()
    assert list(progress_bar(range(3), desc="soak", unit="model", file=log)) == [0, 1, 2]
    assert [line.split(" model")[0] for line in log.getvalue().splitlines()] == [
        "soak: 1/3",
        "soak: 2/3",
        "soak: 3/3",
    ]
    log = io.StringIO()
    with progress_bar(total=1000, desc="mixtures", file=log) as bar:
        bar.update(5)  # stopped early: its last count is still written, once
    assert log.getvalue().splitlines()[-1].startswith("mixtures: 5/1000 it (0%)")
    assert len(log.getvalue().splitlines()) == 1


def test_disabled_writes_nothing():
    log = io.StringIO()
    bar = progress_bar(total=10, file=log, disable=True)
    bar.update(10)
    bar.close()
    assert log.getvalue() == ""


def test_finetune_writes_plain_lines_to_a_log(capsys):
    """sepfx's own loops use the helper: pytest's captured stderr is not a terminal."""
    torch.manual_seed(0)
    slim = sepfx.prune(patterns.Sandwich(), ratio=0.5)
    x = torch.randn(2, 800)
    sepfx.finetune(slim, [(x, x.unsqueeze(1))] * 20, steps=20)
    err = capsys.readouterr().err
    assert "\r" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("fine-tuning: ")]
    assert len(lines) == 10 and lines[-1].startswith("fine-tuning: 20/20 it (100%)"), err
