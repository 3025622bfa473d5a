"""The sandbox-only admin API under ``/sandbox/`` (no auth: bind to 127.0.0.1).

For tests, benchmarks and the demo: reset the world, change faults,
latency and limits at run time, read a mailbox as ground truth, count what
was served, revoke a user's consent, move the clock, make mail happen.

=======  ============================================  ==========================================
method   path                                          what
=======  ============================================  ==========================================
GET      /sandbox/                                      index of these endpoints
POST     /sandbox/reset                                 rebuild from config (+ body overrides)
GET      /sandbox/config                                current settings
PATCH    /sandbox/config                                change run-time settings (latency_ms,
                                                        rate_limit "N/window", max_concurrency,
                                                        delta_token_ttl_s, faults, ...)
GET/PUT  /sandbox/faults                                fault profile {profile, seed, overrides}
GET      /sandbox/counters                              requests, served, throttled, faults...
POST     /sandbox/counters/reset
GET      /sandbox/throttle                              in-flight and window counts per app+mailbox
GET      /sandbox/clock                                 sandbox time and offset
POST     /sandbox/clock                                 {"advance_s": n}: move time forward
GET      /sandbox/users                                 users with message counts
GET      /sandbox/mailboxes/{user}/snapshot             folders + messages as the store keeps them
POST     /sandbox/mailboxes/{user}/deliver              {"count": n, "folder": "inbox", "seed": s}
POST     /sandbox/mailboxes/{user}/churn                {"operations": n, "seed": s}: random
                                                        read/flag/move/delete/new-mail changes
POST     /sandbox/users/{user}/revoke-grant             {"app_id": optional}: consent withdrawn
POST     /sandbox/users/{user}/restore-grant            {"app_id": optional}
POST     /sandbox/users/{user}/invalidate-delta         every delta token of the mailbox -> 410
=======  ============================================  ==========================================

``{user}`` is a user's id or address.
"""

from __future__ import annotations

import random
from typing import TYPE_CHECKING, Any

import orjson
from aiohttp import web

from graph_sandbox.config import parse_rate_limit
from graph_sandbox.faults import FaultPlan
from graph_sandbox.mailbox import Mailbox, MailboxError, Message, iso, recipient
from graph_sandbox.seed import new_mail

if TYPE_CHECKING:
    from graph_sandbox.state import SandboxState, SandboxUser

RUNTIME_SETTINGS = frozenset({
    "latency_ms", "execution_ms", "rate_limit_requests", "rate_limit_window_s", "max_concurrency",
    "concurrency_retry_after_s",
    "delta_token_ttl_s", "access_token_lifetime_s", "default_page_size", "max_delta_page_size", "faults",
    "fault_seed", "public_url", "delta_token_cache", "delta_expired_status", "delta_lag_s", "delta_replay_rate",
    "search_folder_idle_days",
})
RESET_SETTINGS = frozenset({"seed", "users", "messages_per_user", "search_folders"}) | RUNTIME_SETTINGS


class AdminError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(status=status, body=orjson.dumps(data), content_type="application/json")


class AdminApi:
    """Routes of the admin API (see the module docstring)."""

    def __init__(self, state: SandboxState) -> None:
        self.state = state

    def routes(self) -> list[web.RouteDef]:
        h = self._wrap
        return [
            web.get("/sandbox/", h(self.index)),
            web.post("/sandbox/reset", h(self.reset)),
            web.get("/sandbox/config", h(self.get_config)),
            web.patch("/sandbox/config", h(self.patch_config)),
            web.get("/sandbox/faults", h(self.get_faults)),
            web.put("/sandbox/faults", h(self.put_faults)),
            web.get("/sandbox/counters", h(self.get_counters)),
            web.post("/sandbox/counters/reset", h(self.reset_counters)),
            web.get("/sandbox/throttle", h(self.get_throttle)),
            web.get("/sandbox/clock", h(self.get_clock)),
            web.post("/sandbox/clock", h(self.advance_clock)),
            web.get("/sandbox/users", h(self.list_users)),
            web.get("/sandbox/mailboxes/{user}/snapshot", h(self.snapshot)),
            web.post("/sandbox/mailboxes/{user}/deliver", h(self.deliver)),
            web.post("/sandbox/mailboxes/{user}/churn", h(self.churn)),
            web.post("/sandbox/users/{user}/revoke-grant", h(self.revoke_grant)),
            web.post("/sandbox/users/{user}/restore-grant", h(self.restore_grant)),
            web.post("/sandbox/users/{user}/invalidate-delta", h(self.invalidate_delta)),
        ]

    @staticmethod
    def _wrap(handler: Any) -> Any:
        async def run(request: web.Request) -> web.Response:
            try:
                body: dict[str, Any] = {}
                if request.method in ("POST", "PUT", "PATCH") and request.can_read_body:
                    raw = await request.read()
                    if raw.strip():
                        try:
                            body = orjson.loads(raw)
                        except orjson.JSONDecodeError:
                            raise AdminError(400, "the body is not valid JSON") from None
                        if not isinstance(body, dict):
                            raise AdminError(400, "the body must be a JSON object")
                return _json(await handler(request, body))
            except AdminError as exc:
                return _json({"error": {"code": "badRequest" if exc.status == 400 else "notFound",
                                        "message": exc.message}}, exc.status)
            except (ValueError, MailboxError) as exc:
                return _json({"error": {"code": "badRequest", "message": str(exc)}}, 400)
        return run

    def _user(self, request: web.Request) -> SandboxUser:
        user = self.state.user(request.match_info["user"])
        if user is None:
            raise AdminError(404, f"no sandbox user {request.match_info['user']!r}")
        return user

    # -- handlers ------------------------------------------------------------------

    async def index(self, request: web.Request, body: dict[str, Any]) -> Any:
        return {"endpoints": sorted({f"{r.method} {r.resource.canonical}" for r in request.app.router.routes()
                                     if r.resource is not None and r.method != "HEAD"
                                     and r.resource.canonical.startswith("/sandbox/")})}

    async def reset(self, request: web.Request, body: dict[str, Any]) -> Any:
        changes = _settings(body, RESET_SETTINGS)
        self.state.reset(self.state.config.with_changes(**changes))
        return {"reset": True, "config": self.state.config.runtime_view(), "users": len(self.state.users)}

    async def get_config(self, request: web.Request, body: dict[str, Any]) -> Any:
        return self.state.config.runtime_view()

    async def patch_config(self, request: web.Request, body: dict[str, Any]) -> Any:
        changes = _settings(body, RUNTIME_SETTINGS)
        if "faults" in changes:
            FaultPlan(changes["faults"])          # unknown profile -> ValueError -> 400
        return self.state.apply_runtime(**changes).runtime_view()

    async def get_faults(self, request: web.Request, body: dict[str, Any]) -> Any:
        return {**self.state.faults.describe(), "injected": self.state.faults.injected}

    async def put_faults(self, request: web.Request, body: dict[str, Any]) -> Any:
        profile = body.get("profile", "none")
        seed = body.get("seed", self.state.config.effective_fault_seed)
        overrides = body.get("overrides") or {}
        if not isinstance(profile, str) or not isinstance(seed, int) or not isinstance(overrides, dict):
            raise AdminError(400, "expected {profile: str, seed: int, overrides: {name: number}}")
        plan = FaultPlan(profile, seed=seed, **overrides)
        self.state.apply_runtime(faults=profile, fault_seed=seed)
        self.state.faults = plan
        return plan.describe()

    async def get_counters(self, request: web.Request, body: dict[str, Any]) -> Any:
        return {**self.state.counters.as_dict(), "inFlight": self.state.throttle.in_flight()}

    async def reset_counters(self, request: web.Request, body: dict[str, Any]) -> Any:
        from graph_sandbox.state import Counters  # late: state imports admin's siblings
        self.state.counters = Counters()
        self.state.delta.forget()
        return self.state.counters.as_dict()

    async def get_throttle(self, request: web.Request, body: dict[str, Any]) -> Any:
        return {"maxConcurrency": self.state.throttle.max_concurrency, "limit": self.state.throttle.limit,
                "windowS": self.state.throttle.window_s, "inFlight": self.state.throttle.in_flight(),
                "buckets": self.state.throttle.snapshot()}

    async def get_clock(self, request: web.Request, body: dict[str, Any]) -> Any:
        return {"now": self.state.clock.now().isoformat(), "offsetS": self.state.clock.offset_s}

    async def advance_clock(self, request: web.Request, body: dict[str, Any]) -> Any:
        seconds = body.get("advance_s")
        if not isinstance(seconds, int | float) or isinstance(seconds, bool) or seconds < 0:
            raise AdminError(400, "advance_s must be a non-negative number of seconds")
        self.state.clock.advance(float(seconds))
        return await self.get_clock(request, body)

    async def list_users(self, request: web.Request, body: dict[str, Any]) -> Any:
        out = []
        for user in self.state.users.values():
            box = self.state.mailbox(user.id)
            out.append({"id": user.id, "displayName": user.display_name, "mail": user.mail,
                        "userPrincipalName": user.user_principal_name, "messageCount": box.message_count(),
                        "folderCount": len(box.folders) - 1})
        return {"tenantId": self.state.tenant_id, "tenantDomain": self.state.tenant_domain, "users": out}

    async def snapshot(self, request: web.Request, body: dict[str, Any]) -> Any:
        user = self._user(request)
        return snapshot(self.state.mailbox(user.id), user)

    async def deliver(self, request: web.Request, body: dict[str, Any]) -> Any:
        user = self._user(request)
        count = _count(body.get("count", 1), "count")
        folder = body.get("folder", "inbox")
        rng = random.Random(body.get("seed", self.state.rng.getrandbits(32)))
        box = self.state.mailbox(user.id)
        colleagues = [recipient(u.mail, u.display_name) for u in self.state.users.values()]
        delivered = [new_mail(box, rng, colleagues, self.state.clock.time_ms(), folder) for _ in range(count)]
        return {"delivered": [{"id": m.immutable_id, "restId": m.rest_id, "subject": m.subject}
                              for m in delivered]}

    async def churn(self, request: web.Request, body: dict[str, Any]) -> Any:
        user = self._user(request)
        count = _count(body.get("operations", 10), "operations")
        rng = random.Random(body.get("seed", self.state.rng.getrandbits(32)))
        colleagues = [recipient(u.mail, u.display_name) for u in self.state.users.values()]
        done = churn(self.state.mailbox(user.id), rng, count, colleagues, self.state.clock.time_ms)
        return {"operations": done}

    async def revoke_grant(self, request: web.Request, body: dict[str, Any]) -> Any:
        user = self._user(request)
        self.state.revoke_grant(user.id, _app_id(body))
        return {"revoked": self.state.revoked_grants()}

    async def restore_grant(self, request: web.Request, body: dict[str, Any]) -> Any:
        user = self._user(request)
        self.state.restore_grant(user.id, _app_id(body))
        return {"revoked": self.state.revoked_grants()}

    async def invalidate_delta(self, request: web.Request, body: dict[str, Any]) -> Any:
        user = self._user(request)
        box = self.state.mailbox(user.id)
        box.sync_epoch += 1
        return {"userId": user.id, "syncEpoch": box.sync_epoch}


def _settings(body: dict[str, Any], allowed: frozenset[str]) -> dict[str, Any]:
    body = dict(body)
    if "rate_limit" in body:
        requests, window_s = parse_rate_limit(str(body.pop("rate_limit")))
        body["rate_limit_requests"], body["rate_limit_window_s"] = requests, window_s
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise AdminError(400, f"cannot set {', '.join(unknown)} here; settable: {', '.join(sorted(allowed))}")
    return body


def _count(value: Any, name: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= 100_000:
        raise AdminError(400, f"{name} must be an integer between 0 and 100000")
    return value


def _app_id(body: dict[str, Any]) -> str | None:
    app_id = body.get("app_id")
    if app_id is not None and not isinstance(app_id, str):
        raise AdminError(400, "app_id must be a string")
    return app_id


def snapshot(box: Mailbox, user: SandboxUser) -> dict[str, Any]:
    """Ground truth: folders and messages with the fields the store keeps.

    Message ``id`` is the immutable id (what the product stores); ``restId``
    is the current REST id; addresses are plain {name, address}.
    """
    folders = []
    for folder in box.all_folders():
        if folder.search is not None:
            continue   # a view over other folders, listed apart: the store must not hold it as a folder
        folders.append({
            "id": folder.id, "displayName": folder.display_name, "parentFolderId": folder.parent_id,
            "wellKnownName": folder.well_known, "totalItemCount": len(folder.index),
            "unreadItemCount": folder.unread, "childFolderCount": len(folder.children), "isHidden": folder.is_hidden,
        })
    messages = [_message_truth(box, m) for m in box.messages_newest_first(None)]
    searches = [{"id": f.id, "displayName": f.display_name, "parentFolderId": f.parent_id,
                 "sourceFolderIds": list(f.search.source_ids), "includeNestedFolders": f.search.include_nested,
                 "filterQuery": f.search.filter_query} for f in box.search_folders() if f.search is not None]
    return {"user": {"id": user.id, "mail": user.mail, "displayName": user.display_name},
            "rootFolderId": box.root_id, "folders": folders, "searchFolders": searches, "messages": messages,
            "messageCount": len(messages)}


def _address(rcpt: dict[str, Any] | None) -> dict[str, str] | None:
    return None if rcpt is None else dict(rcpt["emailAddress"])


def _message_truth(box: Mailbox, m: Message) -> dict[str, Any]:
    _, preview = box.body_of(m)
    return {
        "id": m.immutable_id, "restId": m.rest_id, "folderId": m.folder_id, "subject": m.subject,
        "from": _address(m.from_), "sender": _address(m.sender),
        "to": [_address(r) for r in m.to], "cc": [_address(r) for r in m.cc],
        "receivedDateTime": iso(m.received_ms), "sentDateTime": iso(m.sent_ms),
        "lastModifiedDateTime": iso(m.modified_ms), "changeKey": m.change_key, "isRead": m.is_read,
        "isDraft": m.is_draft, "flagStatus": m.flag.get("flagStatus", "notFlagged"), "importance": m.importance,
        "categories": list(m.categories), "hasAttachments": m.has_attachments, "conversationId": m.conversation_id,
        "internetMessageId": m.internet_message_id, "bodyPreview": preview,
    }


def churn(box: Mailbox, rng: random.Random, count: int, colleagues: list[dict[str, Any]],
          now_ms: Any) -> list[dict[str, str]]:
    """Apply ``count`` random changes a person would make, through the mailbox operations."""
    done: list[dict[str, str]] = []
    targets = [f.id for f in box.all_folders()
               if f.well_known not in ("outbox", "drafts", "conversationhistory") and f.search is None]
    kinds = ["read", "flag", "move", "delete", "new", "categories"]
    weights = [35, 15, 15, 10, 20, 5]
    for _ in range(count):
        kind = rng.choices(kinds, weights)[0]
        if kind == "new" or box.message_count() == 0:
            message = new_mail(box, rng, colleagues, now_ms())
            done.append({"op": "new", "id": message.immutable_id})
            continue
        # Pick from the whole mailbox in a stable order so a seed replays the same changes.
        ordered = box.messages_newest_first(None)
        message = ordered[min(int(rng.expovariate(1 / 30)), len(ordered) - 1)]
        if kind == "read":
            box.update_message(message, {"is_read": not message.is_read})
        elif kind == "flag":
            flagged = message.flag.get("flagStatus") == "flagged"
            box.update_message(message, {"flag": {"flagStatus": "notFlagged"} if flagged else {
                "flagStatus": "flagged", "startDateTime": {"dateTime": iso(now_ms())[:-1] + ".0000000",
                                                           "timeZone": "UTC"}}})
        elif kind == "categories":
            box.update_message(message, {"categories": () if message.categories else ("Follow up",)})
        elif kind == "move":
            choices = [t for t in targets if t != message.folder_id]
            box.move_message(message, rng.choice(choices))
        else:
            box.delete_message(message)
        done.append({"op": kind, "id": message.immutable_id})
    return done
