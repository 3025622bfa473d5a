"""Every payload the sandbox emits against Microsoft's CSDL (../shared/graph/v1.0-Prod.csdl).

The payloads are fetched from a running sandbox over HTTP, the way a client
sees them: users, messages (full, $select, text body, drafts, delta items,
@removed entries), mail folders (list, get, children, delta), subscriptions,
and the change / lifecycle notifications POSTed to a real local webhook.

Each JSON object must use only properties declared for its type or one of
its base types, with the declared EDM type. OData annotations (``@odata.*``,
``@removed``, ``prop@odata.*``) belong to the protocol and are skipped.
``message`` and ``resourceData`` are open types in the CSDL; we still hold
``message`` to its declared properties (an open type would otherwise check
nothing) and allow on ``resourceData`` only the dynamic ``id`` Graph sends.
"""

from __future__ import annotations

import base64
import json
import re
import threading
import time
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest

from graph_sandbox.config import SandboxConfig
from tests.fixtures.graph_sandbox import SandboxTestServer, start_sandbox
from tests.paths import GRAPH_CSDL, shared_file

EDM = "{http://docs.oasis-open.org/odata/ns/edm}"
GRAPH = "microsoft.graph"
# Dynamic properties allowed on open types (everything else must be declared).
DYNAMIC = {f"{GRAPH}.resourceData": {"id": "Edm.String"}}
REQUIRED_TYPES = ["message", "fileAttachment", "attachment", "mailFolder", "user", "subscription", "changeNotification",
                  "changeNotificationCollection", "recipient", "emailAddress", "itemBody", "followupFlag",
                  "dateTimeTimeZone", "resourceData", "outlookItem", "entity"]


# -- the CSDL ----------------------------------------------------------------------------


@dataclass
class TypeInfo:
    name: str
    kind: str                                   # entity | complex | enum
    base: str | None = None
    props: dict[str, tuple[str, bool]] = field(default_factory=dict)   # name -> (type, nullable)
    members: frozenset[str] = frozenset()
    is_open: bool = False
    is_flags: bool = False


def load_csdl() -> dict[str, TypeInfo]:
    root = ET.parse(shared_file(GRAPH_CSDL)).getroot()
    aliases: dict[str, str] = {}
    schemas = list(root.iter(f"{EDM}Schema"))
    for schema in schemas:
        if schema.get("Alias"):
            aliases[schema.get("Alias", "")] = schema.get("Namespace", "")

    def qualify(ref: str) -> str:
        if ref.startswith("Collection(") and ref.endswith(")"):
            return f"Collection({qualify(ref[11:-1])})"
        prefix, _, name = ref.rpartition(".")
        return f"{aliases.get(prefix, prefix)}.{name}" if prefix in aliases else ref

    types: dict[str, TypeInfo] = {}
    kinds = {f"{EDM}EntityType": "entity", f"{EDM}ComplexType": "complex", f"{EDM}EnumType": "enum"}
    for schema in schemas:
        namespace = schema.get("Namespace", "")
        for element in schema:
            kind = kinds.get(element.tag)
            if kind is None:
                continue
            name = f"{namespace}.{element.get('Name')}"
            info = TypeInfo(name, kind, base=qualify(element.get("BaseType")) if element.get("BaseType") else None,
                            is_open=element.get("OpenType") == "true", is_flags=element.get("IsFlags") == "true")
            if kind == "enum":
                info.members = frozenset(m.get("Name", "") for m in element.iter(f"{EDM}Member"))
            for prop in element.findall(f"{EDM}Property"):
                info.props[prop.get("Name", "")] = (qualify(prop.get("Type", "")), prop.get("Nullable") != "false")
            types[name] = info
    return types


_DATETIME = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d{1,7})?(Z|[+-]\d{2}:\d{2})$")
_GUID = re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")


class Checker:
    """Checks JSON values against CSDL types; collects every problem and every type seen."""

    def __init__(self, types: dict[str, TypeInfo]) -> None:
        self.types = types
        self.errors: list[str] = []
        self.seen: set[str] = set()

    def check(self, value: Any, type_ref: str, path: str, nullable: bool = True) -> None:
        if value is None:
            if not nullable:
                self.errors.append(f"{path}: null where {type_ref} is not nullable")
            return
        if type_ref.startswith("Collection("):
            if not isinstance(value, list):
                self.errors.append(f"{path}: expected a JSON array for {type_ref}")
                return
            for i, item in enumerate(value):
                self.check(item, type_ref[11:-1], f"{path}[{i}]", nullable=True)
            return
        if type_ref.startswith("Edm."):
            self._primitive(value, type_ref, path)
            return
        info = self.types.get(type_ref)
        if info is None:
            self.errors.append(f"{path}: type {type_ref} is not in the CSDL")
            return
        if info.kind == "enum":
            names = value.split(",") if info.is_flags and isinstance(value, str) else [value]
            if not all(isinstance(n, str) and n.strip() in info.members for n in names):
                self.errors.append(f"{path}: {value!r} is not a member of {type_ref}")
            self.seen.add(type_ref)
            return
        if not isinstance(value, dict):
            self.errors.append(f"{path}: expected a JSON object for {type_ref}")
            return
        actual = self._actual_type(value, info, path)
        chain = self._chain(actual)
        self.seen.update(t.name for t in chain)
        props: dict[str, tuple[str, bool]] = {}
        for t in chain:
            props.update(t.props)
        for key, item in value.items():
            if key.startswith("@") or "@" in key:
                continue                           # OData annotations: the protocol's, not the type's
            if key in props:
                self.check(item, props[key][0], f"{path}.{key}", props[key][1])
            elif key in DYNAMIC.get(actual.name, {}):
                self.check(item, DYNAMIC[actual.name][key], f"{path}.{key}")
            else:
                self.errors.append(f"{path}.{key}: not declared on {actual.name} or its base types")

    def _actual_type(self, value: dict[str, Any], declared: TypeInfo, path: str) -> TypeInfo:
        odata_type = value.get("@odata.type")
        if not isinstance(odata_type, str):
            return declared
        named = self.types.get(odata_type.lstrip("#"))
        if named is not None and declared in self._chain(named):
            return named
        if declared.name not in DYNAMIC:   # resourceData carries "#Microsoft.Graph.Message", as Graph sends
            self.errors.append(f"{path}: @odata.type {odata_type} is not {declared.name} or derived from it")
        return declared

    def _chain(self, info: TypeInfo) -> list[TypeInfo]:
        chain = [info]
        while chain[-1].base:
            chain.append(self.types[chain[-1].base])
        return chain

    def _primitive(self, value: Any, type_ref: str, path: str) -> None:
        ok: bool
        if type_ref == "Edm.String":
            ok = isinstance(value, str)
        elif type_ref == "Edm.Boolean":
            ok = isinstance(value, bool)
        elif type_ref in ("Edm.Int32", "Edm.Int64", "Edm.Int16", "Edm.Byte"):
            ok = isinstance(value, int) and not isinstance(value, bool)
            if ok and type_ref == "Edm.Int32":
                ok = -(2**31) <= value < 2**31
        elif type_ref in ("Edm.Double", "Edm.Single", "Edm.Decimal"):
            ok = isinstance(value, int | float) and not isinstance(value, bool)
        elif type_ref == "Edm.DateTimeOffset":
            ok = isinstance(value, str) and bool(_DATETIME.match(value))
        elif type_ref == "Edm.Guid":
            ok = isinstance(value, str) and bool(_GUID.match(value))
        elif type_ref == "Edm.Binary":
            ok = isinstance(value, str) and _is_base64(value)
        else:
            self.errors.append(f"{path}: the checker does not know {type_ref}; teach it before emitting one")
            return
        if not ok:
            self.errors.append(f"{path}: {value!r} is not a valid {type_ref}")


def _is_base64(text: str) -> bool:
    try:
        base64.b64decode(text.replace("-", "+").replace("_", "/"), validate=True)
    except ValueError:
        return False
    return True


# -- a real webhook ---------------------------------------------------------------------------


class Webhook:
    """A local notification endpoint: echoes validation tokens, records POSTed bodies by path."""

    def __init__(self) -> None:
        received: dict[str, list[Any]] = {}
        self.received = received

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                query = parse_qs(urlsplit(self.path).query)
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                if "validationToken" in query:
                    token = query["validationToken"][0].encode()
                    self.send_response(200)
                    self.send_header("Content-Type", "text/plain")
                    self.send_header("Content-Length", str(len(token)))
                    self.end_headers()
                    self.wfile.write(token)
                    return
                received.setdefault(urlsplit(self.path).path, []).append(json.loads(raw))
                self.send_response(202)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def wait_for(self, path: str, count: int = 1) -> list[Any]:
        """The bodies POSTed to ``path`` once they hold ``count`` notifications (batches count each item)."""
        deadline = time.monotonic() + 60          # a guard against hanging, not a speed assertion
        while sum(len(body.get("value", [])) for body in self.received.get(path, [])) < count:
            assert time.monotonic() < deadline, f"no notification reached {path}: {self.received}"
            time.sleep(0.05)
        return self.received[path]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


# -- payloads over HTTP --------------------------------------------------------------------------


Sample = tuple[str, str, Any]      # (where it came from, CSDL type, JSON value)


def _values(body: dict[str, Any]) -> list[Any]:
    assert "value" in body, body
    return body["value"]


def _whole(body: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in body.items() if k != "@odata.context"}


@pytest.fixture(scope="module")
def sandbox() -> Iterator[SandboxTestServer]:
    # No delta lag: the changes below must be in the next delta call (shapes are checked, not timing).
    server = start_sandbox(SandboxConfig(seed=42, users=2, messages_per_user=80, delta_lag_s=0.0))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def samples(sandbox: SandboxTestServer) -> list[Sample]:
    alice, bob = sandbox.users
    me = sandbox.graph(alice)
    plain = sandbox.graph(alice, immutable=False)
    out: list[Sample] = []

    def collect(label: str, type_name: str, response: Any, many: bool) -> None:
        assert response.status_code in (200, 201), f"{label}: {response.status_code} {response.text[:300]}"
        body = response.json()
        items = _values(body) if many else [_whole(body)]
        out.extend((label, f"{GRAPH}.{type_name}", item) for item in items)

    collect("GET /me", "user", me.get("me"), False)
    collect("GET /users/{id} (app)", "user", sandbox.graph().get(f"users/{alice.id}"), False)
    collect("GET /me/messages", "message", me.get("me/messages?$top=80"), True)
    collect("GET messages (REST ids)", "message", plain.get("me/mailFolders/inbox/messages?$top=20"), True)
    collect("GET flagged", "message", me.get("me/messages?$filter=flag/flagStatus eq 'flagged'&$top=10"), True)
    collect("GET complete", "message", me.get("me/messages?$filter=flag/flagStatus eq 'complete'&$top=10"), True)
    collect("GET $select", "message", me.get("me/messages?$select=subject,from,flag,body,categories&$top=10"), True)
    text = me.get("me/messages?$top=5", headers={"Prefer": 'outlook.body-content-type="text"'})
    collect("GET text body", "message", text, True)
    with_files = me.get("me/messages?$filter=hasAttachments eq true&$top=5&$select=id").json()["value"]
    assert with_files, "the seed gives some messages attachments"
    for item in with_files:
        collect("GET attachments", "fileAttachment", me.get(f"me/messages/{item['id']}/attachments"), True)
    first = me.get(f"me/messages/{with_files[0]['id']}/attachments").json()["value"][0]
    collect("GET attachment", "fileAttachment",
            me.get(f"me/messages/{with_files[0]['id']}/attachments/{first['id']}"), False)
    draft = me.post("me/messages", json={
        "subject": "Schema draft", "importance": "high", "categories": ["Blue category"],
        "body": {"contentType": "html", "content": "<p>hello</p>"},
        "toRecipients": [{"emailAddress": {"address": bob.mail, "name": bob.display_name}}],
        "ccRecipients": [{"emailAddress": {"address": "cc@fabrikam.com"}}],
        "bccRecipients": [{"emailAddress": {"address": "bcc@fabrikam.com"}}],
        "replyTo": [{"emailAddress": {"address": alice.mail}}],
        "flag": {"flagStatus": "flagged", "dueDateTime": {"dateTime": "2026-12-01T09:00:00", "timeZone": "UTC"}}})
    collect("POST draft", "message", draft, False)
    first = me.get("me/mailFolders/inbox/messages?$top=2").json()["value"]
    collect("PATCH", "message", me.patch(f"me/messages/{first[0]['id']}", json={"flag": {"flagStatus": "complete"}}),
            False)
    collect("POST move", "message", me.post(f"me/messages/{first[1]['id']}/move",
                                            json={"destinationId": "archive"}), False)
    collect("GET /me/mailFolders", "mailFolder", me.get("me/mailFolders?$top=50"), True)
    collect("GET mailFolder", "mailFolder", me.get("me/mailFolders/inbox"), False)
    collect("GET childFolders", "mailFolder", me.get("me/mailFolders/inbox/childFolders"), True)
    created = me.post("me/mailFolders", json={"displayName": "Schema folder"})
    collect("POST mailFolder", "mailFolder", created, False)

    # Delta: a first round, then changes (update, move away, delete) for @removed entries.
    # Both preferences: a state made without IdType="ImmutableId" is refused with it (SyncStateInvalid).
    inbox_delta = me.get("me/mailFolders/inbox/messages/delta",
                         headers={"Prefer": 'IdType="ImmutableId", odata.maxpagesize=200'})
    collect("delta (initial)", "message", inbox_delta, True)
    selected = me.get("me/mailFolders/inbox/messages/delta?$select=subject,isRead,flag")
    collect("delta ($select)", "message", selected, True)
    folder_delta = me.get("me/mailFolders/delta", headers={"Prefer": "odata.maxpagesize=200"})
    collect("mailFolders/delta", "mailFolder", folder_delta, True)
    inbox_items = inbox_delta.json()["value"]
    me.patch(f"me/messages/{inbox_items[0]['id']}", json={"isRead": not inbox_items[0]["isRead"]})
    me.post(f"me/messages/{inbox_items[1]['id']}/move", json={"destinationId": "archive"})
    me.delete(f"me/mailFolders/{created.json()['id']}")
    me.delete(f"me/mailFolders/{created.json()['id']}")
    later = me.get(inbox_delta.json()["@odata.deltaLink"])
    assert any("@removed" in item for item in later.json()["value"])
    collect("delta (changes, @removed)", "message", later, True)
    folders_later = me.get(folder_delta.json()["@odata.deltaLink"])
    assert any("@removed" in item for item in folders_later.json()["value"])
    collect("mailFolders/delta (@removed)", "mailFolder", folders_later, True)

    # Subscriptions and notifications through a real webhook.
    hook = Webhook()
    try:
        expires = (datetime.now(UTC) + timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M:%S.0000000Z")
        subscription = me.post("subscriptions", json={
            "changeType": "created,updated,deleted", "notificationUrl": f"{hook.url}/notify",
            "lifecycleNotificationUrl": f"{hook.url}/lifecycle", "resource": "me/mailFolders('inbox')/messages",
            "expirationDateTime": expires, "clientState": f"state-{uuid.uuid4().hex[:8]}"})
        collect("POST /subscriptions", "subscription", subscription, False)
        collect("GET /subscriptions", "subscription", me.get("subscriptions"), True)
        target = me.get("me/mailFolders/inbox/messages?$top=1").json()["value"][0]
        me.patch(f"me/messages/{target['id']}", json={"isRead": not target["isRead"]})
        for body in hook.wait_for("/notify"):
            out.append(("webhook POST", f"{GRAPH}.changeNotificationCollection", body))
        folders = me.post("subscriptions", json={
            "changeType": "created,updated,deleted", "notificationUrl": f"{hook.url}/folders",
            "resource": "me/mailFolders", "expirationDateTime": expires, "clientState": "folders"})
        collect("POST /subscriptions (me/mailFolders)", "subscription", folders, False)
        me.post("me/mailFolders", json={"displayName": f"Schema {uuid.uuid4().hex[:6]}"})
        for body in hook.wait_for("/folders"):
            out.append(("folder webhook POST", f"{GRAPH}.changeNotificationCollection", body))
        for event in ("reauthorizationRequired", "missed", "subscriptionRemoved"):
            response = sandbox.admin("POST", f"subscriptions/{subscription.json()['id']}/lifecycle",
                                     json={"event": event})
            assert response.status_code == 202, response.text
        for body in hook.wait_for("/lifecycle", 3):
            out.append(("lifecycle POST", f"{GRAPH}.changeNotificationCollection", body))
    finally:
        hook.close()
    return out


@pytest.fixture(scope="module")
def csdl() -> dict[str, TypeInfo]:
    return load_csdl()


def test_the_csdl_is_where_the_tests_expect_it() -> None:
    assert shared_file(GRAPH_CSDL).stat().st_size > 1_000_000


def test_every_payload_matches_the_csdl(csdl: dict[str, TypeInfo], samples: list[Sample]) -> None:
    checker = Checker(csdl)
    for label, type_name, value in samples:
        checker.check(value, type_name, f"{label} <{type_name.rsplit('.', 1)[-1]}>")
    assert checker.errors == [], "\n".join(checker.errors[:50])
    missing = [t for t in REQUIRED_TYPES if f"{GRAPH}.{t}" not in checker.seen]
    assert missing == [], f"payload kinds never exercised: {missing}"


def test_the_checker_catches_what_it_should(csdl: dict[str, TypeInfo]) -> None:
    """The checker itself can fail: undeclared names, wrong EDM types, bad enums, wrong nesting."""
    bad = [
        ({"id": "x", "wellKnownName": "inbox"}, "mailFolder", "not declared"),          # beta-only property
        ({"id": "x", "isRead": "true"}, "message", "Edm.Boolean"),
        ({"id": "x", "receivedDateTime": "yesterday"}, "message", "Edm.DateTimeOffset"),
        ({"id": "x", "importance": "urgent"}, "message", "not a member"),
        ({"id": "x", "toRecipients": {"emailAddress": {}}}, "message", "JSON array"),
        ({"id": "x", "from": {"emailAddress": {"address": "a@b", "display": "A"}}}, "message", "not declared"),
        ({"id": "x", "flag": {"flagStatus": "flagged", "dueDateTime": "2026-01-01"}}, "message", "JSON object"),
        ({"id": "x", "totalItemCount": 2**40}, "mailFolder", "Edm.Int32"),
        ({"value": [{"subscriptionId": "not-a-guid"}]}, "changeNotificationCollection", "Edm.Guid"),
        ({"id": "x", "expirationDateTime": None}, "subscription", "not nullable"),
        ({"@odata.type": "#microsoft.graph.event", "id": "x"}, "message", "derived"),
    ]
    for value, type_name, expected in bad:
        checker = Checker(csdl)
        checker.check(value, f"{GRAPH}.{type_name}", type_name)
        assert any(expected in e for e in checker.errors), (value, checker.errors)
    good = Checker(csdl)
    good.check({"@odata.etag": "W/\"x\"", "id": "x", "@removed": {"reason": "deleted"}}, f"{GRAPH}.message", "m")
    good.check({"resourceData": {"@odata.type": "#Microsoft.Graph.Message", "id": "x"}, "changeType": "created",
                "resource": "r", "subscriptionExpirationDateTime": "2026-01-01T00:00:00Z",
                "subscriptionId": str(uuid.uuid4()), "tenantId": str(uuid.uuid4())},
               f"{GRAPH}.changeNotification", "n")
    assert good.errors == []
