"""The local provider answers to the database: on start it reaps every container the database does not
name (agent process and directory) and keeps the ones it names; a second provider (another replica's
data directory) adopts a container by its recorded identity instead of making a second one, and a
process spawned in a container directory without a recorded pid is still found and stopped. Real
agent processes throughout."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import trio

from control.providers.base import ContainerSpec
from control.providers.local import LocalProvider, _processes_in, process_alive


def spec(vmid: int, secret: str) -> ContainerSpec:
    return ContainerSpec(vmid=vmid, kind="game", name=f"s{vmid}", hostname=f"game-{vmid}", engine_type="minecraft",
                         cores=1, memory_mb=512, disk_gb=1, agent_secret=secret)


async def test_start_reaps_containers_the_database_does_not_name_and_keeps_the_others(tmp_path: Path) -> None:
    first = LocalProvider(tmp_path / "replica")
    kept = await first.create(spec(1001, "kept-secret-0123456789"))
    await first.create(spec(1002, "orphan-secret-0123456789"))
    orphan_pid = first._record(1002)["pid"]  # type: ignore[index]
    try:
        async def recorded() -> dict[int, str | None]:
            return {1001: kept.provider_ref}  # 1002: a dead driver's, superseded: nobody names it

        restarted = LocalProvider(tmp_path / "replica", recorded=recorded)
        async with trio.open_nursery() as nursery:
            await nursery.start(restarted.run)
            nursery.cancel_scope.cancel()
        assert await restarted.list_vmids() == {1001}
        assert not (first.root / "1002").exists()
        with trio.fail_after(10):
            while process_alive(orphan_pid):
                await trio.sleep(0.05)
        assert (await restarted.current(1001)) == kept  # the same agent, re-adopted, not restarted
    finally:
        await first.destroy(1001)
        await first.destroy(1002)


async def test_another_replica_adopts_the_recorded_container_instead_of_making_a_second(tmp_path: Path) -> None:
    dead = LocalProvider(tmp_path / "r1")
    survivor = LocalProvider(tmp_path / "r2")
    made = await dead.create(spec(1003, "adopt-secret-0123456789"))
    try:
        assert made.provider_ref == dead.placement(spec(1003, "x"))
        assert await survivor.find(1003, made.provider_ref, "another-secret") is None  # not made for it
        adopted = await survivor.find(1003, made.provider_ref, "adopt-secret-0123456789")
        assert adopted == made  # same directory, same agent, same port
        assert await survivor.status(1003) == "running"
        assert len(_processes_in(Path(made.provider_ref))) == 1
        await survivor.stop(1003)  # the adopted container is operable here
        assert await dead.status(1003) == "stopped"
    finally:
        await survivor.destroy(1003)
    assert not Path(made.provider_ref).exists() and not (survivor.root / "1003").exists()


async def test_a_process_in_a_container_directory_without_a_recorded_pid_is_stopped(tmp_path: Path) -> None:
    provider = LocalProvider(tmp_path / "replica")
    made = await provider.create(spec(1004, "stray-secret-0123456789"))
    directory = Path(made.provider_ref)
    # what a driver killed between spawning and recording leaves: a process there nobody recorded
    stray = await trio.to_thread.run_sync(lambda: subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(60)"], cwd=directory, start_new_session=True))
    try:
        assert stray.pid in _processes_in(directory)
        await provider.destroy(1004)
        with trio.fail_after(10):
            while stray.poll() is None:
                await trio.sleep(0.05)
        assert not directory.exists()
    finally:
        if stray.poll() is None:
            os.kill(stray.pid, 9)
