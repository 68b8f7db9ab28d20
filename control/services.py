"""What every control handler can reach: the parts assembled once at start-up (see control/app.py)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from gateway.metrics import Metrics
from storage.db import Store

from .auth.tokens import TokenService
from .config import Settings
from .mailer import Mailer


@dataclass
class Services:
    settings: Settings
    store: Store
    tokens: TokenService
    metrics: Metrics
    mailer: Mailer
    agents: Any = None  # gateway.agent_client.AgentClient
    provisioner: Any = None  # control.provisioning.Provisioner
    poller: Any = None  # gateway.poller.Poller
    upstream: Any = None  # gateway.upstream.UpstreamPool (data-plane streams)
    running: set[str] = field(default_factory=set)  # background services that are up, for /ready
    extra: dict[str, Any] = field(default_factory=dict)
