"""The console's memory: a ring buffer of game-server output lines and state changes.

Every output line gets the next `seq` (1, 2, ... since the agent started); state changes are stored
between lines so a live reader sees them in order. Entries have absolute positions; a reader keeps
its own position and reads at its own pace, so there is no per-reader queue: a reader that falls a
whole ring behind gets `FellBehind` instead of making the agent buffer for it. Each entry's websocket
frame is encoded once, when it is appended. It must never block or do I/O.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import trio

from bench.agent.clock import iso_utc

DEFAULT_CAPACITY = 5000


class FellBehind(Exception):
    """The entry at this position was already overwritten."""


@dataclass(frozen=True)
class ConsoleEntry:
    is_line: bool
    seq: int  # a line's own seq; for a state change, the seq of the last line before it
    frame: str


class ConsoleLog:
    def __init__(self, capacity: int = DEFAULT_CAPACITY) -> None:
        self.capacity = capacity
        self._ring: list[ConsoleEntry | None] = [None] * capacity
        self.end = 0  # absolute position of the next entry
        self.last_seq = 0
        self._appended = trio.Event()

    @property
    def start(self) -> int:
        """Absolute position of the oldest retained entry."""
        return max(0, self.end - self.capacity)

    def append_line(self, text: str) -> int:
        self.last_seq += 1
        frame = json.dumps({"type": "line", "seq": self.last_seq, "ts": iso_utc(), "data": text})
        self._append(ConsoleEntry(True, self.last_seq, frame))
        return self.last_seq

    def append_state(self, state: str) -> None:
        self._append(ConsoleEntry(False, self.last_seq, state_frame(state)))

    def _append(self, entry: ConsoleEntry) -> None:
        self._ring[self.end % self.capacity] = entry
        self.end += 1
        self._appended.set()
        self._appended = trio.Event()

    def entry_at(self, position: int) -> ConsoleEntry:
        if position < self.start:
            raise FellBehind(position)
        entry = self._ring[position % self.capacity]
        assert entry is not None and position < self.end
        return entry

    async def wait_past(self, position: int) -> None:
        """Return once an entry exists at `position`."""
        while self.end <= position:
            await self._appended.wait()

    def first_retained_seq(self) -> int:
        """The seq of the oldest line still held (`last_seq + 1` when none is)."""
        for position in range(self.start, self.end):
            entry = self.entry_at(position)
            if entry.is_line:
                return entry.seq
        return self.last_seq + 1

    def position_after(self, since: int) -> int:
        """The position of the first retained line with seq > `since` (or `end`)."""
        low, high = self.start, self.end
        while low < high:
            middle = (low + high) // 2
            entry = self.entry_at(middle)
            if entry.seq > since or (not entry.is_line and entry.seq == since):
                high = middle
            else:
                low = middle + 1
        return low


def state_frame(state: str) -> str:
    return json.dumps({"type": "state", "state": state, "ts": iso_utc()})
