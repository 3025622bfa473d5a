"""Query options of the mail API: ``$top``/``$skip`` integers, ``$orderby`` and the ``$filter`` subset.

Only what mail clients send is taken, and what Exchange refuses is refused
with Graph's codes (``ErrorInvalidUrlQuery``, ``ErrorInvalidUrlQueryFilter``),
so a client that works here does not learn a filter Outlook would reject.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from datetime import UTC, datetime

from multidict import MultiMapping

from graph_sandbox.api_errors import ApiError, bad_request
from graph_sandbox.mailbox import FLAG_STATUS, IMPORTANCE, Message


def int_option(query: MultiMapping[str], name: str, default: int) -> int:
    """An integer query option (``$top``, ``$skip``), or ``default``; 400 if it is not one."""
    raw = query.get(name)
    if raw is None:
        return default
    try:
        return int(raw)
    except ValueError:
        raise bad_request(f"Invalid value '{raw}' for query option {name}.") from None


def parse_orderby(raw: str) -> str:
    """``asc`` or ``desc`` from the one ``$orderby`` mail clients use, ``receivedDateTime``."""
    parts = raw.strip().split()
    if parts and parts[0].lower() == "receiveddatetime" and len(parts) <= 2:
        direction = parts[1].lower() if len(parts) == 2 else "asc"
        if direction in ("asc", "desc"):
            return direction
    raise bad_request(f"The $orderby expression '{raw}' is not supported; use receivedDateTime desc.",
                      "ErrorInvalidUrlQuery")


_CLAUSE = re.compile(
    r"^\s*(isRead|isDraft|receivedDateTime|flag/flagStatus|importance|hasAttachments)\s+"
    r"(eq|ne|ge|gt|le|lt)\s+(.+?)\s*$", re.IGNORECASE)


def instant_ms(instant: str) -> int:
    """A ``DateTimeOffset`` literal of a query option in ms since the epoch (UTC when it names no zone)."""
    text = instant.strip().strip("'")
    try:
        when = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise ApiError(400, "ErrorInvalidUrlQueryFilter", f"'{instant}' is not a valid DateTimeOffset.") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return int(when.timestamp() * 1000)


def parse_filter(raw: str | None) -> Callable[[Message], bool] | None:
    """The ``$filter`` subset mail clients use: isRead, isDraft, hasAttachments,
    importance, flag/flagStatus (eq/ne) and receivedDateTime (ge/gt/le/lt/eq), joined by ``and``."""
    if raw is None or not raw.strip():
        return None
    checks: list[Callable[[Message], bool]] = []
    for clause in re.split(r"\s+and\s+", raw.strip(), flags=re.IGNORECASE):
        clause = clause.strip()
        while clause.startswith("(") and clause.endswith(")"):
            clause = clause[1:-1].strip()
        match = _CLAUSE.match(clause)
        if not match:
            raise ApiError(400, "ErrorInvalidUrlQueryFilter", "The query filter contains one or more invalid nodes.")
        prop, op, value = match.group(1).lower(), match.group(2).lower(), match.group(3)
        checks.append(_clause(prop, op, value))
    return lambda m: all(check(m) for check in checks)


def _clause(prop: str, op: str, value: str) -> Callable[[Message], bool]:
    invalid = ApiError(400, "ErrorInvalidUrlQueryFilter", "The query filter contains one or more invalid nodes.")
    if prop in ("isread", "isdraft", "hasattachments"):
        if value.lower() not in ("true", "false") or op not in ("eq", "ne"):
            raise invalid
        want = (value.lower() == "true") == (op == "eq")
        attr = {"isread": "is_read", "isdraft": "is_draft", "hasattachments": "has_attachments"}[prop]
        return lambda m: getattr(m, attr) is want
    if prop in ("flag/flagstatus", "importance"):
        text = value.strip("'")
        if op not in ("eq", "ne") or text not in (FLAG_STATUS if prop == "flag/flagstatus" else IMPORTANCE):
            raise invalid
        equal = op == "eq"
        if prop == "importance":
            return lambda m: (m.importance == text) is equal
        return lambda m: (m.flag.get("flagStatus") == text) is equal
    bound = instant_ms(value)
    return {
        "eq": lambda m: m.received_ms == bound, "ne": lambda m: m.received_ms != bound,
        "ge": lambda m: m.received_ms >= bound, "gt": lambda m: m.received_ms > bound,
        "le": lambda m: m.received_ms <= bound, "lt": lambda m: m.received_ms < bound,
    }[op]


def parse_delta_filter(raw: str | None) -> tuple[str, str] | None:
    """Delta accepts only ``receivedDateTime ge|gt {instant}`` (as Graph documents)."""
    if raw is None or not raw.strip():
        return None
    match = _CLAUSE.match(raw)
    if not match or match.group(1).lower() != "receiveddatetime" or match.group(2).lower() not in ("ge", "gt"):
        raise ApiError(400, "ErrorInvalidUrlQueryFilter",
                       "Delta supports only $filter=receivedDateTime ge|gt {value}.")
    value = match.group(3)
    instant_ms(value)
    return match.group(2).lower(), value
