"""Hosted IDE host names: the `dev-<id>.<IDE_DOMAIN>` name each dev container's code-server is
reached by through the gateway's IDE proxy. Names only: this module never talks to anything."""

from __future__ import annotations

from . import PublishedInstance


def ide_host(instance_id: int, ide_domain: str) -> str:
    return f"dev-{instance_id}.{ide_domain.strip('.').lower()}"


def ide_hosts_for(instance: PublishedInstance, ide_domain: str) -> list[str]:
    """The IDE host names a published instance answers on (none unless it is a dev container)."""
    if instance.kind != "dev" or not ide_domain:
        return []
    return [ide_host(instance.instance_id, ide_domain)]
