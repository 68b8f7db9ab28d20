"""The agent's sans-I/O pieces without a network: ranges, multipart, the console ring, paths and
the lifecycle table."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.agent.consolelog import ConsoleLog, FellBehind
from bench.agent.http import ApiError
from bench.agent.lifecycle import GameEvent, GameState, IllegalTransition, next_state
from bench.agent.multipart import MultipartError, MultipartParser, PartData, PartEnd, PartStart
from bench.agent.paths import FilesRoot
from bench.agent.ranges import ByteRange, RangeNotSatisfiable, parse_range


def test_range_forms_and_unsatisfiable_ranges() -> None:
    assert parse_range(None, 100) is None
    assert parse_range("bytes=0-9", 100) == ByteRange(0, 9)
    assert parse_range("bytes=90-", 100) == ByteRange(90, 99)
    assert parse_range("bytes=-10", 100) == ByteRange(90, 99)
    assert parse_range("bytes=-1000", 100) == ByteRange(0, 99)
    assert parse_range("bytes=50-5000", 100) == ByteRange(50, 99)
    for ignored in ["items=0-1", "bytes=0-1,5-6", "bytes=9-1", "bytes=a-b", "bytes=-"]:
        assert parse_range(ignored, 100) is None, ignored
    for unsatisfiable in ["bytes=100-", "bytes=-0", "bytes=200-300"]:
        with pytest.raises(RangeNotSatisfiable):
            parse_range(unsatisfiable, 100)
    with pytest.raises(RangeNotSatisfiable):
        parse_range("bytes=-5", 0)


BODY = (b"preamble\r\n--XyZ\r\nContent-Disposition: form-data; name=\"note\"\r\n\r\nhi\r\n"
        b"--XyZ\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.bin\"\r\n"
        b"Content-Type: application/octet-stream\r\n\r\n" + b"\r\n--XyQ\x00" * 50 +
        b"\r\n--XyZ--\r\nepilogue")


@pytest.mark.parametrize("piece", [1, 3, 7, 64, len(BODY)])
def test_multipart_parser_gives_the_same_parts_however_the_body_is_split(piece: int) -> None:
    parser = MultipartParser(b"XyZ")
    events = []
    for offset in range(0, len(BODY), piece):
        events += parser.feed(BODY[offset:offset + piece])
    assert parser.finished
    starts = [event for event in events if isinstance(event, PartStart)]
    assert [start.filename for start in starts] == [None, "a.bin"]
    contents: list[bytes] = [b""]
    for event in events:
        if isinstance(event, PartData):
            contents[-1] += event.data
        elif isinstance(event, PartEnd):
            contents.append(b"")
    assert contents[:2] == [b"hi", b"\r\n--XyQ\x00" * 50]


def test_multipart_parser_refuses_garbage_after_a_delimiter() -> None:
    with pytest.raises(MultipartError):
        MultipartParser(b"b").feed(b"--b junk\r\n")


def test_console_ring_positions_replay_and_falling_behind() -> None:
    log = ConsoleLog(capacity=5)
    log.append_state("starting")
    for number in range(1, 4):
        assert log.append_line(f"line {number}") == number
    log.append_state("running")
    assert log.first_retained_seq() == 1
    assert log.entry_at(log.position_after(1)).seq == 2
    assert log.position_after(3) == 4  # the state change right after line 3
    for number in range(4, 8):
        log.append_line(f"line {number}")
    assert log.first_retained_seq() == 4
    with pytest.raises(FellBehind):
        log.entry_at(0)
    assert log.position_after(0) == log.start


def test_file_paths_stay_under_the_root(tmp_path: Path) -> None:
    root = FilesRoot(tmp_path)
    assert root.resolve("a/./b//c") == tmp_path / "a" / "b" / "c"
    assert root.resolve("") == tmp_path
    for bad in ["..", "a/../../b", "/abs", "\\abs", "nul\x00"]:
        with pytest.raises(ApiError) as refused:
            root.resolve(bad)
        assert refused.value.code == "INVALID_PATH"
    with pytest.raises(ApiError):
        root.resolve("", allow_root=False)


def test_lifecycle_table_allows_only_listed_transitions() -> None:
    assert next_state(GameState.STOPPED, GameEvent.START) is GameState.STARTING
    assert next_state(GameState.RUNNING, GameEvent.EXITED_FAILED) is GameState.CRASHED
    assert next_state(GameState.STOPPING, GameEvent.EXITED_FAILED) is GameState.STOPPED
    for state, event in [(GameState.RUNNING, GameEvent.START),
                         (GameState.STOPPED, GameEvent.STOP),
                         (GameState.INSTALLING, GameEvent.START)]:
        with pytest.raises(IllegalTransition):
            next_state(state, event)
