"""The job backend's tables and the small functions that read and write them: runner agents, projects
with their pipelines and chains, jobs, artifacts (metadata; the bytes live on disk), test results and
vault connections. Every function here runs inside one `Store.run` unit (one transaction).

Theory of operation. A job row changes state only through a compare-and-set: `UPDATE … WHERE id = ?
AND status IN (<states the caller's transition table allows>)`, and the row count says whether the
change happened. The transition table itself lives in control/jobs/lifecycle.py; this module only
ever moves a row between the states it is handed, so two writers racing on one job (a runner
reporting, an operator cancelling, the lease reaper) never both win.

Leasing: on PostgreSQL the claim locks its candidate with `SELECT … FOR UPDATE SKIP LOCKED`, so
concurrent runners on any replica skip a row another runner is claiming instead of queueing behind it,
then flips it with the conditional UPDATE. SQLite has one writer at a time; there every writing unit
here *begins* with a write (the runner's touch, or the conditional UPDATE itself), so it takes the
write lock first and waits on busy_timeout, instead of reading a snapshot that a later write cannot
upgrade. The conditional UPDATE plus its row count is the claim.

Ownership: projects, jobs and vault connections carry `owner_id` (the user who created them; NULL only
for rows older than m0010 on a database that had no admin, which only admins see); runners carry the
admin who registered them and whether they are `shared` with regular users. The listing functions take
an optional `owner_id` filter; which filter applies to whom is control/jobs/access.py's decision.

This module never decides policy (who may lease what, what a transition means) and never touches files.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from datetime import datetime
from typing import Any, TypeVar

import peewee
import trio

from .clock import utcnow
from .db import Store, database, is_postgres
from .models import BaseModel, JSONField, User

T = TypeVar("T")


class Runner(BaseModel):
    """A runner agent: leases jobs and reports on them. Its token is kept only as a hash."""

    id = peewee.CharField(primary_key=True, max_length=40)
    name = peewee.CharField(max_length=128)
    token_hash = peewee.CharField(unique=True, max_length=128)
    labels = JSONField(default=list)
    owner_id = peewee.IntegerField(null=True, index=True)  # the admin who registered it
    shared = peewee.BooleanField(default=False)  # may lease regular users' jobs
    active = peewee.BooleanField(default=True)
    version = peewee.CharField(null=True, max_length=64)
    hostname = peewee.CharField(null=True, max_length=255)
    cached_sources = JSONField(default=list)  # [{"project": name, "ref": sha}, …] as last reported
    last_heartbeat_at = peewee.DateTimeField(null=True)
    deactivated_at = peewee.DateTimeField(null=True)
    created_at = peewee.DateTimeField(default=utcnow)


class Project(BaseModel):
    name = peewee.CharField(unique=True, max_length=128)  # the key runners report cached sources by
    owner_id = peewee.IntegerField(null=True, index=True)
    description = peewee.TextField(default="")
    repository = peewee.CharField(null=True, max_length=1024)
    default_ref = peewee.CharField(max_length=255, default="main")
    vault_connection = peewee.CharField(null=True, max_length=128)
    icon = peewee.CharField(null=True, max_length=255)  # file name inside source_path
    source_path = peewee.CharField(null=True, max_length=1024)  # where reload re-reads the YAML
    config_yaml = peewee.TextField()
    created_at = peewee.DateTimeField(default=utcnow)
    loaded_at = peewee.DateTimeField(default=utcnow)


class Pipeline(BaseModel):
    project = peewee.ForeignKeyField(Project, on_delete="CASCADE", backref="pipelines")
    project_id: int  # the key column peewee adds beside `project`
    name = peewee.CharField(max_length=128)
    spec = JSONField()  # the validated pipeline section of the project YAML

    class Meta:
        indexes = ((("project", "name"), True),)


class PipelineChain(BaseModel):
    project = peewee.ForeignKeyField(Project, on_delete="CASCADE", backref="chains")
    project_id: int  # the key column peewee adds beside `project`
    name = peewee.CharField(max_length=128)
    pipelines = JSONField()  # ordered pipeline names

    class Meta:
        indexes = ((("project", "name"), True),)


class Job(BaseModel):
    project_name = peewee.CharField(max_length=128)
    pipeline = peewee.ForeignKeyField(Pipeline, null=True, on_delete="SET NULL", backref="jobs")
    pipeline_id: int | None  # the key column peewee adds beside `pipeline`
    pipeline_name = peewee.CharField(max_length=128)
    chain = peewee.ForeignKeyField(PipelineChain, null=True, on_delete="SET NULL", backref="jobs")
    chain_id: int | None  # the key column peewee adds beside `chain`
    chain_run = peewee.CharField(null=True, max_length=40, index=True)
    depends_on = peewee.IntegerField(null=True, index=True)  # job that must be done before this leases
    status = peewee.CharField(max_length=16, index=True)
    agent_id = peewee.CharField(null=True, max_length=40, index=True)  # the runner holding the lease
    pinned_agent_id = peewee.CharField(null=True, max_length=40)
    labels = JSONField(default=list)
    steps = JSONField(default=list)
    env = JSONField(default=dict)
    source_ref = peewee.CharField(null=True, max_length=255)
    execution_mode = peewee.CharField(max_length=32, default="standard")
    timeout_seconds = peewee.IntegerField(default=3600)
    output = peewee.TextField(default="")
    error = peewee.TextField(null=True)
    exit_code = peewee.IntegerField(null=True)
    attempts = peewee.IntegerField(default=0)
    max_attempts = peewee.IntegerField(default=1)
    lease_expires_at = peewee.DateTimeField(null=True, index=True)
    rerun_of = peewee.IntegerField(null=True)
    requested_by = peewee.IntegerField(null=True)
    owner_id = peewee.IntegerField(null=True, index=True)  # who queued it (a rerun: who asked for the rerun)
    created_at = peewee.DateTimeField(default=utcnow)
    leased_at = peewee.DateTimeField(null=True)
    started_at = peewee.DateTimeField(null=True)
    finished_at = peewee.DateTimeField(null=True)


class JobArtifact(BaseModel):
    job = peewee.ForeignKeyField(Job, on_delete="CASCADE", backref="artifacts")
    job_id: int  # the key column peewee adds beside `job`
    name = peewee.CharField(max_length=255)
    size = peewee.BigIntegerField()
    sha256 = peewee.CharField(max_length=64)
    created_at = peewee.DateTimeField(default=utcnow)

    class Meta:
        indexes = ((("job", "name"), True),)


class JobTestCase(BaseModel):
    job = peewee.ForeignKeyField(Job, on_delete="CASCADE", backref="test_cases")
    job_id: int  # the key column peewee adds beside `job`
    suite = peewee.CharField(max_length=255)
    name = peewee.CharField(max_length=512)
    status = peewee.CharField(max_length=16)  # passed | failed | skipped | error
    duration_ms = peewee.FloatField(null=True)
    message = peewee.TextField(null=True)
    created_at = peewee.DateTimeField(default=utcnow)


class VaultConnection(BaseModel):
    """Credentials the job backend uses; `sealed_secret` is ciphertext only (see control/jobs/sealing.py)."""

    name = peewee.CharField(unique=True, max_length=128)
    owner_id = peewee.IntegerField(null=True, index=True)
    kind = peewee.CharField(max_length=16)
    url = peewee.CharField(max_length=1024)
    username = peewee.CharField(null=True, max_length=255)
    sealed_secret = peewee.TextField()
    created_at = peewee.DateTimeField(default=utcnow)
    last_tested_at = peewee.DateTimeField(null=True)
    last_test_ok = peewee.BooleanField(null=True)
    last_test_error = peewee.TextField(null=True)


TABLES: list[type[BaseModel]] = [Runner, Project, Pipeline, PipelineChain, Job, JobArtifact, JobTestCase,
                                 VaultConnection]


class NameTaken(Exception):
    pass


async def run(store: Store, work: Callable[..., T], *args: Any) -> T:
    """`store.run`, retried on SQLite when the unit lost the write lock to a concurrent writer
    (SQLITE_BUSY after reading a snapshot). The unit rolled back whole, so running it again is safe."""
    for attempt in range(5):
        try:
            return await store.run(work, *args)
        except peewee.OperationalError as exc:
            if is_postgres(store.db) or "locked" not in str(exc) or attempt == 4:
                raise
            await trio.sleep(0.02 * (attempt + 1))
    raise AssertionError("unreachable")


def _on_new_line(text: str) -> Any:
    """`text` appended to a job's output, starting on a line of its own."""
    fresh = (Job.output == "") | Job.output.endswith("\n")
    return Job.output.concat(peewee.Case(None, [(fresh, text)], "\n" + text))


# Runners

def create_runner(runner_id: str, name: str, token_hash: str, labels: list[str], *, owner_id: int,
                  shared: bool) -> Runner:
    return Runner.create(id=runner_id, name=name, token_hash=token_hash, labels=labels, owner_id=owner_id,
                         shared=shared)


def touch_runner(token_hash: str, now: datetime, lease_until: datetime, live_states: Iterable[str]) -> Runner | None:
    """Authenticate a runner by its token hash; any call it makes counts as a heartbeat, so its
    live leases are extended. The first statement is a write (see the theory above)."""
    if Runner.update(last_heartbeat_at=now).where(Runner.token_hash == token_hash).execute() == 0:
        return None
    runner = Runner.get(Runner.token_hash == token_hash)
    (Job.update(lease_expires_at=lease_until)
        .where((Job.agent_id == runner.id) & Job.status.in_(list(live_states))).execute())
    return runner


def record_heartbeat(runner_id: str, *, version: str | None, hostname: str | None, labels: list[str] | None,
                     cached_sources: list[dict[str, str]]) -> Runner:
    fields: dict[str, Any] = {"version": version, "hostname": hostname, "cached_sources": cached_sources}
    if labels is not None:
        fields["labels"] = labels
    Runner.update(**fields).where(Runner.id == runner_id).execute()
    return Runner.get_by_id(runner_id)


def runner_by_id(runner_id: str) -> Runner | None:
    return Runner.get_or_none(Runner.id == runner_id)


def list_runners(*, shared_only: bool = False) -> list[Runner]:
    query = Runner.select()
    if shared_only:
        query = query.where(Runner.shared == True)  # noqa: E712 (SQL, not Python truth)
    return list(query.order_by(Runner.created_at, Runner.id))


def set_runner_shared(runner_id: str, shared: bool) -> bool:
    return Runner.update(shared=shared).where(Runner.id == runner_id).execute() == 1


def user_ids_with_role(role: str) -> set[int]:
    return {row.id for row in User.select(User.id).where(User.role == role)}


def set_runner_active(runner_id: str, active: bool, now: datetime) -> bool:
    return Runner.update(active=active, deactivated_at=None if active else now).where(
        Runner.id == runner_id).execute() == 1


# Jobs

def create_job(**fields: Any) -> Job:
    return Job.create(**fields)


def job_by_id(job_id: int) -> Job | None:
    return Job.get_or_none(Job.id == job_id)


def _owned_by(model: Any, owner_id: int | None) -> Any:
    """The rows of `owner_id` (None: every row)."""
    return model.id.is_null(False) if owner_id is None else model.owner_id == owner_id


def list_jobs(*, status: str | None = None, agent_id: str | None = None, pipeline_id: int | None = None,
              limit: int = 50, offset: int = 0, owner_id: int | None = None) -> tuple[list[Job], int]:
    query = Job.select().where(_owned_by(Job, owner_id))
    if status is not None:
        query = query.where(Job.status == status)
    if agent_id is not None:
        query = query.where(Job.agent_id == agent_id)
    if pipeline_id is not None:
        query = query.where(Job.pipeline == pipeline_id)
    total = query.count()
    return list(query.order_by(Job.id.desc()).limit(limit).offset(offset)), total


def jobs_held_by(runner_id: str, states: Iterable[str]) -> list[Job]:
    return list(Job.select().where((Job.agent_id == runner_id) & Job.status.in_(list(states))).order_by(Job.id))


def lease_candidates(queued: str, done: str, limit: int = 50, owners: Iterable[int] | None = None) -> list[Job]:
    """Queued jobs, oldest first, whose upstream job (if any) is done; with `owners`, only jobs of those
    owners (or of no owner). Not locked: `claim_job` decides."""
    upstream_done = Job.select(Job.id).where(Job.status == done)
    ready = Job.depends_on.is_null() | Job.depends_on.in_(upstream_done)
    query = Job.select().where((Job.status == queued) & ready)
    if owners is not None:
        query = query.where(Job.owner_id.is_null() | Job.owner_id.in_(list(owners)))
    return list(query.order_by(Job.id).limit(limit))


def claim_job(job_id: int, runner_id: str, *, queued: str, leased: str, now: datetime,
              lease_until: datetime) -> bool:
    """Lease one queued job to `runner_id`; False when another runner got it first."""
    if is_postgres(database):
        locked = (Job.select(Job.id).where((Job.id == job_id) & (Job.status == queued))
                  .for_update(skip_locked=True).first())
        if locked is None:
            return False
    changed = (Job.update(status=leased, agent_id=runner_id, leased_at=now, lease_expires_at=lease_until,
                          attempts=Job.attempts + 1)
               .where((Job.id == job_id) & (Job.status == queued)).execute())
    return changed == 1


def transition_job(job_id: int, from_states: Iterable[str], to_state: str, *, held_by: str | None = None,
                   append_output: str | None = None, append_line: str | None = None, **fields: Any) -> bool:
    """Compare-and-set a job's state; `held_by` also requires that runner to hold the lease.
    `append_output` is added as is (a runner's log chunk), `append_line` on a line of its own."""
    changes: dict[Any, Any] = {Job.status: to_state}
    for name, value in fields.items():
        changes[getattr(Job, name)] = value
    if append_output:
        changes[Job.output] = Job.output.concat(append_output)
    elif append_line:
        changes[Job.output] = _on_new_line(append_line)
    condition = (Job.id == job_id) & Job.status.in_(list(from_states))
    if held_by is not None:
        condition &= Job.agent_id == held_by
    return Job.update(changes).where(condition).execute() == 1


def append_job_output(job_id: int, runner_id: str, live_states: Iterable[str], text: str) -> bool:
    return (Job.update(output=Job.output.concat(text))
            .where((Job.id == job_id) & (Job.agent_id == runner_id) & Job.status.in_(list(live_states)))
            .execute()) == 1


def expire_leases(now: datetime, *, live_states: Iterable[str], requeue_to: str, fail_to: str,
                  requeue_note: str, fail_note: str, error: str) -> tuple[int, int]:
    """Lapsed leases: back to the queue while attempts remain, else failed. Set-based, so a runner's
    concurrent report either lands before (and extends the lease) or finds the state changed."""
    lapsed = Job.status.in_(list(live_states)) & (Job.lease_expires_at < now)
    failed = (Job.update({Job.status: fail_to, Job.error: error, Job.finished_at: now,
                          Job.lease_expires_at: None, Job.output: _on_new_line(fail_note)})
              .where(lapsed & (Job.attempts >= Job.max_attempts)).execute())
    requeued = (Job.update({Job.status: requeue_to, Job.agent_id: None, Job.leased_at: None,
                            Job.started_at: None, Job.lease_expires_at: None,
                            Job.output: _on_new_line(requeue_note)})
                .where(lapsed & (Job.attempts < Job.max_attempts)).execute())
    return requeued, failed


def reaping_due(now: datetime, *, live_states: Iterable[str], waiting: str, upstream_failed: Iterable[str]) -> bool:
    """Whether a reaper pass has anything to do: a read, so an idle pass never takes SQLite's write
    lock (even an UPDATE that matches nothing would, and would break other units' read snapshots)."""
    lapsed = Job.select(Job.id).where(Job.status.in_(list(live_states)) & (Job.lease_expires_at < now))
    dead_upstream = Job.select(Job.id).where(Job.status.in_(list(upstream_failed)))
    blocked = Job.select(Job.id).where((Job.status == waiting) & Job.depends_on.in_(dead_upstream))
    return lapsed.exists() or blocked.exists()


def fail_blocked_jobs(now: datetime, *, waiting: str, upstream_failed: Iterable[str], fail_to: str,
                      error: str, note: str) -> int:
    """Queued jobs whose upstream job ended without success can never run: fail them."""
    dead_upstream = Job.select(Job.id).where(Job.status.in_(list(upstream_failed)))
    return (Job.update({Job.status: fail_to, Job.error: error, Job.finished_at: now,
                        Job.output: _on_new_line(note)})
            .where((Job.status == waiting) & Job.depends_on.in_(dead_upstream)).execute())


def clear_queue(queued: str, to_state: str, now: datetime, error: str, owner_id: int | None = None) -> int:
    return (Job.update(status=to_state, error=error, finished_at=now)
            .where((Job.status == queued) & _owned_by(Job, owner_id)).execute())


def _awaited(terminal: list[str]) -> Any:
    """Jobs an unfinished chain job depends on: kept until it has finished too."""
    return Job.select(Job.depends_on).where(Job.depends_on.is_null(False) & Job.status.not_in(terminal))


def delete_job(job_id: int, terminal: Iterable[str]) -> bool:
    finished = list(terminal)
    return Job.delete().where((Job.id == job_id) & Job.status.in_(finished)
                              & Job.id.not_in(_awaited(finished))).execute() == 1


def flush_history(terminal: Iterable[str], owner_id: int | None = None) -> list[int]:
    finished = list(terminal)
    ids = [row.id for row in Job.select(Job.id).where(
        Job.status.in_(finished) & Job.id.not_in(_awaited(finished)) & _owned_by(Job, owner_id))]
    if ids:
        Job.delete().where(Job.id.in_(ids)).execute()
    return ids


def job_counts(owner_id: int | None = None) -> dict[str, int]:
    rows: Any = (Job.select(Job.status, peewee.fn.COUNT(Job.id).alias("n")).where(_owned_by(Job, owner_id))
                 .group_by(Job.status).tuples())
    return {status: n for status, n in rows}


# Artifacts and test results

def record_artifact(job_id: int, name: str, size: int, sha256: str) -> JobArtifact:
    JobArtifact.delete().where((JobArtifact.job == job_id) & (JobArtifact.name == name)).execute()
    return JobArtifact.create(job=job_id, name=name, size=size, sha256=sha256)


def list_artifacts(job_id: int) -> list[JobArtifact]:
    return list(JobArtifact.select().where(JobArtifact.job == job_id).order_by(JobArtifact.name))


def artifact(job_id: int, name: str) -> JobArtifact | None:
    return JobArtifact.get_or_none((JobArtifact.job == job_id) & (JobArtifact.name == name))


def add_test_cases(job_id: int, suite: str, cases: list[dict[str, Any]]) -> int:
    rows = [{"job": job_id, "suite": suite, **case} for case in cases]
    if rows:
        JobTestCase.insert_many(rows).execute()
    return len(rows)


def list_test_cases(job_id: int) -> list[JobTestCase]:
    return list(JobTestCase.select().where(JobTestCase.job == job_id).order_by(JobTestCase.id))


# Projects, pipelines, chains

def save_project(fields: dict[str, Any], pipelines: list[tuple[str, dict[str, Any]]],
                 chains: list[tuple[str, list[str]]], project_id: int | None = None) -> Project:
    """Create a project (project_id None) or replace its configuration, keeping the ids of pipelines
    and chains whose names survive (their run history stays attached)."""
    if project_id is None:
        if Project.select().where(Project.name == fields["name"]).exists():
            raise NameTaken(fields["name"])
        project = Project.create(**fields)
    else:
        clash = Project.select().where((Project.name == fields["name"]) & (Project.id != project_id)).exists()
        if clash:
            raise NameTaken(fields["name"])
        Project.update(**fields).where(Project.id == project_id).execute()
        project = Project.get_by_id(project_id)
    _replace_children(Pipeline, Pipeline.spec, project, pipelines)
    _replace_children(PipelineChain, PipelineChain.pipelines, project, chains)
    return project


def _replace_children(model: Any, value_field: Any, project: Project, items: list[tuple[str, Any]]) -> None:
    names = [name for name, _ in items]
    model.delete().where((model.project == project.id) & model.name.not_in(names or [""])).execute()
    existing = {row.name: row for row in model.select().where(model.project == project.id)}
    for name, value in items:
        if name in existing:
            model.update({value_field: value}).where(model.id == existing[name].id).execute()
        else:
            model.create(project=project.id, name=name, **{value_field.name: value})


def list_projects(owner_id: int | None = None) -> list[Project]:
    return list(Project.select().where(_owned_by(Project, owner_id)).order_by(Project.name))


def project_by_id(project_id: int) -> Project | None:
    return Project.get_or_none(Project.id == project_id)


def project_by_name(name: str) -> Project | None:
    return Project.get_or_none(Project.name == name)


def pipelines_of(project_id: int) -> list[Pipeline]:
    return list(Pipeline.select().where(Pipeline.project == project_id).order_by(Pipeline.id))


def chains_of(project_id: int) -> list[PipelineChain]:
    return list(PipelineChain.select().where(PipelineChain.project == project_id).order_by(PipelineChain.id))


def delete_project(project_id: int) -> bool:
    return Project.delete().where(Project.id == project_id).execute() == 1


def pipeline_by_id(pipeline_id: int) -> Pipeline | None:
    return Pipeline.select(Pipeline, Project).join(Project).where(Pipeline.id == pipeline_id).first()


def pipeline_by_name(project_id: int, name: str) -> Pipeline | None:
    return Pipeline.get_or_none((Pipeline.project == project_id) & (Pipeline.name == name))


def chain_by_id(chain_id: int) -> PipelineChain | None:
    return PipelineChain.select(PipelineChain, Project).join(Project).where(PipelineChain.id == chain_id).first()


# Vault

def create_vault_connection(name: str, kind: str, url: str, username: str | None, sealed_secret: str,
                            owner_id: int) -> VaultConnection:
    if VaultConnection.select().where(VaultConnection.name == name).exists():
        raise NameTaken(name)
    return VaultConnection.create(name=name, kind=kind, url=url, username=username, sealed_secret=sealed_secret,
                                  owner_id=owner_id)


def list_vault_connections(owner_id: int | None = None) -> list[VaultConnection]:
    return list(VaultConnection.select().where(_owned_by(VaultConnection, owner_id)).order_by(VaultConnection.name))


def vault_connection(connection_id: int) -> VaultConnection | None:
    return VaultConnection.get_or_none(VaultConnection.id == connection_id)


def vault_connection_by_name(name: str) -> VaultConnection | None:
    return VaultConnection.get_or_none(VaultConnection.name == name)


def delete_vault_connection(connection_id: int) -> bool:
    return VaultConnection.delete().where(VaultConnection.id == connection_id).execute() == 1


def record_vault_test(connection_id: int, ok: bool, error: str | None, now: datetime) -> None:
    VaultConnection.update(last_tested_at=now, last_test_ok=ok, last_test_error=error).where(
        VaultConnection.id == connection_id).execute()
