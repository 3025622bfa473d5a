"""Graph calls of change monitoring: /subscriptions and a message's parentFolderId.

Goes through ``GraphClient`` (the one HTTP seam, which maps statuses to
the project's errors); this module only shapes requests and reads answers.
Subscriptions are created with the account's delegated token, like every
other call for that mailbox, and (through GraphClient's ``Prefer:
IdType="ImmutableId"``) notifications then name messages by the same
immutable ids the store uses.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote

from mailsync.errors import MalformedResponse, NotFound
from mailsync.monitoring.records import CreatedSubscription, ResourceData, SubscriptionRequest, with_select
from mailsync.ports import TokenProvider
from mailsync.providers.graph_client import GRAPH_URL, GraphClient
from mailsync.settings import Settings

# account id → a GraphClient authenticated as that account (sessions are pooled by the factory).
ClientFactory = Callable[[str], GraphClient]


def graph_time(value: datetime) -> str:
    """Graph's DateTimeOffset form, in UTC."""
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_graph_time(value: Any) -> datetime:
    if not isinstance(value, str):
        raise MalformedResponse("subscription has no expirationDateTime")
    text = value.strip()
    # Graph writes up to seven fractional digits; Python reads at most six.
    head, dot, rest = text.partition(".")
    if dot:
        digits = "".join(ch for ch in rest if ch.isdigit())
        zone = rest[len(digits):]
        text = f"{head}.{digits[:6]}{zone}"
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError as exc:
        raise MalformedResponse("subscription expirationDateTime is not a date") from exc
    return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=UTC)


class GraphSubscriptionApi:
    """``SubscriptionApi`` over Graph's /subscriptions."""

    def __init__(self, client_for: ClientFactory) -> None:
        self._client_for = client_for

    def create(self, account_id: str, request: SubscriptionRequest) -> CreatedSubscription:
        body: dict[str, Any] = {
            "changeType": ",".join(ct.value for ct in request.change_types),
            "notificationUrl": request.notification_url,
            "lifecycleNotificationUrl": request.lifecycle_url,
            "resource": with_select(request.resource, request.resource_data),
            "expirationDateTime": graph_time(request.expires_at),
            "clientState": request.client_state,
        }
        if request.resource_data is not None:
            body.update(_certificate(request.resource_data), includeResourceData=True)
        answer = self._client_for(account_id).request("POST", "subscriptions", json_body=body)
        if not isinstance(answer, dict) or not isinstance(answer.get("id"), str) or not answer["id"]:
            raise MalformedResponse("Graph created a subscription without an id")
        return CreatedSubscription(subscription_id=answer["id"],
                                   expires_at=parse_graph_time(answer.get("expirationDateTime")))

    def renew(self, account_id: str, subscription_id: str, expires_at: datetime, *,
              resource_data: ResourceData | None = None) -> datetime:
        body: dict[str, Any] = {"expirationDateTime": graph_time(expires_at)}
        if resource_data is not None:
            body.update(_certificate(resource_data))
        answer = self._client_for(account_id).request(
            "PATCH", f"subscriptions/{quote(subscription_id, safe='')}", json_body=body)
        if isinstance(answer, dict) and "expirationDateTime" in answer:
            return parse_graph_time(answer["expirationDateTime"])
        return expires_at

    def delete(self, account_id: str, subscription_id: str) -> None:
        with contextlib.suppress(NotFound):  # already gone: the goal is reached
            self._client_for(account_id).request("DELETE", f"subscriptions/{quote(subscription_id, safe='')}")


def _certificate(data: ResourceData) -> dict[str, Any]:
    return {"encryptionCertificate": data.certificate, "encryptionCertificateId": data.certificate_id}


class GraphMessageLocator:
    """``MessageLocator``: one small GET per message (only ``parentFolderId``)."""

    def __init__(self, client_for: ClientFactory) -> None:
        self._client_for = client_for

    def parent_folders(self, account_id: str, message_ids: Sequence[str]) -> Mapping[str, str | None]:
        client = self._client_for(account_id)
        found: dict[str, str | None] = {}
        for message_id in message_ids:
            try:
                answer = client.get(f"me/messages/{quote(message_id, safe='')}",
                                    params={"$select": "parentFolderId"})
            except NotFound:
                found[message_id] = None  # deleted since: its old folder (if stored) is synced anyway
                continue
            folder = answer.get("parentFolderId") if isinstance(answer, dict) else None
            found[message_id] = folder if isinstance(folder, str) and folder else None
        return found


class AccountGraphClients:
    """``ClientFactory``: a GraphClient per account, all on one pooled session.

    Same base URL rule as the sync engine's provider: the sandbox's
    ``/v1.0`` when ``GRAPH_SANDBOX_URL`` is set, Graph's otherwise.
    """

    def __init__(self, settings: Settings, tokens: TokenProvider) -> None:
        self._tokens = tokens
        self._base_url = f"{settings.graph_sandbox_url}/v1.0" if settings.graph_sandbox_url else GRAPH_URL
        self._session = GraphClient.new_session(pool_size=16, settings=settings)

    def __call__(self, account_id: str) -> GraphClient:
        def token(force_refresh: bool) -> str:
            return self._tokens.access_token(account_id, force_refresh=force_refresh)

        return GraphClient(token, base_url=self._base_url, session=self._session)
