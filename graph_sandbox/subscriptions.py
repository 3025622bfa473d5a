"""Graph change-notification subscriptions for Outlook messages.

Endpoints (under ``/v1.0``)::

    POST   /subscriptions                    create (after the validation handshake)
    GET    /subscriptions                    list the caller's
    GET    /subscriptions/{id}
    PATCH  /subscriptions/{id}               renew (expirationDateTime) / move (notificationUrl)
    DELETE /subscriptions/{id}
    POST   /subscriptions/{id}/reauthorize   answer a reauthorizationRequired challenge

Sandbox-only (for tests and the mail page)::

    GET    /sandbox/subscriptions            every subscription, with delivery figures
    POST   /sandbox/subscriptions/{id}/lifecycle   {"event": "..."}  send a lifecycle event now

Resources: ``me/messages``, ``users/{id|address}/messages``,
``me/mailFolders('{id}')/messages`` and ``users/{id}/mailFolders('{id}')/messages``
(``mailFolders/{id}`` works too; well-known names like ``inbox`` resolve to the folder),
and ``me/mailFolders`` / ``users/{id}/mailFolders``: the mailbox's folders themselves
(created, renamed or moved = ``updated``, deleted for good), resource
``Users/{u}/MailFolders/{id}``, ``@odata.type`` ``#Microsoft.Graph.MailFolder``.
Graph's resource table lists only message paths for mail; Outlook's notification
service has always taken the folder collection too (Outlook REST v2.0 documented
it), and a client must cope with it being refused (the product falls back to polls).

Rules Outlook applies and the sandbox copies:

- ``notificationUrl`` / ``lifecycleNotificationUrl`` must be https. A local stack
  serves http on loopback, so ``allow_http_loopback_webhooks`` (CLI
  ``--allow-http-loopback-webhooks``) admits http for 127.0.0.1/localhost/[::1]
  only; any other http URL is refused either way.
- ``expirationDateTime`` at most 4230 minutes ahead (400 beyond), and a request for
  less than 45 minutes is raised to 45 (``subscription_min_minutes``), on create and
  on renew; the answer carries the expiration actually granted.
- every change notification has its own ``id``.
- ``reauthorizationRequired``: from ``reauthorize_before_s`` before expiry (or on
  demand, admin API) a *challenge* is open. Until the app answers it
  (``PATCH`` the subscription or ``POST .../reauthorize``) its change notifications
  are **held, not sent**, and the event is repeated every ``reauthorize_repeat_s``
  (Microsoft: it can come "every few minutes" and "if the API call succeeds, the
  change notification flow resumes"). Answering releases what was held, in order
  (past ``MAX_HELD`` the oldest are dropped and a ``missed`` event says so).

A subscription's life::

    POST ──validate body──> 400 (changeType, expiration > 4230 min, clientState > 128 ...)
      │
      ├─ POST notificationUrl?validationToken=T ─┐ each must answer 200, text/plain,
      ├─ POST lifecycleNotificationUrl?... ──────┘ body exactly T, within 10 s; else 400
      v
    active ──mail change in scope──> notification (see notifications.py)
      │  ├── close to expiry ──────> reauthorizationRequired, repeated; notifications held
      │  │                            until PATCH (renew) or POST reauthorize answers it
      │  ├── user revokes the grant > subscriptionRemoved, then gone
      │  └── expirationDateTime ───> gone (no more notifications, GET 404)
      v
    DELETE -> gone
"""

from __future__ import annotations

import asyncio
import re
import secrets
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import aiohttp
from aiohttp import web

from graph_sandbox.identity import platform_for
from graph_sandbox.identity_records import Principal
from graph_sandbox.mailbox import FolderChange, MailboxError, MailChange
from graph_sandbox.notifications import (
    Notifier,
    change_notification,
    folder_change_notification,
    graph_datetime,
    lifecycle_notification,
)
from graph_sandbox.payloads import error as graph_error
from graph_sandbox.payloads import message as message_payload
from graph_sandbox.payloads import message_select
from graph_sandbox.rich_notifications import (
    MAX_RICH_MINUTES,
    UNSELECTABLE,
    CertificateError,
    EncryptionCertificate,
    encrypted_content,
    parse_certificate,
    validation_token,
)

MAX_CLIENT_STATE = 128
MAX_HELD = 1000                    # notifications held per subscription during a challenge
LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})
MESSAGES = "messages"
FOLDERS = "folders"
MAX_PER_MAILBOX = 1000
CHANGE_TYPES = ("created", "updated", "deleted")
READ_SCOPES = frozenset({"Mail.Read", "Mail.ReadBasic", "Mail.ReadWrite", "Mail.ReadBasic.All"})
UPDATABLE = frozenset({"expirationDateTime", "notificationUrl", "encryptionCertificate", "encryptionCertificateId"})

_RESOURCE = re.compile(
    r"^/?(?:(?P<me>me)|users/(?P<user>[^/()]+))"
    r"(?:/mailfolders(?:\('(?P<folder_q>[^']+)'\)|/(?P<folder_p>[^/()]+)))?"
    r"/messages/?$",
    re.IGNORECASE,
)
_FOLDERS_RESOURCE = re.compile(r"^/?(?:(?P<me>me)|users/(?P<user>[^/()]+))/mailfolders/?$", re.IGNORECASE)


class GraphError(Exception):
    """A Graph error answer from the subscription endpoints."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


@dataclass
class Subscription:
    """One subscription; ``folder_id`` None means every folder of the mailbox."""

    id: str
    resource: str
    change_types: tuple[str, ...]
    notification_url: str
    lifecycle_url: str | None
    client_state: str | None
    expiration: float                  # sandbox-clock epoch seconds
    app_id: str
    creator_id: str
    user_id: str                       # whose mailbox
    folder_id: str | None
    delegated: bool
    immutable_ids: bool                # created with Prefer: IdType="ImmutableId"
    latest_tls: str = "v1_2"
    kind: str = MESSAGES               # MESSAGES or FOLDERS (a me/mailFolders subscription)
    reauthorization_sent_for: float | None = None   # the expiration the last challenge was about
    challenge_open: bool = False       # reauthorizationRequired sent, not answered: notifications held
    challenge_sent_at: float = 0.0     # sandbox clock of the last reauthorizationRequired
    held: list[dict[str, Any]] = field(default_factory=list)
    held_overflow: bool = False
    # Rich notifications (graph_sandbox.rich_notifications): the $select of the resource, the certificate.
    include_resource_data: bool = False
    select: tuple[str, ...] = ()
    certificate: EncryptionCertificate | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "resource": self.resource,
            "applicationId": self.app_id,
            "changeType": ",".join(self.change_types),
            "clientState": self.client_state,
            "notificationUrl": self.notification_url,
            "notificationQueryOptions": None,
            "lifecycleNotificationUrl": self.lifecycle_url,
            "expirationDateTime": graph_datetime(self.expiration),
            "creatorId": self.creator_id,
            "includeResourceData": self.include_resource_data,
            "latestSupportedTlsVersion": self.latest_tls,
            "encryptionCertificate": self.certificate.base64 if self.certificate is not None else None,
            "encryptionCertificateId": self.certificate.certificate_id if self.certificate is not None else None,
            "notificationUrlAppId": None,
        }


class SubscriptionService:
    """Subscriptions, the validation handshake, and the listener that feeds the notifier."""

    def __init__(self, state: Any, *, identity: Any | None = None) -> None:
        self.state = state
        self.identity = identity
        self.notifier = Notifier(state, missed_event=self._missed_event, validation_tokens=self._validation_tokens)
        self._subs: dict[str, Subscription] = {}
        self._by_user: dict[str, set[str]] = {}
        self._task: asyncio.Task[None] | None = None
        self._handshake_session: aiohttp.ClientSession | None = None
        state.mailboxes.add_listener(self._on_change)
        state.add_reset_listener(lambda _state: self.clear())

    # -- settings ---------------------------------------------------------------

    def _setting(self, name: str, default: float) -> float:
        return float(getattr(self.state.config, name, default))

    @property
    def max_minutes(self) -> float:
        return self._setting("subscription_max_minutes", 4230)

    @property
    def min_minutes(self) -> float:
        return self._setting("subscription_min_minutes", 45)

    @property
    def reauthorize_repeat_s(self) -> float:
        return self._setting("reauthorize_repeat_s", 180.0)

    @property
    def validation_timeout_s(self) -> float:
        return self._setting("validation_timeout_s", 10.0)

    @property
    def reauthorize_before_s(self) -> float:
        return self._setting("reauthorize_before_s", 15 * 60.0)

    def _now(self) -> float:
        return float(self.state.clock.time())

    # -- routes ------------------------------------------------------------------

    def routes(self) -> list[web.RouteDef]:
        return [
            web.post("/v1.0/subscriptions", self.create),
            web.get("/v1.0/subscriptions", self.list),
            web.get("/v1.0/subscriptions/{id}", self.get),
            web.patch("/v1.0/subscriptions/{id}", self.update),
            web.delete("/v1.0/subscriptions/{id}", self.delete),
            web.post("/v1.0/subscriptions/{id}/reauthorize", self.reauthorize),
            web.get("/sandbox/subscriptions", self.admin_list),
            web.post("/sandbox/subscriptions/{id}/lifecycle", self.admin_lifecycle),
        ]

    # -- loop ----------------------------------------------------------------------

    async def start(self) -> None:
        await self.notifier.start()
        if self._task is None:
            self._task = asyncio.create_task(self._housekeeping(), name="graph-sandbox-subscriptions")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        await self.notifier.stop()
        if self._handshake_session is not None:
            await self._handshake_session.close()
            self._handshake_session = None

    async def _housekeeping(self) -> None:
        while True:
            self.tick()
            await asyncio.sleep(0.1)

    def tick(self) -> None:
        """Expire subscriptions, send reauthorization challenges, drop revoked ones."""
        now = self._now()
        for sub in list(self._subs.values()):
            if now >= sub.expiration:
                self._remove(sub.id)
                continue
            if sub.delegated and self.state.grant_revoked(sub.user_id, sub.app_id):
                self._lifecycle(sub, "subscriptionRemoved")
                self._remove(sub.id)
                continue
            due = (sub.lifecycle_url is not None and sub.expiration - now <= self.reauthorize_before_s
                   and sub.reauthorization_sent_for != sub.expiration)
            repeat = sub.challenge_open and now - sub.challenge_sent_at >= self.reauthorize_repeat_s
            if due or repeat:
                self._challenge(sub)

    def _challenge(self, sub: Subscription) -> None:
        """Send reauthorizationRequired and hold the subscription's notifications until it is answered."""
        if not sub.lifecycle_url:
            return
        sub.reauthorization_sent_for = sub.expiration
        sub.challenge_open = True
        sub.challenge_sent_at = self._now()
        self._lifecycle(sub, "reauthorizationRequired")

    def _answer_challenge(self, sub: Subscription) -> None:
        """The app reauthorized (or renewed): delivery resumes with what was held, in order."""
        if not sub.challenge_open:
            return
        sub.challenge_open = False
        held, sub.held = sub.held, []
        for payload in held:
            self.notifier.enqueue(sub.notification_url, payload, subscription_id=sub.id)
        if sub.held_overflow:
            sub.held_overflow = False
            self._lifecycle(sub, "missed")

    def _notify(self, sub: Subscription, payload: dict[str, Any]) -> None:
        if not sub.challenge_open:
            self.notifier.enqueue(sub.notification_url, payload, subscription_id=sub.id)
            return
        sub.held.append(payload)
        if len(sub.held) > MAX_HELD:
            del sub.held[0]
            sub.held_overflow = True

    def export_state(self) -> dict[str, Any]:
        """Every subscription and what the notifier still has to send (graph_sandbox.persistence)."""
        return {"subscriptions": list(self._subs.values()), "pending": self.notifier.export_pending()}

    def import_state(self, saved: dict[str, Any]) -> None:
        self.clear()
        for sub in saved["subscriptions"]:
            self._subs[sub.id] = sub
            self._by_user.setdefault(sub.user_id, set()).add(sub.id)
        self.notifier.import_pending(saved["pending"])

    def fingerprint(self) -> tuple[Any, ...]:
        """Changes whenever something worth saving changed (cheap; polled by the saver)."""
        subs = sorted((s.id, s.expiration, s.notification_url, s.challenge_open, len(s.held))
                      for s in self._subs.values())
        return (*subs, self.notifier.pending_count())

    def clear(self) -> None:
        """Forget every subscription (sandbox reset: the world is rebuilt)."""
        self._subs.clear()
        self._by_user.clear()
        self.notifier.clear()

    # -- the mailbox listener ----------------------------------------------------------

    def _on_change(self, change: Any) -> None:
        if not isinstance(change, MailChange | FolderChange):
            return
        ids = self._by_user.get(change.user_id)
        if not ids:
            return
        now = self._now()
        wanted = FOLDERS if isinstance(change, FolderChange) else MESSAGES
        for sub_id in sorted(ids):
            sub = self._subs.get(sub_id)
            if (sub is None or sub.kind != wanted or now >= sub.expiration
                    or change.change_type not in sub.change_types):
                continue
            if isinstance(change, FolderChange):
                self._notify(sub, folder_change_notification(
                    subscription_id=sub.id, subscription_expiration=sub.expiration,
                    change_type=change.change_type, user_id=change.user_id, folder_id=change.folder_id,
                    tenant_id=self.state.tenant_id, client_state=sub.client_state))
                continue
            if sub.folder_id is not None and sub.folder_id != change.folder_id:
                continue
            message_id = change.immutable_id if sub.immutable_ids and change.immutable_id else change.message_id
            payload = change_notification(
                subscription_id=sub.id, subscription_expiration=sub.expiration, change_type=change.change_type,
                user_id=change.user_id, message_id=message_id, tenant_id=self.state.tenant_id,
                client_state=sub.client_state, etag=self._etag(change))
            if sub.include_resource_data and sub.certificate is not None:
                data = self._resource_data(sub, change)
                if data is not None:
                    payload["encryptedContent"] = encrypted_content(data, sub.certificate)
            self._notify(sub, payload)

    def _resource_data(self, sub: Subscription, change: MailChange) -> dict[str, Any] | None:
        """The message as the subscription's ``$select`` shows it now (at the change), or None (deleted: gone)."""
        if change.change_type == "deleted":
            return None
        box = self.state.mailboxes.get(change.user_id)
        message = box.by_rest.get(change.message_id) if box is not None else None
        if message is None:
            return None
        return message_payload(message, box, immutable=sub.immutable_ids, select=sub.select, odata_type=True)

    def _validation_tokens(self, subscription_ids: Iterable[str]) -> list[str]:
        """One token per distinct (app, tenant) among these subscriptions' rich notifications."""
        identity = self.identity or platform_for(self.state)
        if identity is None:
            return []
        pairs = sorted({(sub.app_id, self.state.tenant_id) for sid in subscription_ids
                        if (sub := self._subs.get(sid)) is not None and sub.include_resource_data})
        now = self._now()
        return [validation_token(identity.signer, app_id=app_id, tenant_id=tenant_id, now=now)
                for app_id, tenant_id in pairs]

    def _etag(self, change: MailChange) -> str | None:
        if change.change_type == "deleted":
            return None
        box = self.state.mailboxes.get(change.user_id)
        message = box.by_rest.get(change.message_id) if box is not None else None
        return f'W/"{message.change_key}"' if message is not None else None

    def _lifecycle(self, sub: Subscription, event: str) -> bool:
        if not sub.lifecycle_url:
            return False
        self.notifier.enqueue(sub.lifecycle_url, lifecycle_notification(
            subscription_id=sub.id, subscription_expiration=sub.expiration, event=event,
            tenant_id=self.state.tenant_id, client_state=sub.client_state), subscription_id=sub.id, lifecycle=True)
        return True

    def _missed_event(self, subscription_id: str) -> tuple[str, dict[str, Any]] | None:
        sub = self._subs.get(subscription_id)
        if sub is None or not sub.lifecycle_url:
            return None
        return sub.lifecycle_url, lifecycle_notification(
            subscription_id=sub.id, subscription_expiration=sub.expiration, event="missed",
            tenant_id=self.state.tenant_id, client_state=sub.client_state)

    def _remove(self, sub_id: str) -> None:
        sub = self._subs.pop(sub_id, None)
        if sub is not None:
            ids = self._by_user.get(sub.user_id)
            if ids is not None:
                ids.discard(sub_id)

    # -- handlers --------------------------------------------------------------------

    def _principal(self, request: web.Request) -> Principal:
        principal = request.get("principal")
        if isinstance(principal, Principal):
            return principal
        identity = self.identity or platform_for(self.state)
        if identity is None:
            raise RuntimeError("no IdentityPlatform was built on this sandbox state")
        principal = identity.authenticate(request)
        return principal  # type: ignore[no-any-return]

    def _error(self, request: web.Request, exc: GraphError) -> web.Response:
        request_id = str(uuid.uuid4())
        body = graph_error(exc.code, exc.message, request_id=request_id,
                           client_request_id=request.headers.get("client-request-id", request_id),
                           date=datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S"))
        return web.json_response(body, status=exc.status, headers={"request-id": request_id})

    def _context(self, request: web.Request, suffix: str) -> str:
        base = getattr(self.state.config, "public_url", None) or f"{request.scheme}://{request.host}"
        return f"{base.rstrip('/')}/v1.0/$metadata#{suffix}"

    async def create(self, request: web.Request) -> web.Response:
        principal = self._principal(request)
        try:
            body = await _json_object(request)
            sub = self._parse_new(principal, body, request.headers.get("Prefer", ""))
            await self._handshake(sub.notification_url)
            if sub.lifecycle_url:
                await self._handshake(sub.lifecycle_url)
            # Checked again: the mailbox may have reached its limit during the handshake.
            self._check_capacity(sub.user_id)
        except GraphError as exc:
            return self._error(request, exc)
        self._subs[sub.id] = sub
        self._by_user.setdefault(sub.user_id, set()).add(sub.id)
        return web.json_response({"@odata.context": self._context(request, "subscriptions/$entity"),
                                  **sub.to_json()}, status=201)

    async def list(self, request: web.Request) -> web.Response:
        principal = self._principal(request)
        mine = [s.to_json() for s in self._visible(principal)]
        return web.json_response({"@odata.context": self._context(request, "subscriptions"), "value": mine})

    async def get(self, request: web.Request) -> web.Response:
        principal = self._principal(request)
        try:
            sub = self._find(principal, request.match_info["id"])
        except GraphError as exc:
            return self._error(request, exc)
        return web.json_response({"@odata.context": self._context(request, "subscriptions/$entity"),
                                  **sub.to_json()})

    async def update(self, request: web.Request) -> web.Response:
        principal = self._principal(request)
        try:
            sub = self._find(principal, request.match_info["id"])
            body = await _json_object(request)
            unknown = sorted(k for k in body if k not in UPDATABLE and not k.startswith("@odata."))
            if unknown:
                raise GraphError(400, "InvalidRequest",
                                 "Only expirationDateTime, notificationUrl, encryptionCertificate and "
                                 f"encryptionCertificateId can be updated, not {unknown[0]}.")
            expiration = sub.expiration
            if "expirationDateTime" in body:
                expiration = self._parse_expiration(body["expirationDateTime"], rich=sub.include_resource_data)
            certificate = sub.certificate
            if "encryptionCertificate" in body or "encryptionCertificateId" in body:
                # Microsoft's key rotation: a PATCH gives the subscription a new certificate.
                if not sub.include_resource_data:
                    raise GraphError(400, "InvalidRequest", "The subscription does not include resource data.")
                try:
                    certificate = parse_certificate(body.get("encryptionCertificate"),
                                                    body.get("encryptionCertificateId"))
                except CertificateError as exc:
                    raise GraphError(400, "InvalidRequest", str(exc)) from None
            url = sub.notification_url
            if "notificationUrl" in body:
                url = self._parse_url(body["notificationUrl"], "notificationUrl")
                if url != sub.notification_url:
                    await self._handshake(url)
            self._authorize_resource(principal, sub.user_id)
        except GraphError as exc:
            return self._error(request, exc)
        if sub.id not in self._subs:  # expired or deleted while the handshake ran
            return self._error(request, _not_found())
        sub.expiration = expiration
        sub.notification_url = url
        sub.certificate = certificate
        # A PATCH both renews and reauthorizes (Microsoft's advice: one PATCH, not both calls).
        self._answer_challenge(sub)
        return web.json_response({"@odata.context": self._context(request, "subscriptions/$entity"),
                                  **sub.to_json()})

    async def delete(self, request: web.Request) -> web.Response:
        principal = self._principal(request)
        try:
            sub = self._find(principal, request.match_info["id"])
        except GraphError as exc:
            return self._error(request, exc)
        self._remove(sub.id)
        return web.Response(status=204)

    async def reauthorize(self, request: web.Request) -> web.Response:
        principal = self._principal(request)
        try:
            sub = self._find(principal, request.match_info["id"])
            self._authorize_resource(principal, sub.user_id)
        except GraphError as exc:
            return self._error(request, exc)
        # Reauthorizing does not extend the expiration; it only resumes delivery.
        self._answer_challenge(sub)
        return web.Response(status=204)

    async def admin_list(self, request: web.Request) -> web.Response:
        return web.json_response({
            "value": [{**s.to_json(), "userId": s.user_id, "folderId": s.folder_id, "kind": s.kind,
                       "immutableIds": s.immutable_ids, "reauthorizationPending": s.challenge_open,
                       "held": len(s.held)} for s in self._subs.values()],
            "delivery": self.notifier.stats.as_dict(),
            "pending": self.notifier.pending_count(),
        })

    async def admin_lifecycle(self, request: web.Request) -> web.Response:
        sub = self._subs.get(request.match_info["id"])
        if sub is None:
            return self._error(request, _not_found())
        try:
            body = await _json_object(request)
        except GraphError as exc:
            return self._error(request, exc)
        event = body.get("event")
        if event not in ("reauthorizationRequired", "subscriptionRemoved", "missed"):
            return self._error(request, GraphError(400, "InvalidRequest",
                                                   "event must be reauthorizationRequired, subscriptionRemoved "
                                                   "or missed"))
        if not sub.lifecycle_url:
            return self._error(request, GraphError(409, "InvalidRequest",
                                                   "The subscription has no lifecycleNotificationUrl."))
        if event == "reauthorizationRequired":
            self._challenge(sub)     # a real challenge: delivery pauses until it is answered
        else:
            self._lifecycle(sub, event)
        if event == "subscriptionRemoved":
            self._remove(sub.id)
        return web.Response(status=202)

    # -- validation ------------------------------------------------------------------

    def _visible(self, principal: Principal) -> Iterable[Subscription]:
        for sub in self._subs.values():
            if sub.app_id != principal.app_id:
                continue
            if principal.delegated and sub.creator_id != principal.user_id:
                continue
            yield sub

    def _find(self, principal: Principal, sub_id: str) -> Subscription:
        sub = self._subs.get(sub_id)
        if sub is None or all(mine.id != sub.id for mine in self._visible(principal)):
            raise _not_found()
        return sub

    def _parse_new(self, principal: Principal, body: dict[str, Any], prefer: str) -> Subscription:
        for name in ("changeType", "notificationUrl", "resource", "expirationDateTime"):
            if body.get(name) in (None, ""):
                raise GraphError(400, "InvalidRequest", f"The '{name}' property is required.")
        change_types = _parse_change_types(body["changeType"])
        notification_url = self._parse_url(body["notificationUrl"], "notificationUrl")
        lifecycle_url = None
        if body.get("lifecycleNotificationUrl") not in (None, ""):
            lifecycle_url = self._parse_url(body["lifecycleNotificationUrl"], "lifecycleNotificationUrl")
        client_state = body.get("clientState")
        if client_state is not None:
            if not isinstance(client_state, str):
                raise GraphError(400, "InvalidRequest", "The 'clientState' property must be a string.")
            if len(client_state) > MAX_CLIENT_STATE:
                raise GraphError(400, "InvalidRequest",
                                 f"The 'clientState' property must not exceed {MAX_CLIENT_STATE} characters.")
        include = body.get("includeResourceData")
        if include not in (None, True, False):
            raise GraphError(400, "InvalidRequest", "The 'includeResourceData' property must be a boolean.")
        tls = body.get("latestSupportedTlsVersion") or "v1_2"
        if tls not in ("v1_0", "v1_1", "v1_2", "v1_3"):
            raise GraphError(400, "InvalidRequest", f"Invalid 'latestSupportedTlsVersion' value: '{tls}'.")
        kind, user_id, folder_id, select = self._resolve_resource(principal, body["resource"])
        certificate = None
        if include:
            if kind != MESSAGES:
                raise GraphError(400, "InvalidRequest", "includeResourceData is supported by the Graph sandbox for "
                                                        "message resources only.")
            try:
                certificate = parse_certificate(body.get("encryptionCertificate"), body.get("encryptionCertificateId"))
            except CertificateError as exc:
                raise GraphError(400, "InvalidRequest", str(exc)) from None
        expiration = self._parse_expiration(body["expirationDateTime"], rich=bool(include))
        self._check_capacity(user_id)
        return Subscription(
            id=str(uuid.uuid4()), resource=str(body["resource"]), change_types=change_types,
            notification_url=notification_url, lifecycle_url=lifecycle_url, client_state=client_state,
            expiration=expiration, app_id=principal.app_id,
            creator_id=principal.user_id if principal.delegated and principal.user_id else _service_principal(
                principal.app_id),
            user_id=user_id, folder_id=folder_id, delegated=principal.delegated,
            immutable_ids=_wants_immutable_ids(prefer), latest_tls=tls, kind=kind,
            include_resource_data=bool(include), select=select, certificate=certificate)

    def _check_capacity(self, user_id: str) -> None:
        if len(self._by_user.get(user_id, ())) >= MAX_PER_MAILBOX:
            raise GraphError(403, "ExtensionError",
                             "Operation: Create; Exception: [Status Code: Forbidden; Reason: The maximum number "
                             f"of subscriptions ({MAX_PER_MAILBOX}) for this mailbox has been reached.]")

    def _parse_expiration(self, value: Any, *, rich: bool = False) -> float:
        """The expiration granted for ``value``; ``rich``: a subscription with resource data (a day at most)."""
        max_minutes = min(self.max_minutes, MAX_RICH_MINUTES) if rich else self.max_minutes
        if not isinstance(value, str):
            raise GraphError(400, "InvalidRequest", "Invalid 'expirationDateTime' value.")
        try:
            moment = datetime.fromisoformat(_trim_fraction(value.strip()).replace("Z", "+00:00"))
        except ValueError:
            raise GraphError(400, "InvalidRequest", f"Invalid 'expirationDateTime' value: '{value}'.") from None
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=UTC)
        expiration = moment.timestamp()
        now = self._now()
        if expiration <= now:
            raise GraphError(400, "InvalidRequest", "Subscription expiration must be in the future.")
        if expiration > now + max_minutes * 60:
            raise GraphError(400, "ExtensionError",
                             f"Subscription expiration can only be {max_minutes:g} minutes in the future.")
        # Outlook does not refuse a short lifetime: it grants its minimum instead.
        return max(expiration, now + self.min_minutes * 60)

    def _parse_url(self, value: Any, name: str) -> str:
        url = _parse_url(value, name)
        parts = urlsplit(url)
        if parts.scheme == "https":
            return url
        loopback = (parts.hostname or "").lower() in LOOPBACK_HOSTS
        if loopback and bool(getattr(self.state.config, "allow_http_loopback_webhooks", False)):
            return url
        hint = (" (the sandbox admits http on loopback only with --allow-http-loopback-webhooks)"
                if loopback else "")
        raise GraphError(400, "ValidationError",
                         f"Subscription validation request failed. The '{name}' must use the https scheme{hint}.")

    def _resolve_resource(self, principal: Principal,
                          resource: Any) -> tuple[str, str, str | None, tuple[str, ...]]:
        """(kind, mailbox user id, folder id or None, the ``$select``-ed properties) of a subscription's resource."""
        if not isinstance(resource, str):
            raise GraphError(400, "InvalidRequest", "The 'resource' property must be a string.")
        path, _, query = resource.strip().partition("?")
        kind = MESSAGES
        match = _RESOURCE.match(path)
        if match is None:
            match = _FOLDERS_RESOURCE.match(path)
            kind = FOLDERS
        if match is None:
            raise GraphError(400, "InvalidRequest",
                             f"Resource '{resource}' is not supported by the Graph sandbox; use me/messages, "
                             "users/{id}/messages, me/mailFolders('{id}')/messages or me/mailFolders.")
        if match.group("me"):
            if not principal.delegated or principal.user_id is None:
                raise GraphError(400, "BadRequest",
                                 "/me request is only valid with delegated authentication flow.")
            user_id = principal.user_id
        else:
            user = self.state.user(match.group("user"))
            if user is None:
                raise GraphError(404, "ResourceNotFound",
                                 f"Resource could not be discovered: user '{match.group('user')}'.")
            user_id = user.id
        self._authorize_resource(principal, user_id)
        select = _resource_select(query) if kind == MESSAGES else ()
        if kind == FOLDERS:
            if query:
                raise GraphError(400, "InvalidRequest", "Query options on me/mailFolders are not supported by the "
                                                        "Graph sandbox.")
            return kind, user_id, None, ()
        folder_ref = match.group("folder_q") or match.group("folder_p")
        folder_id = None
        if folder_ref is not None:
            try:
                folder_id = self.state.mailboxes[user_id].folder(folder_ref).id
            except MailboxError as exc:
                raise GraphError(exc.status, exc.code, exc.message) from None
        return kind, user_id, folder_id, select

    def _authorize_resource(self, principal: Principal, user_id: str) -> None:
        if principal.delegated:
            allowed = principal.user_id == user_id and bool(principal.scopes & READ_SCOPES)
        else:
            allowed = bool(principal.scopes & READ_SCOPES)
        if not allowed:
            raise GraphError(403, "ExtensionError",
                             "Operation: Create; Exception: [Status Code: Forbidden; Reason: Access is denied. "
                             "Check credentials and try again.]")

    async def _handshake(self, url: str) -> None:
        """Graph's validation request: POST url?validationToken=T; expect T back as text/plain."""
        token = ("Validation: Testing client application reachability for subscription Request-Id: "
                 f"{uuid.uuid4()}")
        parts = urlsplit(url)
        query = urlencode([*parse_qsl(parts.query, keep_blank_values=True), ("validationToken", token)])
        target = urlunsplit((parts.scheme, parts.netloc, parts.path, query, ""))
        if self._handshake_session is None or self._handshake_session.closed:
            self._handshake_session = aiohttp.ClientSession(trust_env=False)
        try:
            async with self._handshake_session.post(
                    target, data=b"", headers={"Content-Type": "text/plain; charset=utf-8"},
                    timeout=aiohttp.ClientTimeout(total=self.validation_timeout_s)) as response:
                text = await response.text(errors="replace")
                status = response.status
                content_type = response.content_type
        except TimeoutError:
            raise GraphError(400, "InvalidRequest", "Subscription validation request timed out.") from None
        except (aiohttp.ClientError, OSError):
            raise GraphError(400, "ValidationError",
                             "Subscription validation request failed. Notification endpoint must respond with "
                             "200 OK to validation request.") from None
        if status != 200:
            raise GraphError(400, "ValidationError",
                             "Subscription validation request failed. Notification endpoint must respond with "
                             "200 OK to validation request.")
        if content_type != "text/plain" or not secrets.compare_digest(text.encode(), token.encode()):
            raise GraphError(400, "ValidationError",
                             "Subscription validation request failed. Response must exactly match "
                             "validationToken query parameter.")


# ---------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------


def _not_found() -> GraphError:
    return GraphError(404, "ResourceNotFound", "The object was not found.")


async def _json_object(request: web.Request) -> dict[str, Any]:
    try:
        body = await request.json()
    except ValueError:
        raise GraphError(400, "BadRequest", "Unable to read JSON request payload. Please ensure Content-Type "
                                            "header is set and payload is of valid JSON format.") from None
    if not isinstance(body, dict):
        raise GraphError(400, "BadRequest", "The request body must be a JSON object.")
    return body


def _resource_select(query: str) -> tuple[str, ...]:
    """The ``$select`` of a message resource's query (what rich notifications carry).

    Microsoft: no ``$top``, ``$skip``, ``$orderby`` or ``$expand`` (other than
    extended properties) in the URL, and no ``body`` / ``uniqueBody`` in
    ``$select``. The sandbox takes ``$select`` alone (a ``$filter`` on the
    resource is Graph's, not the sandbox's: refused rather than ignored).
    """
    if not query:
        return ()
    names: tuple[str, ...] = ()
    for option, value in parse_qsl(query, keep_blank_values=True):
        if option.lower() != "$select":
            raise GraphError(400, "InvalidRequest",
                             f"Query option '{option}' on a subscription resource is not supported by the Graph "
                             "sandbox; use $select.")
        wanted = [name.strip() for name in value.split(",") if name.strip()]
        refused = [name for name in wanted if name.lower() in UNSELECTABLE]
        if refused:
            raise GraphError(400, "InvalidRequest",
                             f"'{refused[0]}' cannot be selected in the resource of a subscription.")
        try:
            names = message_select(wanted)
        except KeyError as exc:
            raise GraphError(400, "RequestBroker--ParseUri",
                             f"Could not find a property named '{exc.args[0]}' on type 'microsoft.graph.message'."
                             ) from None
    return names


def _parse_change_types(value: Any) -> tuple[str, ...]:
    if not isinstance(value, str):
        raise GraphError(400, "InvalidRequest", "The 'changeType' property must be a string.")
    parts = [p.strip() for p in value.split(",")]
    for part in parts:
        if part not in CHANGE_TYPES:
            raise GraphError(400, "InvalidRequest", f"Invalid 'changeType' attribute: '{part}'.")
    return tuple(t for t in CHANGE_TYPES if t in parts)


def _parse_url(value: Any, name: str) -> str:
    if not isinstance(value, str):
        raise GraphError(400, "InvalidRequest", f"The '{name}' property must be a string.")
    parts = urlsplit(value)
    # The https rule is SubscriptionService._parse_url's (it knows the loopback option).
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise GraphError(400, "InvalidRequest", f"Invalid '{name}': '{value}' is not an absolute http(s) URL.")
    return value


def _trim_fraction(text: str) -> str:
    """Python parses at most 6 fractional digits; Graph sends 7."""
    return re.sub(r"(\.\d{6})\d+", r"\1", text)


def _wants_immutable_ids(prefer: str) -> bool:
    return bool(re.search(r'IdType\s*=\s*"?ImmutableId"?', prefer, re.IGNORECASE))


def _service_principal(app_id: str) -> str:
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"sp:{app_id}"))
