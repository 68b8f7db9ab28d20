"""The OpenAPI document resolves: it validates with openapi-spec-validator, every $ref points into
components (pydantic models hoisted, no dangling $defs), operationIds are unique and named after the
handlers, and every JSON route describes its success body. Served live at /openapi.json."""

from __future__ import annotations

import json
from typing import Any

from openapi_spec_validator import validate

from control.api import MAX_ID
from control.app import control_routes
from tests.conftest import Gateway


def refs(node: Any) -> list[str]:
    if isinstance(node, dict):
        own = [node["$ref"]] if isinstance(node.get("$ref"), str) else []
        return own + [r for value in node.values() for r in refs(value)]
    if isinstance(node, list):
        return [r for value in node for r in refs(value)]
    return []


async def test_the_served_document_validates_and_resolves(gateway: Gateway) -> None:
    spec = (await gateway.client.get("/openapi.json")).json()
    validate(spec)
    assert "$defs" not in json.dumps(spec)
    schemas = spec["components"]["schemas"]
    found = refs(spec["paths"])
    assert "#/components/schemas/Credentials" in found
    for ref in found:
        assert ref.startswith("#/components/schemas/") and ref.rsplit("/", 1)[1] in schemas, ref
    for nested in refs(schemas):  # models nested in models are hoisted too
        assert nested.rsplit("/", 1)[1] in schemas, nested


async def test_operations_are_named_after_handlers_and_describe_json_bodies(gateway: Gateway) -> None:
    spec = (await gateway.client.get("/openapi.json")).json()
    operations = {(path, method): op for path, item in spec["paths"].items() for method, op in item.items()}
    ids = [op["operationId"] for op in operations.values()]
    assert len(ids) == len(set(ids)) == len(control_routes())
    assert operations[("/api/auth/login", "post")]["operationId"] == "login"
    assert operations[("/api/servers/{server_id}", "get")]["operationId"] == "get_server"
    assert {operations[("/api/game/servers/{server_id}/files", "get")]["operationId"],
            operations[("/api/servers/{server_id}/files", "get")]["operationId"]} == {
        "list_files", "list_files_at_api_servers_server_id_files"}
    for route in control_routes():
        op = operations[(route.openapi_path, route.method.lower())]
        if route.handler is not None:
            assert op["operationId"].startswith(route.handler.__name__)
        if not route.data_plane and route.status not in (101, 204):
            assert op["responses"][str(route.status)]["content"], route.path
            if route.content_type == "application/json" and "responses" not in route.extra_doc:
                assert "application/json" in op["responses"][str(route.status)]["content"], route.path
    server_id = operations[("/api/servers/{server_id}", "get")]["parameters"][0]
    assert server_id["schema"] == {"type": "integer", "minimum": 0, "maximum": MAX_ID}
