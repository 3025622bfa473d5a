"""A refused Storage request as the azure-core exception the SDK raises for it.

The table and queue adapters of ``mailsync.storage`` already catch the few
answers that mean something to them (exists, not found, changed) as
azure-core exceptions and map the rest to ``mailsync.errors`` in one place
(``table_errors``, ``AzureJobQueue``); raising the same classes here keeps
that single mapping, and tests hold these to the SDK's (status and error
code included).

Which class: by the service's error code first (the SDK's own lists:
``UpdateConditionNotSatisfied`` is a 412 that means "changed", a 409
``EntityAlreadyExists`` "exists"), then by status.
"""

from __future__ import annotations

import re
from html import unescape

import orjson
from azure.core.exceptions import (
    ClientAuthenticationError,
    HttpResponseError,
    ResourceExistsError,
    ResourceModifiedError,
    ResourceNotFoundError,
    ServiceRequestError,
    ServiceResponseError,
)

from mailsync.keepalive_http import ConnectionFailed, Response

_CHANGED = {"ConditionNotMet", "UpdateConditionNotSatisfied"}
_AUTH = {"InvalidAuthenticationInfo", "AuthenticationFailed"}
_NOT_FOUND = {"ResourceNotFound", "TableNotFound", "EntityNotFound", "QueueNotFound", "MessageNotFound"}
_EXISTS = {"ResourceAlreadyExists", "TableAlreadyExists", "AccountAlreadyExists", "EntityAlreadyExists",
           "QueueAlreadyExists"}
_BY_STATUS: dict[int, type[HttpResponseError]] = {401: ClientAuthenticationError, 404: ResourceNotFoundError,
                                                   409: ResourceExistsError, 412: ResourceModifiedError}
_XML_FIELD = re.compile(rb"<(Code|Message)>(.*?)</\1>", re.DOTALL)


def refusal(response: Response, doing: str) -> HttpResponseError:
    """The exception for a non-success ``response`` to ``doing`` ("inserting the entity")."""
    code, message = error_details(response)
    if code in _CHANGED:
        kind: type[HttpResponseError] = ResourceModifiedError
    elif code in _AUTH:
        kind = ClientAuthenticationError
    elif code in _NOT_FOUND:
        kind = ResourceNotFoundError
    elif code in _EXISTS:
        kind = ResourceExistsError
    else:
        kind = _BY_STATUS.get(response.status, HttpResponseError)
    error = kind(message=f"{doing}: {response.status} {code or ''} {message}".rstrip())
    error.status_code = response.status
    error.error_code = code or None   # type: ignore[attr-defined]
    error.reason = None
    return error


def error_details(response: Response) -> tuple[str, str]:
    """The service's error code and message: the ``x-ms-error-code`` header, the JSON (Tables) or XML body."""
    code = response.headers.get("x-ms-error-code", "")
    message = ""
    body = response.body.strip()
    if body.startswith(b"{"):
        try:
            error = orjson.loads(body).get("odata.error") or {}
            code = str(error.get("code") or code)
            text = error.get("message")
            message = str(text.get("value") if isinstance(text, dict) else text or "")
        except (orjson.JSONDecodeError, AttributeError):
            pass
    elif body.startswith(b"<"):
        for name, value in _XML_FIELD.findall(body):
            text = unescape(value.decode("utf-8", "replace")).strip()
            if name == b"Code":
                code = text
            else:
                message = text
    return code, message


def unreachable(exc: ConnectionFailed, doing: str) -> ServiceRequestError | ServiceResponseError:
    """A request that failed on the wire, as azure-core's transport reports it (an ``AzureError``)."""
    kind = ServiceResponseError if exc.timed_out else ServiceRequestError
    return kind(f"{doing}: {exc}", error=exc)
