"""Which runner may take which job: the one rule used by the lease, by eligible-agents and by the
dry-run previews, so a preview never promises what the lease would refuse. Pure: no I/O."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

OFFLINE_CACHED = "offline_cached"


@dataclass(frozen=True)
class Demand:
    """What a job asks of a runner."""

    project: str
    labels: tuple[str, ...]
    source_ref: str | None
    pinned_agent_id: str | None
    offline_cached: bool
    needs_shared_runner: bool = False  # the job belongs to a regular user


def has_cached_source(cached_sources: list[dict[str, Any]], project: str, ref: str | None) -> bool:
    return ref is not None and any(
        entry.get("project") == project and entry.get("ref") == ref for entry in cached_sources)


def reasons_against(runner_id: str, labels: list[str], cached_sources: list[dict[str, Any]],
                    demand: Demand, *, shared: bool) -> list[str]:
    """Why this runner cannot take the job (empty when it can). Liveness and activation are the
    caller's concern: the lease already knows the runner is calling, previews check them apart.
    A regular user's job runs only on a runner an admin shared (previews never even list the others)."""
    reasons = []
    if demand.needs_shared_runner and not shared:
        reasons.append("agent is not shared with regular users")
    if demand.pinned_agent_id is not None and demand.pinned_agent_id != runner_id:
        reasons.append("job is pinned to another agent")
    missing = sorted(set(demand.labels) - set(labels))
    if missing:
        reasons.append(f"missing labels: {', '.join(missing)}")
    if demand.offline_cached and not has_cached_source(cached_sources, demand.project, demand.source_ref):
        reasons.append("source not cached for offline execution")
    return reasons
