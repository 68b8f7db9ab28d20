"""What every control handler can reach: the parts assembled once at start-up (see control/app.py)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from gateway.metrics import Metrics
from storage.db import Store

from .auth.tokens import TokenService
from .config import Settings
from .mailer import Mailer
from .sessions import Sessions


@dataclass
class Services:
    settings: Settings
    store: Store
    tokens: TokenService
    metrics: Metrics
    mailer: Mailer
    sessions: Sessions  # control.sessions.Sessions: ended logins and inactive accounts, in memory
    agents: Any = None  # gateway.agent_client.AgentClient
    provisioner: Any = None  # control.provisioning.Provisioner
    poller: Any = None  # gateway.poller.Poller
    billing: Any = None  # control.billing.Billing
    upstream: Any = None  # gateway.upstream.UpstreamPool (data-plane streams)
    consoles: Any = None  # gateway.console.ConsoleRelay
    ide_activity: Any = None  # control.dev.IdeActivityRecorder
    environments: Any = None  # control.environments.EnvironmentService (dev environments API v1)
    edge: Any = None  # control.edge.EdgePublisher (NoEdge unless edge publishing is configured)
    edge_outbox: Any = None  # control.edge.outbox.Outbox, the publishing worker (None with NoEdge)
    cluster: Any = None  # control.cluster.ClusterService (None: one process owns everything, e.g. SQLite)
    events: Any = None  # control.cluster.FleetEvents: events that must reach every replica's connections
    takeover: Any = None  # control.cluster.OperationTakeover: which operations in progress this replica drives
    ide: Any = None  # control.dev.HostedIde: the IDE proxy with its rule
    running: set[str] = field(default_factory=set)  # background services that are up, for /ready
    started: float = field(default_factory=time.monotonic)  # when this process assembled them (uptime)
    extra: dict[str, Any] = field(default_factory=dict)
