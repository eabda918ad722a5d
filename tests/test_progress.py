"""Long work shows progress: a bar on a terminal, plain lines in logs."""

from __future__ import annotations

from splitprefix.progress import Progress


def test_without_a_terminal_progress_prints_lines_with_the_count(capsys):
    # Execute: every item is past the interval, so each one prints a line
    bar = Progress(range(3), "held-out loss", every_s=0.0, terminal=False)
    for step in bar:
        bar.set_postfix(loss=f"{step:.1f}")

    # Assert: one line per item, counting to `total`, and the last one not twice
    lines = capsys.readouterr().err.splitlines()
    assert lines[0].startswith("held-out loss: 1/3 in ") and lines[-1].endswith("loss=2.0")
    assert len(lines) == 3


def test_a_resumed_run_counts_from_where_it_stopped(capsys):
    list(Progress(range(5, 8), "train", total=8, initial=5, every_s=1e9, terminal=False))
    assert capsys.readouterr().err.startswith("train: 8/8 in ")
