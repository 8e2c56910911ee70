"""The builder's progress output: plain timestamped lines in a log file, a bar only on a terminal."""

import fcntl
import io
import os
import pty
import re
import struct
import termios
import time

import pytest

from bmclip.progress import Progress


def test_off_a_terminal_plain_lines_at_the_interval_and_at_the_end():
    out = io.StringIO()
    p = Progress("stage s", "pkg", total=10, stream=out, every_s=0.05)
    p.set_postfix(pairs=3)
    p.update(2)  # before the interval: nothing yet
    assert out.getvalue() == ""
    time.sleep(0.06)
    p.update(2)
    lines = out.getvalue().splitlines()
    assert len(lines) == 1 and "\r" not in out.getvalue()
    assert re.fullmatch(r"\d\d:\d\d:\d\d stage s: 4/10 pkg \(40%\), pairs 3, [\d.]+ pkg/s, elapsed 0:00:00, "
                        r"ETA 0:00:\d\d", lines[0]), lines[0]
    p.update(6)
    p.close()
    p.close()  # idempotent
    lines = out.getvalue().splitlines()
    assert len(lines) == 2 and lines[1].endswith(", done") and "10/10 pkg (100%)" in lines[1], lines


def test_a_run_closed_before_its_total_says_stopped_and_no_total_has_no_eta():
    out = io.StringIO()
    p = Progress("stage s", "pkg", total=10, stream=out, every_s=3600)
    p.update(3)
    p.close()  # what the finally clause of an interrupted stage does
    line = out.getvalue().strip()
    assert ": 3/10 pkg (30%), " in line and line.endswith(", stopped"), line
    out = io.StringIO()
    p = Progress("merge", "pkg", total=None, stream=out, every_s=3600)
    p.update(5)
    p.close()
    line = out.getvalue().strip()
    assert ": 5 pkg, " in line and "ETA" not in line and "%" not in line and line.endswith(", done"), line


def test_disabled_prints_nothing():
    out = io.StringIO()
    p = Progress("merge", "pkg", total=4, stream=out, enabled=False, every_s=0)
    p.update(4)
    p.close()
    assert out.getvalue() == ""


def test_on_a_terminal_a_tqdm_bar():
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))  # a 120-column terminal
    try:
        with os.fdopen(slave, "w", closefd=True) as tty:
            p = Progress("stage s", "pkg", total=4, stream=tty, every_s=0)
            p.update(4)
            p.close()
        chunks = []
        while True:
            try:
                b = os.read(master, 65536)
            except OSError:  # EIO: the terminal's other end is closed and drained
                break
            if not b:
                break
            chunks.append(b)
        data = b"".join(chunks).decode(errors="replace")
    finally:
        os.close(master)
    assert "\r" in data and "4/4" in data and "stage s" in data and "elapsed" not in data, data


def test_as_a_context_stopped_by_an_exception_and_wrap_counts_up_to_the_total():
    out = io.StringIO()
    with Progress("embed pairs", "pairs", 10, stream=out, every_s=3600) as bar:
        assert [len(b) for b in bar.wrap([[0] * 4, [0] * 4, [0] * 4])] == [4, 4, 4]
    line = out.getvalue().strip()
    assert ": 10/10 pairs (100%), " in line and line.endswith(", done"), line  # 12 read, the consumer keeps 10
    out = io.StringIO()
    with pytest.raises(KeyboardInterrupt), Progress("embed", "img", 100, stream=out, every_s=3600) as bar:
        for _ in bar.wrap([[0] * 5, [0] * 5]):
            raise KeyboardInterrupt
    line = out.getvalue().strip()
    assert ": 5/100 img (5%), " in line and line.endswith(", stopped"), line
    out = io.StringIO()
    with pytest.raises(ValueError), Progress("embed", "img", 100, stream=out, every_s=0):
        raise ValueError("an error before the first batch")  # its own message says enough: no progress line
    assert out.getvalue() == ""
    out = io.StringIO()  # the builder's stage and merge say where they stood even then
    with pytest.raises(ValueError), Progress("stage s", "pkg", 12, stream=out, every_s=0, silent_if_empty=False):
        raise ValueError("stopped before the first chunk came back")
    assert ": 0/12 pkg (0%), " in out.getvalue() and out.getvalue().strip().endswith(", stopped")
    out = io.StringIO()
    with Progress("embed", "img", 100, stream=out, every_s=3600) as bar:
        list(bar.wrap([[0] * 30]))  # the batches ran out short of the total (skipped items): still done
    line = out.getvalue().strip()
    assert ": 30/100 img (30%), " in line and line.endswith(", done"), line
