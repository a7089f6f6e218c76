"""Finch-style progress rows: terminal redraws and plain once-per-row output."""

from __future__ import annotations

import io

from lazyoci.cli.progress import ProgressDisplay, bar, human_bytes
from lazyoci.images.progress import ProgressEvent

D1 = "sha256:" + "a" * 64
D2 = "sha256:" + "b" * 64


def feed(display: ProgressDisplay) -> None:
    display(ProgressEvent("example.com/app:latest", "resolve", "resolving"))
    display(ProgressEvent("example.com/app:latest", "resolve", "resolved"))
    display(ProgressEvent(f"manifest-{D1}", "manifest", "done", 500, 500))
    display(ProgressEvent(f"layer-{D2}", "layer", "waiting", 0, 62_495_129))
    display(ProgressEvent(f"layer-{D2}", "layer", "downloading", 36_700_160, 62_495_129))


def test_bar_and_sizes():
    assert bar(0, 100, False) == "|" + "-" * 38 + "|"
    assert bar(50, 100, False) == "|" + "+" * 19 + "-" * 19 + "|"
    assert bar(0, None, True) == "|" + "+" * 38 + "|" and len(bar(1, 2, False)) == 40
    assert human_bytes(36_700_160) == "35.0 MiB" and human_bytes(62_495_129) == "59.6 MiB"


def test_plain_output_prints_each_finished_row_once():
    out = io.StringIO()
    with ProgressDisplay(out, tty=False) as display:
        feed(display)
        display(ProgressEvent(f"layer-{D2}", "layer", "done", 62_495_129, 62_495_129))
        display(ProgressEvent(f"layer-{D2}", "layer", "done", 62_495_129, 62_495_129))
    text = out.getvalue()
    assert "\x1b" not in text
    lines = text.splitlines()
    assert len(lines) == 4
    assert lines[0].startswith("example.com/app:latest:") and "resolved" in lines[0]
    assert lines[1].startswith(f"manifest-{D1}: done")
    assert lines[2].startswith(f"layer-{D2}:") and lines[2].rstrip().endswith("|" + "+" * 38 + "|")
    # rows line up: status starts in the same column
    assert lines[0].index("resolved") == lines[1].index("done") == lines[2].index("done")
    assert lines[3].startswith("elapsed: ") and "total:" in lines[3] and "59.6 M" in lines[3]


def test_terminal_output_redraws_in_place():
    out = io.StringIO()
    display = ProgressDisplay(out, tty=True)
    with display:
        feed(display)
        display._draw()
        first = out.getvalue()
        assert f"layer-{D2}:" in first and "downloading" in first and "35.0 MiB/59.6 MiB" in first
        assert "|" + "+" * 22 + "-" * 16 + "|" in first
        display(ProgressEvent(f"layer-{D2}", "layer", "done", 62_495_129, 62_495_129))
        display._draw()
    text = out.getvalue()
    assert "\x1b[3F" in text                      # cursor back over the three rows before redrawing
    assert text.rstrip("\n").splitlines()[-1].lstrip("\x1b[1F").startswith("elapsed: ")
