"""The local provider with a relative data directory, as `make run` uses it (`data/`): each agent runs
with its container directory as its working directory, so every path handed to it must be absolute."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
import trio

from control.providers.base import ContainerSpec
from control.providers.local import LocalProvider


async def test_an_agent_starts_from_a_relative_data_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    provider = LocalProvider(Path("data"))
    spec = ContainerSpec(vmid=1000, kind="dev", name="rel", hostname="dev-1000", engine_type="vscode", cores=1,
                         memory_mb=512, disk_gb=1, agent_secret="relative-path-secret")
    container = await provider.create(spec)
    try:
        async with httpx.AsyncClient(timeout=5) as client:
            with trio.fail_after(20):
                while True:
                    try:
                        answer = await client.get(f"http://127.0.0.1:{container.agent_port}/health",
                                                  headers={"authorization": "Bearer relative-path-secret"})
                        break
                    except httpx.TransportError:
                        await trio.sleep(0.1)
        assert answer.status_code == 200
    finally:
        await provider.destroy(1000)
