"""The DNS adapter for the PowerDNS authoritative HTTP API: replace or delete whole RRsets in one
zone with `PATCH /api/v1/servers/{server}/zones/{zone}`. Both are idempotent, which is what lets the
outbox retry a change without ever duplicating a record. Every call has a timeout; this module never
decides *which* records exist (see names.py) and never touches names outside its zone."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import httpx

from . import EdgeError


@dataclass(frozen=True)
class DnsRecord:
    name: str  # without the trailing dot
    type: str  # A | SRV
    content: str
    ttl: int = 60


def canonical(name: str) -> str:
    return name.strip(".").lower() + "."


class PowerDns:
    def __init__(self, api_url: str, api_key: str, zone: str, *, server_id: str = "localhost",
                 timeout: float = 10.0) -> None:
        self.api_url = api_url.rstrip("/")
        self.api_key = api_key
        self.zone = canonical(zone)
        self.server_id = server_id
        self.timeout = timeout

    @property
    def zone_url(self) -> str:
        return f"{self.api_url}/api/v1/servers/{self.server_id}/zones/{self.zone}"

    async def _patch(self, rrsets: list[dict[str, Any]]) -> None:
        if not rrsets:
            return
        try:
            async with httpx.AsyncClient(timeout=self.timeout) as client:
                response = await client.patch(self.zone_url, json={"rrsets": rrsets},
                                              headers={"X-API-Key": self.api_key})
        except httpx.HTTPError as exc:
            raise EdgeError(f"PowerDNS unreachable at {self.api_url}: {exc!r}") from exc
        if response.status_code != 204:
            raise EdgeError(f"PowerDNS refused the change ({response.status_code}): {response.text[:500]}")

    async def replace(self, records: list[DnsRecord]) -> None:
        """Make each (name, type) hold exactly the given records."""
        grouped: dict[tuple[str, str], list[DnsRecord]] = {}
        for record in records:
            grouped.setdefault((canonical(record.name), record.type), []).append(record)
        await self._patch([
            {"name": name, "type": rtype, "ttl": group[0].ttl, "changetype": "REPLACE",
             "records": [{"content": r.content, "disabled": False} for r in group]}
            for (name, rtype), group in grouped.items()
        ])

    async def delete(self, records: list[DnsRecord]) -> None:
        """Remove each (name, type) entirely; deleting what is not there succeeds."""
        keys = dict.fromkeys((canonical(r.name), r.type) for r in records)
        await self._patch([{"name": name, "type": rtype, "changetype": "DELETE"} for name, rtype in keys])
