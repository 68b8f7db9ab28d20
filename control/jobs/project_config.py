"""Project configuration YAML, validated strictly: the one schema of a project, its pipelines and its
pipeline chains. Unknown fields, wrong types, duplicate keys and dangling references are errors that
name the field's path (`pipelines.0.steps.1.run`) and, where the YAML says, its line.

YAML is read with PyYAML's safe loader (no object construction, C-accelerated, already the de-facto
standard parser); a loader subclass refuses duplicate keys and keeps line marks. Strictness itself is
pydantic's (extra=forbid, strict types), as for every JSON body of the API. Pure: no I/O.

    project:
      name: demo
      description: Demo service
      repository: https://git.example.com/demo.git   # https://, ssh:// or user@host:path (targets.py)
      default_ref: main
      icon: icon.svg                                  # file beside the YAML (path imports only)
      vault_connection: git-creds                     # credentials for the repository
    pipelines:
      - name: build
        labels: [linux]
        timeout_seconds: 600
        max_attempts: 2
        env: {MODE: release}
        steps:
          - name: compile
            run: make all
    chains:
      - name: release
        pipelines: [build, test]
"""

from __future__ import annotations

from typing import Any

import pydantic
import yaml

MAX_YAML_BYTES = 256 * 1024

Name = pydantic.constr(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
Text = pydantic.constr(max_length=4096)


class Strict(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid", strict=True)


class ProjectSection(Strict):
    name: Name  # type: ignore[valid-type]
    description: Text = ""  # type: ignore[valid-type]
    repository: pydantic.constr(min_length=1, max_length=1024) | None = None  # type: ignore[valid-type]
    default_ref: pydantic.constr(min_length=1, max_length=255) = "main"  # type: ignore[valid-type]
    icon: pydantic.constr(min_length=1, max_length=255, pattern=r"^[A-Za-z0-9_][A-Za-z0-9._-]*$") | None = None  # type: ignore[valid-type]
    vault_connection: Name | None = None  # type: ignore[valid-type]


class Step(Strict):
    name: Name  # type: ignore[valid-type]
    run: pydantic.constr(min_length=1, max_length=65536)  # type: ignore[valid-type]


class PipelineSection(Strict):
    name: Name  # type: ignore[valid-type]
    description: Text = ""  # type: ignore[valid-type]
    labels: list[Name] = pydantic.Field(default_factory=list, max_length=64)  # type: ignore[valid-type]
    timeout_seconds: int = pydantic.Field(default=3600, ge=1, le=7 * 24 * 3600)
    max_attempts: int | None = pydantic.Field(default=None, ge=1, le=20)
    env: dict[pydantic.constr(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$"), Text] = pydantic.Field(default_factory=dict)  # type: ignore[valid-type]
    steps: list[Step] = pydantic.Field(min_length=1, max_length=200)


class ChainSection(Strict):
    name: Name  # type: ignore[valid-type]
    pipelines: list[Name] = pydantic.Field(min_length=1, max_length=50)  # type: ignore[valid-type]


class ProjectConfig(Strict):
    project: ProjectSection
    pipelines: list[PipelineSection] = pydantic.Field(min_length=1, max_length=200)
    chains: list[ChainSection] = pydantic.Field(default_factory=list, max_length=200)


class ConfigInvalid(Exception):
    """The YAML is not a valid project configuration; `problems` name each field's path."""

    def __init__(self, problems: list[dict[str, Any]]) -> None:
        self.problems = problems
        super().__init__("; ".join(f"{p['field']}: {p['message']}" for p in problems))


class _StrictLoader(yaml.SafeLoader):
    """Safe loading, plus: a mapping with a repeated key is an error, not a silent overwrite."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)  # type: ignore[no-untyped-call]
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    "while constructing a mapping", node.start_mark, f"found duplicate key {key!r}",
                    key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _lines(text: str) -> dict[tuple[Any, ...], int]:
    """The 1-based line where each path's node starts, for error messages."""
    lines: dict[tuple[Any, ...], int] = {}

    def walk(node: yaml.Node, path: tuple[Any, ...]) -> None:
        lines[path] = node.start_mark.line + 1
        if isinstance(node, yaml.MappingNode):
            for key_node, value_node in node.value:
                key = key_node.value
                lines[path + (key,)] = key_node.start_mark.line + 1
                walk(value_node, path + (key,))
        elif isinstance(node, yaml.SequenceNode):
            for index, item in enumerate(node.value):
                walk(item, path + (index,))

    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError:
        return lines
    if root is not None:
        walk(root, ())
    return lines


def parse_project_yaml(text: str) -> ProjectConfig:
    if len(text.encode()) > MAX_YAML_BYTES:
        raise ConfigInvalid([{"field": None, "message": f"configuration larger than {MAX_YAML_BYTES} bytes",
                              "type": "too_large"}])
    try:
        data = yaml.load(text, Loader=_StrictLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        raise ConfigInvalid([{"field": None, "message": str(getattr(exc, "problem", None) or exc),
                              "type": "yaml_syntax", "line": mark.line + 1 if mark else None,
                              "column": mark.column + 1 if mark else None}]) from exc
    try:
        config = ProjectConfig.model_validate(data)
    except pydantic.ValidationError as exc:
        lines = _lines(text)
        problems = []
        for err in exc.errors(include_url=False, include_input=False):
            loc = tuple(err["loc"])
            problems.append({"field": ".".join(str(p) for p in loc) or None, "message": err["msg"],
                             "type": err["type"], "line": _nearest_line(lines, loc)})
        raise ConfigInvalid(problems) from exc
    _check_references(config, _lines(text))
    return config


def _nearest_line(lines: dict[tuple[Any, ...], int], loc: tuple[Any, ...]) -> int | None:
    for end in range(len(loc), -1, -1):
        if loc[:end] in lines:
            return lines[loc[:end]]
    return None


def _check_references(config: ProjectConfig, lines: dict[tuple[Any, ...], int]) -> None:
    problems = []
    names = [p.name for p in config.pipelines]
    for index, name in enumerate(names):
        if name in names[:index]:
            loc: tuple[Any, ...] = ("pipelines", index, "name")
            problems.append({"field": f"pipelines.{index}.name", "message": f"duplicate pipeline name {name!r}",
                             "type": "duplicate", "line": _nearest_line(lines, loc)})
    for index, pipeline in enumerate(config.pipelines):
        steps = [s.name for s in pipeline.steps]
        for position, step in enumerate(steps):
            if step in steps[:position]:
                loc = ("pipelines", index, "steps", position, "name")
                problems.append({"field": ".".join(map(str, loc)), "message": f"duplicate step name {step!r}",
                                 "type": "duplicate", "line": _nearest_line(lines, loc)})
    chain_names = [c.name for c in config.chains]
    for index, chain in enumerate(config.chains):
        if chain.name in chain_names[:index]:
            loc = ("chains", index, "name")
            problems.append({"field": f"chains.{index}.name", "message": f"duplicate chain name {chain.name!r}",
                             "type": "duplicate", "line": _nearest_line(lines, loc)})
        for position, name in enumerate(chain.pipelines):
            if name not in names:
                loc = ("chains", index, "pipelines", position)
                problems.append({"field": ".".join(map(str, loc)), "message": f"unknown pipeline {name!r}",
                                 "type": "reference", "line": _nearest_line(lines, loc)})
    if problems:
        raise ConfigInvalid(problems)
