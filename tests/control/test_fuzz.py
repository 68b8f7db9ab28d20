"""Schemathesis over the live gateway's /openapi.json: the real app on a real socket (port 0), billing
configured against the project's Stripe test server, fuzzed as a regular user and as an admin with
the "not a server error" check. Zero failures, and no traceback in the gateway's log.

The gateway runs in this test's Trio loop; schemathesis runs as its CLI in a child process, so its
synchronous HTTP client never blocks the loop that serves it.

Not fuzzed (genuinely unfuzzable as generated requests, each covered by its own tests):
- the websocket console (`GET /api/servers/{server_id}/console`): an upgrade, not a request/response;
- the streaming uploads (`PUT|POST …/files/upload`, `PATCH …/files/uploads/{upload_id}`,
  `POST /api/v1/jobs/{job_id}/artifacts`): raw bodies streamed to an agent or the artifact store;
- `POST /api/v1/server/restart` (admin): a valid request stops this very process with SIGTERM
  (tests/jobs/test_server_restart.py covers it in a child process);
- as admin only, provisioning (`POST /api/instances`, `POST /api/v1/environments`): admins have no
  plan limit, so every valid example would start one more real agent process; the regular user's
  run fuzzes both within the free plan's limits.
One worker: with several, hypothesis's lambda-source cache (shared between threads) fails now and then
with "AST constructor recursion depth mismatch", an error of the tool, not of the gateway.
The coverage phase skips methods a path does not declare (one generic 405, tests/control/test_errors.py)."""

from __future__ import annotations

import io
import logging
import os
import subprocess
import sys
from pathlib import Path
from xml.etree import ElementTree

import pytest
import trio

from control.config import Settings
from gateway.logs import configure_logging
from storage.models import User
from tests.billing.conftest import API_KEY, WEBHOOK_SECRET
from tests.billing.stripe_server import FakeStripe
from tests.conftest import Gateway
from tests.environments.conftest import in_db

MAX_EXAMPLES = 4  # fuzzing phase, per operation; the coverage phase adds its boundary cases (~20 per operation)
UNFUZZABLE = ("^(get_api_servers_server_id_console|(put|post)_api_(game_)?servers_server_id_files_upload"
              "|patch_api_(game_)?servers_server_id_files_uploads_upload_id|post_api_v1_jobs_job_id_artifacts"
              "|server_restart)(_at_.*)?$")
ADMIN_UNFUZZABLE = UNFUZZABLE + "|^(create_instance|create_environment)$"
CONFIG = "[phases.coverage]\nunexpected-methods = []\n"


@pytest.fixture
async def fake_stripe(nursery: trio.Nursery) -> FakeStripe:
    server = FakeStripe(API_KEY)
    await nursery.start(server.serve)
    return server


@pytest.fixture
def settings(settings: Settings, fake_stripe: FakeStripe) -> Settings:
    settings.plans = [dict(plan, stripe_price_id=fake_stripe.create_price(500 * (i + 1), plan["name"]))
                      if plan["name"] != "free" else plan for i, plan in enumerate(settings.plans)]
    settings.stripe_secret_key = API_KEY
    settings.stripe_webhook_secret = WEBHOOK_SECRET
    settings.stripe_api_base = fake_stripe.url
    settings.public_url = "https://portal.zlh.test"
    settings.billing_interval = 3600
    settings.source_timeout = 2.0
    return settings


async def fuzz(gateway: Gateway, session: dict, report: Path, excluded: str = UNFUZZABLE) -> tuple[int, str]:
    config = report.parent / "schemathesis.toml"
    config.write_text(CONFIG)
    command = [sys.executable, "-m", "schemathesis.cli", "--config-file", str(config), "run",
               f"{gateway.url}/openapi.json", "--checks", "not_a_server_error", "--max-examples", str(MAX_EXAMPLES),
               "--seed", "16", "--phases", "coverage,fuzzing", "--workers", "1", "--request-timeout", "20",
               "--suppress-health-check", "all", "--no-shrink", "--output-truncate", "true",
               "--header", f"Authorization: Bearer {session['accessToken']}",
               "--exclude-operation-id-regex", excluded,  # one option: a second one would replace the first
               "--report", "junit", "--report-junit-path", str(report)]
    env = {**os.environ, "NO_COLOR": "1"}
    result = await trio.run_process(command, capture_stdout=True, stderr=subprocess.STDOUT, check=False,
                                    cwd=report.parent, env=env)
    return result.returncode, result.stdout.decode(errors="replace")


async def test_fuzzing_the_openapi_finds_no_server_error(gateway: Gateway, tmp_path: Path) -> None:
    log = io.StringIO()
    configure_logging("INFO", log)
    try:
        user = await gateway.register("fuzz-user@example.com", "password123")
        admin = await gateway.register("fuzz-admin@example.com", "password123")
        await in_db(lambda: User.update(role="admin").where(User.id == admin["user"]["id"]).execute())
        admin = (await gateway.client.post("/api/auth/login", json={"email": "fuzz-admin@example.com",
                                                                     "password": "password123"})).json()
        outcomes = [await fuzz(gateway, user, tmp_path / "user.xml"),
                    await fuzz(gateway, admin, tmp_path / "admin.xml", ADMIN_UNFUZZABLE)]
    finally:
        logging.getLogger().handlers.clear()
    errors = [line for line in log.getvalue().splitlines() if "Traceback" in line or '"level": "error"' in line]
    failures = [failure for report in ("user", "admin") for failure in junit_failures(tmp_path / f"{report}.xml")]
    assert not failures and not errors, "\n".join(failures + errors[:10]) + "\n" + outcomes[-1][1][-3000:]
    assert [code for code, _ in outcomes] == [0, 0], "\n".join(output[-6000:] for _, output in outcomes)
    assert '"logger": "zlh.access"' in log.getvalue()  # the log was captured


def junit_failures(report: Path) -> list[str]:
    """`operation: reproducing curl` for each failure schemathesis wrote into its JUnit report."""
    found = []
    for case in ElementTree.parse(report).iter("testcase"):
        for failure in case:
            if failure.tag in ("failure", "error"):
                text = failure.text or failure.get("message") or ""
                curl = next((line.strip() for line in text.splitlines() if "curl " in line), text[:300])
                found.append(f"{report.stem} {case.get('name')}: {curl[:600]}")
    return found
