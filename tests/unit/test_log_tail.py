"""The worker's view of an attempt's log file: read as it grows, its last part kept."""

from __future__ import annotations

from pathlib import Path

import pytest

from ml_platform import worker
from ml_platform.worker import LogTail

pytestmark = pytest.mark.unit


@pytest.fixture
def small(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(worker, "MAX_LOG_CHARS", 100)
    monkeypatch.setattr(worker, "LOG_CUT_LINE_CHARS", 10)


def test_a_character_split_between_two_reads_is_decoded_whole(tmp_path: Path) -> None:
    log, tail = tmp_path / "attempt.log", LogTail()
    encoded = "naïve 😀 end\x00\n".encode()
    log.write_bytes(encoded[:3])  # "na" and half of "ï"
    assert tail.read(log) == "na"
    log.write_bytes(encoded[:9])  # and half of the emoji
    assert tail.read(log) == "naïve "
    log.write_bytes(encoded + b"\xff")  # and a byte that is not UTF-8, unfinished at the end
    assert tail.read(log, final=True) == "naïve 😀 end\ufffd\n\ufffd"  # NUL: not storable
    assert tail.start == 0
    assert LogTail().read(tmp_path / "never-written.log", final=True) == ""


@pytest.mark.usefixtures("small")
def test_the_last_part_is_kept_from_a_line_start_and_what_went_before_is_counted(
    tmp_path: Path,
) -> None:
    log, tail = tmp_path / "attempt.log", LogTail()
    lines = [f"line {i:03d}\n" for i in range(30)]  # 9 characters each
    written = ""
    for line in lines:
        written += line
        log.write_text(written)
        text = tail.read(log)
        assert written.endswith(text) and tail.start + len(text) == len(written)
        assert len(text) <= 100 and (tail.start == 0 or text.startswith("line "))
    assert tail.text == "".join(lines[-11:]) and tail.start == 19 * 9


@pytest.mark.usefixtures("small")
def test_a_burst_larger_than_what_is_kept_is_skipped_unread(tmp_path: Path) -> None:
    log, tail = tmp_path / "attempt.log", LogTail()
    log.write_text("a" * 50)
    assert tail.read(log) == "a" * 50
    log.write_text("a" * 50 + "b" * 1_000 + "c" * 20)  # more than 4 bytes a kept character
    text = tail.read(log)
    assert text == "b" * 80 + "c" * 20 and tail.start == 970


def test_a_file_cut_shorter_under_the_reader_gives_nothing_new(tmp_path: Path) -> None:
    """A task that truncates its own output file: the reader neither fails nor reads it all
    again (it reads on from where it was, once the file has grown past that)."""
    log, tail = tmp_path / "attempt.log", LogTail()
    log.write_text("first part\n")
    assert tail.read(log) == "first part\n"
    log.write_text("cut\n")
    assert tail.read(log) == "first part\n" and tail.start == 0
    log.write_text("cut\n" + "x" * 7 + "then\n")
    assert tail.read(log, final=True) == "first part\nthen\n"
