"""A fake line-oriented game server: the child process the reference agent supervises by default.

Run as `python -m bench.agent.gameserver [--log-interval S] [--startup-seconds S] [--version V]
[--max-players N]`. It prints a Minecraft-like banner, then `Done (...)! For help, type "help"`,
then a log line every `--log-interval` seconds (0: never), and answers stdin commands one per line:

    list              There are N of a max of M players online: a, b
    say <msg>         [Server] <msg>
    join <name>       <name> joined the game
    leave <name>      <name> left the game
    echo <text>       <text>, verbatim with no log prefix (for ordered round-trip tests)
    crash             exits with code 1 (a crash the agent did not ask for)
    stop              saves and exits with code 0; so does end of input

It must never print a partial line: every output line is written whole and flushed.
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from typing import TextIO

_print_lock = threading.Lock()


def emit(text: str, *, prefixed: bool = True, stream: TextIO | None = None) -> None:
    line = f"[{time.strftime('%H:%M:%S')} INFO]: {text}" if prefixed else text
    with _print_lock:
        print(line, file=stream or sys.stdout, flush=True)


def periodic_log(interval: float, stopping: threading.Event) -> None:
    tick = 0
    while not stopping.wait(interval):
        tick += 1
        emit(f"[Autosave] Saved the game (tick {tick})")


def serve_console(max_players: int) -> int:
    players: list[str] = []
    for raw in sys.stdin:
        command, _, argument = raw.rstrip("\r\n").partition(" ")
        if command == "list":
            emit(f"There are {len(players)} of a max of {max_players} players online: "
                 + ", ".join(players))
        elif command == "say":
            emit(f"[Server] {argument}")
        elif command == "join" and argument and argument not in players:
            players.append(argument)
            emit(f"{argument} joined the game")
        elif command == "leave" and argument in players:
            players.remove(argument)
            emit(f"{argument} left the game")
        elif command == "echo":
            emit(argument, prefixed=False)
        elif command == "crash":
            emit("Simulated crash: java.lang.OutOfMemoryError", stream=sys.stderr)
            return 1
        elif command == "stop":
            break
        elif command == "help":
            emit("Commands: list, say <msg>, join <name>, leave <name>, echo <text>, crash, stop")
        elif command:
            emit('Unknown command. Type "help" for help.')
    emit("Stopping the server")
    emit("Saving chunks for level 'world'")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.agent.gameserver")
    parser.add_argument("--log-interval", type=float, default=5.0)
    parser.add_argument("--startup-seconds", type=float, default=0.2)
    parser.add_argument("--version", default="1.20.1")
    parser.add_argument("--max-players", type=int, default=20)
    args = parser.parse_args()
    started = time.monotonic()
    emit(f"Starting minecraft server version {args.version}")
    emit("Loading properties")
    emit('Preparing level "world"')
    time.sleep(args.startup_seconds)
    emit(f'Done ({time.monotonic() - started:.3f}s)! For help, type "help"')
    stopping = threading.Event()
    if args.log_interval > 0:
        threading.Thread(target=periodic_log, args=(args.log_interval, stopping),
                         daemon=True).start()
    try:
        return serve_console(args.max_players)
    finally:
        stopping.set()


if __name__ == "__main__":
    sys.exit(main())
