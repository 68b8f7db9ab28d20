"""Fault injection for simulated agents: parsing `--fault` specs and choosing the faulty agents.

A spec is `KIND[:ARG][@PCT%]`: `latency:0.2@10%`, `hang@1%`, `error500@2%`, `notready@5%`,
`garbage@1%`, `reset@1%`, `flap:5@2%`. Without `@PCT%` every agent gets it. A rule with share p
picks exactly round(p x count) agents with a seeded RNG, so a run is reproducible. Pure: no I/O.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

FAULT_KINDS = {
    "latency": True,  # delay every answer by ARG seconds
    "hang": False,  # never answer; hold the connection until the client gives up
    "error500": False,  # 500 with the error envelope
    "notready": False,  # /ready answers 200 {"ready": false}
    "garbage": False,  # 200 with a body that is not JSON
    "reset": False,  # close the connection with a TCP reset, no answer
    "flap": True,  # alternate ARG seconds healthy, ARG seconds answering like `reset`
}


class FaultSpecError(ValueError):
    pass


@dataclass(frozen=True)
class Fault:
    kind: str
    argument: float = 0.0

    def __str__(self) -> str:
        return f"{self.kind}:{self.argument:g}" if FAULT_KINDS[self.kind] else self.kind


@dataclass(frozen=True)
class FaultRule:
    fault: Fault
    share: float  # 0..1 of the fleet


def parse_fault(text: str) -> Fault:
    kind, colon, argument = text.strip().partition(":")
    if kind not in FAULT_KINDS:
        raise FaultSpecError(f"unknown fault {kind!r} (known: {', '.join(FAULT_KINDS)})")
    if FAULT_KINDS[kind] != bool(colon):
        raise FaultSpecError(f"fault {kind!r} {'needs' if FAULT_KINDS[kind] else 'takes no'} :ARG")
    try:
        value = float(argument) if colon else 0.0
    except ValueError:
        raise FaultSpecError(f"bad argument in {text!r}") from None
    if value < 0 or (kind == "flap" and value == 0):
        raise FaultSpecError(f"bad argument in {text!r}")
    return Fault(kind, value)


def parse_rule(text: str) -> FaultRule:
    spec, at, share = text.partition("@")
    if not at:
        return FaultRule(parse_fault(spec), 1.0)
    try:
        percent = float(share.strip().removesuffix("%"))
    except ValueError:
        raise FaultSpecError(f"bad share in {text!r}") from None
    if not 0 <= percent <= 100:
        raise FaultSpecError(f"share out of range in {text!r}")
    return FaultRule(parse_fault(spec), percent / 100)


def assign_faults(rules: Sequence[FaultRule], count: int, seed: int) -> list[list[Fault]]:
    """For each agent index, the faults it carries."""
    chooser = random.Random(seed)
    assigned: list[list[Fault]] = [[] for _ in range(count)]
    for rule in rules:
        for index in chooser.sample(range(count), int(rule.share * count + 0.5)):
            assigned[index].append(rule.fault)
    return assigned
