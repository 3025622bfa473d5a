"""HTTP route templates as the Functions host (ASP.NET Core routing) reads them.

Supported: literal segments (case-insensitive), ``{name}``, optional
``{name?}`` (trailing), defaults ``{name=value}``, catch-all ``{*rest}``,
and the constraints ``int``, ``long``, ``bool``, ``double``, ``float``,
``decimal``, ``guid``, ``alpha``, ``minlength(n)``, ``maxlength(n)``,
``length(n)``, ``min(n)``, ``max(n)``, ``regex(...)``. A template using
anything else is refused at start-up rather than matched loosely.

When several templates match a path, the most specific wins: literal
segments beat constrained parameters, which beat plain parameters, which
beat catch-alls (ASP.NET's route precedence, simplified to per segment).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from urllib.parse import unquote

_PARAM = re.compile(r"^\{(?P<star>\*{1,2})?(?P<name>[A-Za-z_][A-Za-z0-9_]*)"
                    r"(?P<constraints>(?::[^=?{}]+(?:\([^)]*\))?)*)"
                    r"(?P<opt>\?)?(?:=(?P<default>[^}]*))?\}$")
_CONSTRAINT = re.compile(r":(?P<kind>[a-z]+)(?:\((?P<arg>[^)]*)\))?")

_GUID = re.compile(r"^[0-9a-fA-F]{8}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{12}$")


class RouteError(Exception):
    """A route template the devhost cannot serve faithfully."""


def _check(kind: str, arg: str | None, value: str) -> bool:
    try:
        if kind in ("int", "long"):
            return re.fullmatch(r"-?\d+", value) is not None
        if kind == "bool":
            return value.lower() in ("true", "false")
        if kind in ("double", "float", "decimal"):
            float(value)
            return True
        if kind == "guid":
            return _GUID.match(value) is not None
        if kind == "alpha":
            return re.fullmatch(r"[A-Za-z]+", value) is not None
        if kind == "minlength":
            return len(value) >= int(arg or 0)
        if kind == "maxlength":
            return len(value) <= int(arg or 0)
        if kind == "length":
            bounds = [int(x) for x in (arg or "").split(",")]
            return bounds[0] <= len(value) <= bounds[-1]
        if kind == "min":
            return int(value) >= int(arg or 0)
        if kind == "max":
            return int(value) <= int(arg or 0)
        if kind == "regex":
            return re.search(arg or "", value) is not None
    except ValueError:
        return False
    raise RouteError(f"unsupported route constraint {kind!r}")


_KNOWN = frozenset({"int", "long", "bool", "double", "float", "decimal", "guid", "alpha", "minlength",
                    "maxlength", "length", "min", "max", "regex"})


@dataclass(frozen=True)
class _Segment:
    literal: str | None = None
    name: str | None = None
    optional: bool = False
    default: str | None = None
    catch_all: bool = False
    constraints: tuple[tuple[str, str | None], ...] = ()

    @property
    def rank(self) -> int:
        """Lower is more specific."""
        if self.literal is not None:
            return 0
        if self.catch_all:
            return 4
        if self.constraints:
            return 1
        return 3 if self.optional else 2


@dataclass(frozen=True)
class RouteTemplate:
    """One parsed template (without the route prefix)."""

    template: str
    segments: tuple[_Segment, ...] = field(default=())

    @classmethod
    def parse(cls, template: str) -> RouteTemplate:
        segments: list[_Segment] = []
        parts = template.strip("/").split("/") if template.strip("/") else []
        for part in parts:
            if not part:
                raise RouteError(f"route {template!r} has an empty segment")
            if "{" not in part and "}" not in part:
                segments.append(_Segment(literal=part.lower()))
                continue
            match = _PARAM.match(part)
            if not match:
                raise RouteError(f"route {template!r}: segment {part!r} mixes literals and parameters "
                                 "(the devhost supports one parameter per segment)")
            constraints = tuple((c["kind"], c["arg"]) for c in _CONSTRAINT.finditer(match["constraints"] or ""))
            for kind, _ in constraints:
                if kind not in _KNOWN:
                    raise RouteError(f"route {template!r}: unsupported constraint {kind!r}")
            segment = _Segment(name=match["name"], optional=bool(match["opt"]) or match["default"] is not None,
                               default=match["default"], catch_all=bool(match["star"]), constraints=constraints)
            segments.append(segment)
        for index, segment in enumerate(segments):
            if segment.catch_all and index != len(segments) - 1:
                raise RouteError(f"route {template!r}: a catch-all parameter must be the last segment")
            if segment.optional and not all(s.optional or s.catch_all for s in segments[index:]):
                raise RouteError(f"route {template!r}: only trailing parameters can be optional")
        return cls(template=template, segments=tuple(segments))

    @property
    def specificity(self) -> tuple[int, ...]:
        return tuple(s.rank for s in self.segments)

    def match(self, path: str) -> dict[str, str] | None:
        """Route values for ``path`` (already without the prefix), or None."""
        raw_parts = path.strip("/").split("/") if path.strip("/") else []
        values: dict[str, str] = {}
        for index, segment in enumerate(self.segments):
            if segment.catch_all:
                rest = "/".join(unquote(p) for p in raw_parts[index:])
                if rest:
                    values[segment.name or ""] = rest
                elif segment.default is not None:
                    values[segment.name or ""] = segment.default
                return values
            if index >= len(raw_parts):
                if not segment.optional:
                    return None
                if segment.default is not None:
                    values[segment.name or ""] = segment.default
                continue
            part = unquote(raw_parts[index])
            if segment.literal is not None:
                if part.lower() != segment.literal:
                    return None
                continue
            if not all(_check(kind, arg, part) for kind, arg in segment.constraints):
                return None
            values[segment.name or ""] = part
        if len(raw_parts) > len(self.segments):
            return None
        return values
