"""YAML loading that remembers where each key stood, so errors can name a line.

PyYAML's safe_load throws positions away, and it silently keeps the last of two
duplicate keys; a field engineer needs both caught.  We compose the node tree
once, record the line of every key path, and construct plain data from it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


@dataclass(frozen=True)
class ProfileProblem:
    file: str
    line: int
    path: str
    message: str

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}"
        return f"{where} {self.path}: {self.message}" if self.path else f"{where} {self.message}"


@dataclass
class YamlDocument:
    name: str
    data: Any = None
    lines: dict[tuple[Any, ...], int] = field(default_factory=dict)
    problems: list[ProfileProblem] = field(default_factory=list)

    def line_of(self, loc: tuple[Any, ...]) -> int:
        """Line of the deepest recorded prefix of ``loc`` (1-based)."""
        for end in range(len(loc), -1, -1):
            line = self.lines.get(tuple(loc[:end]))
            if line is not None:
                return line
        return 1


def _walk(node: yaml.Node, path: tuple[Any, ...], doc: YamlDocument) -> None:
    if isinstance(node, yaml.MappingNode):
        seen: dict[Any, int] = {}
        for key_node, value_node in node.value:
            key = key_node.value
            line = key_node.start_mark.line + 1
            if key in seen:
                text = ".".join(str(p) if not isinstance(p, int) else f"[{p}]" for p in path)
                doc.problems.append(
                    ProfileProblem(doc.name, line, f"{text}.{key}".lstrip(".").replace(".[", "["),
                                   f"duplicate key (first at line {seen[key]})")
                )
            seen[key] = line
            doc.lines[path + (key,)] = line
            _walk(value_node, path + (key,), doc)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            doc.lines[path + (index,)] = item.start_mark.line + 1
            _walk(item, path + (index,), doc)


def load_yaml(path: Path) -> YamlDocument:
    doc = YamlDocument(name=path.name)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        doc.problems.append(ProfileProblem(str(path), 0, "", f"cannot read: {error.strerror or error}"))
        return doc
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        line = mark.line + 1 if mark else 1
        doc.problems.append(ProfileProblem(doc.name, line, "", f"not valid YAML: {getattr(error, 'problem', error)}"))
        return doc
    if root is None:
        doc.problems.append(ProfileProblem(doc.name, 1, "", "the file is empty"))
        return doc
    doc.lines[()] = root.start_mark.line + 1
    _walk(root, (), doc)
    doc.data = yaml.SafeLoader(text).get_single_data()
    return doc
