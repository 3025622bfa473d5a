"""A small reading of Bicep files, built on the tree-sitter-bicep grammar.

No Bicep compiler can be installed here, so the infra tests parse the
templates with the third-party grammar and look at them through this model:
the declarations of each file (params, vars, resources, modules, outputs),
helpers to read object literals, a partial evaluator for values known at
template time (literals, parameter defaults, ``string()``, ternaries,
interpolation), and ``follow``, which traces an expression through vars,
module parameters (to what each caller passes) and module outputs.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import tree_sitter as ts
import tree_sitter_bicep

Node = ts.Node


class _Unknown:
    """A value only Azure knows (a runtime reference, a parameter without default)."""

    def __repr__(self) -> str:
        return "UNKNOWN"


UNKNOWN: Any = _Unknown()


@cache
def _parser() -> ts.Parser:
    return ts.Parser(ts.Language(tree_sitter_bicep.language()))


def text(node: Node) -> str:
    return node.text.decode("utf-8") if node.text is not None else ""


def line(node: Node) -> int:
    return node.start_point[0] + 1


@dataclass
class Param:
    name: str
    node: Node
    type: str
    default: Node | None
    decorators: dict[str, Node]  # decorator name -> its call_expression

    @property
    def secure(self) -> bool:
        return "secure" in self.decorators


@dataclass
class Resource:
    file: BicepFile
    symbol: str
    type: str
    api_version: str
    existing: bool
    body: Node | None  # the object literal (under any `if`/`for`)
    node: Node

    def where(self) -> str:
        return f"{self.file.rel}:{line(self.node)} resource {self.symbol} '{self.type}@{self.api_version}'"


@dataclass
class Module:
    file: BicepFile
    symbol: str
    path: str
    body: Node | None
    node: Node

    def target(self) -> Path:
        return (self.file.path.parent / self.path).resolve()


@dataclass
class BicepFile:
    path: Path
    rel: str
    tree: ts.Tree
    params: dict[str, Param] = field(default_factory=dict)
    vars: dict[str, Node] = field(default_factory=dict)
    resources: dict[str, Resource] = field(default_factory=dict)
    modules: dict[str, Module] = field(default_factory=dict)
    outputs: dict[str, Node] = field(default_factory=dict)

    @property
    def root(self) -> Node:
        return self.tree.root_node


def _unwrap_body(node: Node) -> Node | None:
    """The object literal of a resource/module body, under `if (...)` and `[for ...]`."""
    if node.type == "object":
        return node
    if node.type in ("if_statement", "for_statement"):
        for child in reversed(node.named_children):
            found = _unwrap_body(child)
            if found is not None:
                return found
    return None


def _decorators(decl: Node) -> dict[str, Node]:
    found: dict[str, Node] = {}
    previous = decl.prev_named_sibling
    if previous is not None and previous.type == "decorators":
        for decorator in previous.named_children:
            call = decorator.named_children[0] if decorator.named_children else None
            if call is not None and call.type == "call_expression":
                found[text(call.named_children[0])] = call
    return found


def parse(path: Path, root: Path) -> BicepFile:
    """Parse one .bicep file into its declarations."""
    tree = _parser().parse(path.read_bytes())
    bicep = BicepFile(path=path.resolve(), rel=str(path.relative_to(root)), tree=tree)
    for decl in tree.root_node.named_children:
        children = decl.named_children
        if decl.type == "parameter_declaration":
            name = text(children[0])
            default = children[2] if len(children) > 2 else None
            bicep.params[name] = Param(name, decl, text(children[1]), default, _decorators(decl))
        elif decl.type == "variable_declaration":
            bicep.vars[text(children[0])] = children[-1]
        elif decl.type == "output_declaration":
            bicep.outputs[text(children[0])] = children[-1]
        elif decl.type == "resource_declaration":
            symbol = text(children[0])
            type_and_version = string_value(children[1]) or ""
            rtype, _, api = type_and_version.partition("@")
            existing = any(c.type == "existing" for c in decl.children)
            bicep.resources[symbol] = Resource(bicep, symbol, rtype, api, existing, _unwrap_body(children[-1]), decl)
        elif decl.type == "module_declaration":
            symbol = text(children[0])
            bicep.modules[symbol] = Module(
                bicep, symbol, string_value(children[1]) or "", _unwrap_body(children[-1]), decl
            )
    return bicep


def load(bicep_root: Path, project_root: Path) -> dict[Path, BicepFile]:
    """Every .bicep file under ``bicep_root``, keyed by resolved path."""
    return {p.resolve(): parse(p, project_root) for p in sorted(bicep_root.rglob("*.bicep"))}


def walk(node: Node) -> Iterator[Node]:
    yield node
    for child in node.children:
        yield from walk(child)


# --- Literals and objects ---------------------------------------------------------


def string_value(node: Node | None) -> str | None:
    """The value of a string literal without interpolation, else None."""
    if node is None or node.type != "string":
        return None
    parts: list[str] = []
    for child in node.named_children:
        if child.type == "string_content":
            parts.append(text(child))
        elif child.type == "escape_sequence":
            parts.append(_unescape(text(child)))
        else:
            return None
    return "".join(parts)


def _unescape(seq: str) -> str:
    return {"\\'": "'", "\\\\": "\\", "\\n": "\n", "\\r": "\r", "\\t": "\t", "\\$": "$"}.get(seq, seq)


def key_of(prop: Node) -> str | None:
    """The key of an object_property: an identifier or a plain string."""
    key = prop.named_children[0]
    if key.type == "identifier":
        return text(key)
    return string_value(key)


def properties(obj: Node | None) -> list[tuple[str | None, Node, Node]]:
    """(key, value, property node) for each property of an object literal."""
    if obj is None or obj.type != "object":
        return []
    result = []
    for prop in obj.named_children:
        if prop.type == "object_property":
            result.append((key_of(prop), prop.named_children[-1], prop))
    return result


def prop(obj: Node | None, key: str) -> Node | None:
    for k, value, _ in properties(obj):
        if k == key:
            return value
    return None


# --- Evaluation ---------------------------------------------------------------------


def arm_string(value: Any) -> Any:
    """ARM's string(): booleans become True/False, numbers their digits."""
    if value is UNKNOWN:
        return UNKNOWN
    if isinstance(value, bool):
        return "True" if value else "False"
    if isinstance(value, str):
        return value
    return str(value)


class Project:
    """All the Bicep files of a deployment, for cross-file questions."""

    def __init__(self, files: dict[Path, BicepFile]) -> None:
        self.files = files

    def callers(self, target: BicepFile) -> list[Module]:
        """Module declarations (in any file) that deploy ``target``."""
        return [m for f in self.files.values() for m in f.modules.values() if m.target() == target.path]

    def module_file(self, module: Module) -> BicepFile | None:
        return self.files.get(module.target())

    # -- follow: where does an expression's value come from? --

    def follow(self, file: BicepFile, node: Node, _depth: int = 0) -> list[tuple[BicepFile, Node]]:
        """The expressions ``node`` stands for, through vars, module params and outputs."""
        if _depth > 30:
            return [(file, node)]
        if node.type == "parenthesized_expression":
            return self.follow(file, node.named_children[0], _depth + 1)
        if node.type == "identifier":
            name = text(node)
            if name in file.vars:
                return self.follow(file, file.vars[name], _depth + 1)
            if name in file.params:
                callers = self.callers(file)
                found: list[tuple[BicepFile, Node]] = []
                for module in callers:
                    arg = prop(prop(module.body, "params"), name)
                    if arg is not None:
                        found += self.follow(module.file, arg, _depth + 1)
                    elif file.params[name].default is not None:
                        found += self.follow(file, file.params[name].default, _depth + 1)  # type: ignore[arg-type]
                if not callers:
                    default = file.params[name].default
                    found += [(file, node)] if default is None else self.follow(file, default, _depth + 1)
                return found
            return [(file, node)]
        if node.type == "member_expression":
            parts = node.named_children
            # <module>.outputs.<name>
            if (
                len(parts) == 2
                and parts[0].type == "member_expression"
                and text(parts[0].named_children[-1]) == "outputs"
                and parts[0].named_children[0].type == "identifier"
            ):
                symbol = text(parts[0].named_children[0])
                module = file.modules.get(symbol)
                target = self.module_file(module) if module else None
                if target is not None and text(parts[1]) in target.outputs:
                    return self.follow(target, target.outputs[text(parts[1])], _depth + 1)
        return [(file, node)]

    # -- evaluate: the value, when known at template time --

    def evaluate(self, file: BicepFile, node: Node | None, _depth: int = 0) -> Any:
        """The value of ``node`` if the template alone determines it, else UNKNOWN."""
        if node is None or _depth > 30:
            return UNKNOWN
        kind = node.type
        if kind == "string":
            parts: list[str] = []
            for child in node.named_children:
                if child.type == "string_content":
                    parts.append(text(child))
                elif child.type == "escape_sequence":
                    parts.append(_unescape(text(child)))
                elif child.type == "interpolation":
                    value = arm_string(self.evaluate(file, child.named_children[0], _depth + 1))
                    if value is UNKNOWN:
                        return UNKNOWN
                    parts.append(value)
            return "".join(parts)
        if kind == "number":
            return int(text(node))
        if kind == "boolean":
            return text(node) == "true"
        if kind == "null":
            return None
        if kind == "parenthesized_expression":
            return self.evaluate(file, node.named_children[0], _depth + 1)
        if kind == "identifier":
            name = text(node)
            if name in file.vars:
                return self.evaluate(file, file.vars[name], _depth + 1)
            if name in file.params:
                values = [
                    UNKNOWN if target == node else self.evaluate(target_file, target, _depth + 1)
                    for target_file, target in self.follow(file, node)
                ]
                # Known only when every caller passes the same known value.
                if values and all(v is not UNKNOWN and v == values[0] for v in values):
                    return values[0]
            return UNKNOWN
        if kind == "ternary_expression":
            cond, yes, no = node.named_children
            chosen = self.evaluate(file, cond, _depth + 1)
            if chosen is UNKNOWN or not isinstance(chosen, bool):
                return UNKNOWN
            return self.evaluate(file, yes if chosen else no, _depth + 1)
        if kind == "call_expression":
            callee = text(node.named_children[0])
            args = [a for a in node.named_children[1].named_children] if len(node.named_children) > 1 else []
            if callee == "string" and len(args) == 1:
                return arm_string(self.evaluate(file, args[0], _depth + 1))
            return UNKNOWN
        if kind == "array":
            return [self.evaluate(file, item, _depth + 1) for item in node.named_children if item.type != "comment"]
        if kind == "object":
            return {k: self.evaluate(file, v, _depth + 1) for k, v, _ in properties(node)}
        if kind == "member_expression":
            base, member = node.named_children
            if member.type == "property_identifier":
                value = self.evaluate(file, base, _depth + 1)
                if isinstance(value, dict) and text(member) in value:
                    return value[text(member)]
        return UNKNOWN

    # -- object keys through union(), vars and module params --

    def object_entries(self, file: BicepFile, node: Node, _depth: int = 0) -> list[tuple[str, BicepFile, Node]]:
        """(key, file, value) of the object an expression builds, through union(), ternaries and params.

        Raises ValueError for an expression whose keys cannot be known from the template.
        """
        if _depth > 30:
            raise ValueError("object expression nests too deeply")
        if node.type == "object":
            entries = []
            for key, value, prop_node in properties(node):
                if key is None:
                    raise ValueError(f"{file.rel}:{line(prop_node)}: computed key {text(prop_node.named_children[0])}")
                entries.append((key, file, value))
            return entries
        if node.type == "call_expression" and text(node.named_children[0]) == "union":
            entries = []
            for arg in node.named_children[1].named_children:
                entries += self.object_entries(file, arg, _depth + 1)
            return entries
        if node.type == "ternary_expression":
            _, yes, no = node.named_children
            return self.object_entries(file, yes, _depth + 1) + self.object_entries(file, no, _depth + 1)
        if node.type == "parenthesized_expression":
            return self.object_entries(file, node.named_children[0], _depth + 1)
        if node.type in ("identifier", "member_expression"):
            targets = self.follow(file, node)
            if targets == [(file, node)]:
                raise ValueError(f"{file.rel}:{line(node)}: cannot tell which keys {text(node)} holds")
            entries = []
            for target_file, target in targets:
                entries += self.object_entries(target_file, target, _depth + 1)
            return entries
        raise ValueError(f"{file.rel}:{line(node)}: cannot tell which keys {text(node)[:60]} holds")
