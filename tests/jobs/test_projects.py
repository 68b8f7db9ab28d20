"""Projects from strictly validated YAML: import (inline and from a file), list/get/delete, icon,
reload; every kind of configuration error names the field's path."""

from __future__ import annotations

from pathlib import Path

from tests.jobs.conftest import PROJECT_YAML, Jobs


async def _import_error(jobs: Jobs, text: str) -> list[dict]:
    response = await jobs.client.post("/api/v1/projects/import", json={"yaml": text}, headers=jobs.operator)
    assert response.status_code == 422, response.text
    assert response.json()["error"] == "INVALID_PROJECT_CONFIG"
    return response.json()["details"]


async def test_unknown_fields_and_wrong_types_are_rejected_with_their_path(jobs: Jobs) -> None:
    unknown = PROJECT_YAML.replace("        run: echo packaging", "        run: echo packaging\n        rn: typo")
    (problem,) = await _import_error(jobs, unknown)
    assert problem["field"] == "pipelines.0.steps.1.rn" and problem["type"] == "extra_forbidden"
    assert problem["line"] == unknown.splitlines().index("        rn: typo") + 1

    wrong_type = PROJECT_YAML.replace("    max_attempts: 2", "    max_attempts: two")
    (problem,) = await _import_error(jobs, wrong_type)
    assert problem["field"] == "pipelines.0.max_attempts" and problem["type"] == "int_type"

    # Strict: a YAML number is not a string, and "yes" is not a list.
    quoted = PROJECT_YAML.replace("  description: Demo service", "  description: 42")
    assert (await _import_error(jobs, quoted))[0]["field"] == "project.description"
    labels = PROJECT_YAML.replace("    labels: [linux]\n    max_attempts", "    labels: yes\n    max_attempts")
    assert (await _import_error(jobs, labels))[0]["field"] == "pipelines.0.labels"

    missing = PROJECT_YAML.replace("      - name: unit\n        run: echo testing\n", "      - name: unit\n")
    assert (await _import_error(jobs, missing))[0]["field"] == "pipelines.1.steps.0.run"


async def test_syntax_duplicates_and_dangling_references_are_errors(jobs: Jobs) -> None:
    (syntax,) = await _import_error(jobs, "project:\n  name: [unclosed\n")
    assert syntax["type"] == "yaml_syntax" and syntax["line"] is not None
    (duplicate,) = await _import_error(jobs, PROJECT_YAML.replace("  default_ref: main", "  default_ref: main\n  name: again"))
    assert duplicate["type"] == "yaml_syntax" and "duplicate key" in duplicate["message"]
    (dangling,) = await _import_error(jobs, PROJECT_YAML.replace("pipelines: [build, test]", "pipelines: [build, deploy]"))
    assert dangling["field"] == "chains.0.pipelines.1" and "deploy" in dangling["message"]
    twice = await _import_error(jobs, PROJECT_YAML.replace("  - name: test\n", "  - name: build\n"))
    assert [p["field"] for p in twice] == ["pipelines.1.name", "chains.0.pipelines.1"]  # every problem at once
    (vault,) = await _import_error(jobs, PROJECT_YAML.replace("  default_ref: main", "  vault_connection: nope"))
    assert vault["field"] == "project.vault_connection"
    assert (await _import_error(jobs, "- just\n- a list\n"))[0]["type"] == "model_type"
    listing = await jobs.client.get("/api/v1/projects", headers=jobs.operator)
    assert listing.json() == {"projects": []}  # nothing half-stored


async def test_import_list_get_delete(jobs: Jobs) -> None:
    project = await jobs.import_project()
    assert [p["name"] for p in project["pipelines"]] == ["build", "test"]
    assert project["pipelines"][0]["steps"][1] == {"name": "package", "run": "echo packaging"}
    assert project["chains"] == [{"id": project["chains"][0]["id"], "project_id": project["id"], "name": "release",
                                  "pipelines": ["build", "test"]}]
    again = await jobs.client.post("/api/v1/projects/import", json={"yaml": PROJECT_YAML}, headers=jobs.operator)
    assert again.status_code == 409 and again.json()["error"] == "PROJECT_EXISTS"
    both = await jobs.client.post("/api/v1/projects/import", json={"yaml": PROJECT_YAML, "path": "/x.yaml"},
                                  headers=jobs.operator)
    assert both.status_code == 422
    listing = await jobs.client.get("/api/v1/projects", headers=jobs.operator)
    assert [p["name"] for p in listing.json()["projects"]] == ["demo"]
    one = await jobs.client.get(f"/api/v1/projects/{project['id']}", headers=jobs.operator)
    assert one.json()["pipelines"] == project["pipelines"]
    icon = await jobs.client.get(f"/api/v1/projects/{project['id']}/icon", headers=jobs.operator)
    assert icon.headers["content-type"].startswith("image/svg+xml") and b">D</text>" in icon.content
    assert (await jobs.client.delete(f"/api/v1/projects/{project['id']}", headers=jobs.operator)).status_code == 204
    assert (await jobs.client.get(f"/api/v1/projects/{project['id']}", headers=jobs.operator)).status_code == 404
    assert (await jobs.client.delete(f"/api/v1/projects/{project['id']}", headers=jobs.operator)).status_code == 404
    assert (await jobs.client.get("/api/v1/projects")).status_code == 401


async def test_path_import_serves_the_icon_and_reload_rereads_the_file(jobs: Jobs, tmp_path: Path) -> None:
    source = tmp_path / "repo" / "zlh.yaml"
    source.parent.mkdir()
    source.write_text(PROJECT_YAML.replace("  default_ref: main", "  default_ref: main\n  icon: icon.svg"))
    (source.parent / "icon.svg").write_text("<svg id='mine'/>")
    refused = await jobs.client.post("/api/v1/projects/import", json={"path": str(source)}, headers=jobs.operator)
    assert refused.status_code == 403
    imported = await jobs.client.post("/api/v1/projects/import", json={"path": str(source)}, headers=jobs.admin)
    assert imported.status_code == 201, imported.text
    project = imported.json()
    assert (await jobs.client.get(f"/api/v1/projects/{project['id']}/icon", headers=jobs.operator)).status_code == 404
    icon = await jobs.client.get(f"/api/v1/projects/{project['id']}/icon", headers=jobs.admin)
    assert icon.content == b"<svg id='mine'/>"

    source.write_text(source.read_text().replace("chains:", "  - name: lint\n    steps:\n      - name: ruff\n"
                                                              "        run: ruff check\nchains:"))
    reloaded = await jobs.client.post(f"/api/v1/projects/{project['id']}/reload", headers=jobs.admin)
    assert reloaded.status_code == 200, reloaded.text
    pipelines = reloaded.json()["pipelines"]
    assert [p["name"] for p in pipelines] == ["build", "test", "lint"]
    assert pipelines[0]["id"] == project["pipelines"][0]["id"]  # surviving pipelines keep their ids

    source.write_text(source.read_text().replace("run: ruff check", "runs: ruff check"))
    broken = await jobs.client.post(f"/api/v1/projects/{project['id']}/reload", headers=jobs.admin)
    fields = {p["field"] for p in broken.json()["details"]}
    assert broken.status_code == 422 and fields == {"pipelines.2.steps.0.run", "pipelines.2.steps.0.runs"}
    unchanged = await jobs.client.get(f"/api/v1/projects/{project['id']}", headers=jobs.admin)
    assert [p["name"] for p in unchanged.json()["pipelines"]] == ["build", "test", "lint"]
