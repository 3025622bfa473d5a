"""Where a Storage account's services are and how each request is authorised.

Three ways, as the SDK clients (and the Functions host) take them:

* **Shared Key** (a connection string with ``AccountKey``: Azurite, or an
  account key). Microsoft's "Authorize with Shared Key" defines two strings
  to sign, one per service family, each HMAC-SHA256'd with the decoded key:

  - Table service: ``VERB \\n Content-MD5 \\n Content-Type \\n Date \\n
    CanonicalizedResource``, where Date is the ``x-ms-date`` header's value
    and the resource is ``/<account><the request's encoded path>``, plus
    ``?comp=<value>`` when the query has ``comp`` (nothing else of the
    query is signed).
  - Queue (and Blob, File) service, version 2009-09-19 and later: ``VERB``
    then Content-Encoding, Content-Language, Content-Length (empty when 0,
    since 2015-02-21), Content-MD5, Content-Type, Date, If-Modified-Since,
    If-Match, If-None-Match, If-Unmodified-Since and Range, one line each,
    then every ``x-ms-`` header as ``name:value\\n`` (lower-cased, sorted),
    then ``/<account><path>`` and each query parameter as
    ``\\n<name>:<value>`` (names lower-cased and sorted, values decoded).

  The header is ``Authorization: SharedKey <account>:<base64 signature>``.
  Against the emulator the path starts with the account name again
  (``/devstoreaccount1/devstoreaccount1/...``): it is part of the URL's path.
* **SAS** (``SharedAccessSignature=`` in the connection string): the token
  is appended to every request's query; nothing is signed here.
* **Microsoft Entra ID** (``AzureWebJobsStorage__accountName``): a bearer
  token for ``https://storage.azure.com/.default`` from the managed
  identity, kept until five minutes before it expires (the SDK's bearer
  policy does the same).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from email.utils import formatdate
from typing import Protocol
from urllib.parse import urlsplit

from mailsync.errors import ConfigurationError
from mailsync.keepalive_http import Origin

STORAGE_SCOPE = "https://storage.azure.com/.default"
TOKEN_REFRESH_MARGIN_S = 300

# Azurite's well-known development account (UseDevelopmentStorage=true), as documented for the emulator.
DEV_ACCOUNT = "devstoreaccount1"
DEV_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
DEV_ENDPOINTS = {"queue": "http://127.0.0.1:10001/devstoreaccount1", "table": "http://127.0.0.1:10002/devstoreaccount1"}

_QUEUE_SIGNED = ("content-encoding", "content-language", "content-length", "content-md5", "content-type", "date",
                 "if-modified-since", "if-match", "if-none-match", "if-unmodified-since", "range")


class TokenSource(Protocol):
    """What ``azure.identity`` credentials offer: ``get_token(scope)`` with ``.token`` and ``.expires_on``."""

    def get_token(self, *scopes: str) -> object: ...


@dataclass(frozen=True)
class Endpoint:
    """A service's base URL split into where to connect and the path every request starts with."""

    origin: Origin
    path: str          # "" for Azure, "/devstoreaccount1" for the emulator

    @classmethod
    def parse(cls, url: str) -> Endpoint:
        parts = urlsplit(url.rstrip("/"))
        origin = Origin.of(parts)
        if origin is None:
            raise ConfigurationError(f"storage endpoint {url!r} is not an http(s) URL")
        return cls(origin, parts.path)

    @property
    def url(self) -> str:
        return f"{self.origin.scheme}://{self.origin.host_header}{self.path}"


class Authorizer:
    """Adds a request's authorization: a header, a query suffix, or both."""

    def __init__(self, account: str, *, key: bytes | None = None, sas: str | None = None,
                 credential: TokenSource | None = None) -> None:
        if sum(x is not None for x in (key, sas, credential)) != 1:
            raise ValueError("exactly one of an account key, a SAS token or a credential")
        self.account = account
        self._key = key
        self.sas = sas.lstrip("?") if sas else None
        self._credential = credential
        self._token: tuple[str, float] | None = None
        self._lock = threading.Lock()
        self._date: tuple[int, str] = (0, "")

    def headers(self, service: str, method: str, path: str, query: Mapping[str, str],
                headers: dict[str, str]) -> None:
        """Sign into ``headers`` (with ``x-ms-date`` set) for ``service`` ("table" or "queue")."""
        headers["x-ms-date"] = self._now()
        if self._key is not None:
            text = (_table_string if service == "table" else _queue_string)(self.account, method, path, query,
                                                                            headers)
            digest = hmac.new(self._key, text.encode("utf-8"), hashlib.sha256).digest()
            headers["Authorization"] = f"SharedKey {self.account}:{base64.b64encode(digest).decode()}"
        elif self._credential is not None:
            headers["Authorization"] = f"Bearer {self._bearer()}"

    def _now(self) -> str:
        """Now as an RFC 1123 date, formatted once a second (``formatdate`` is a few µs a call)."""
        second = int(time.time())
        cached = self._date
        if cached[0] != second:
            cached = (second, formatdate(second, usegmt=True))
            self._date = cached   # a tuple swap: any thread may refresh it, all write the same value
        return cached[1]

    def _bearer(self) -> str:
        with self._lock:
            if self._token is None or self._token[1] - time.time() < TOKEN_REFRESH_MARGIN_S:
                assert self._credential is not None
                token = self._credential.get_token(STORAGE_SCOPE)
                self._token = (str(token.token), float(token.expires_on))   # type: ignore[attr-defined]
            return self._token[0]


def _table_string(account: str, method: str, path: str, query: Mapping[str, str], headers: Mapping[str, str]) -> str:
    resource = f"/{account}{path}"
    if "comp" in query:
        resource += f"?comp={query['comp']}"
    return (f"{method}\n{headers.get('Content-MD5', '')}\n{headers.get('Content-Type', '')}\n"
            f"{headers['x-ms-date']}\n{resource}")


def _queue_string(account: str, method: str, path: str, query: Mapping[str, str], headers: Mapping[str, str]) -> str:
    lower = {name.lower(): value for name, value in headers.items()}
    if lower.get("content-length") == "0":
        lower.pop("content-length")
    lines = [method, *(lower.get(name, "") for name in _QUEUE_SIGNED)]
    canonical_headers = "".join(f"{name}:{lower[name].strip()}\n" for name in sorted(lower) if name.startswith("x-ms-"))
    # The query's values as they are, not URL-encoded (the canonical form decodes them).
    resource = f"/{account}{path}" + "".join(f"\n{name.lower()}:{query[name]}" for name in sorted(query))
    return "\n".join(lines) + "\n" + canonical_headers + resource


@dataclass(frozen=True)
class StorageAccount:
    """A storage account's Table and Queue endpoints and how to authorise requests to them."""

    table: Endpoint
    queue: Endpoint
    auth: Authorizer

    @classmethod
    def from_connection_string(cls, text: str) -> StorageAccount:
        """Parse ``AzureWebJobsStorage``'s connection string (or ``UseDevelopmentStorage=true``)."""
        fields: dict[str, str] = {}
        for part in text.strip().split(";"):
            if part.strip():
                name, sep, value = part.partition("=")
                if not sep:
                    raise ConfigurationError("the storage connection string has a part without '='")
                fields[name.strip().lower()] = value.strip()
        if fields.get("usedevelopmentstorage", "").lower() == "true":
            return cls(Endpoint.parse(DEV_ENDPOINTS["table"]), Endpoint.parse(DEV_ENDPOINTS["queue"]),
                       Authorizer(DEV_ACCOUNT, key=base64.b64decode(DEV_KEY)))
        account = fields.get("accountname", "")
        protocol = fields.get("defaultendpointsprotocol", "https")
        suffix = fields.get("endpointsuffix", "core.windows.net")
        endpoints = {}
        for service in ("table", "queue"):
            url = fields.get(f"{service}endpoint") or (account and f"{protocol}://{account}.{service}.{suffix}")
            if not url:
                raise ConfigurationError(f"the storage connection string names no account and no {service} endpoint")
            endpoints[service] = Endpoint.parse(url)
        if not account:   # a SAS connection string may give endpoints only; the account is their host's first label
            account = endpoints["table"].origin.host.split(".")[0]
        if "accountkey" in fields:
            try:
                key = base64.b64decode(fields["accountkey"], validate=True)
            except ValueError as exc:
                raise ConfigurationError("the storage connection string's AccountKey is not base64") from exc
            auth = Authorizer(account, key=key)
        elif "sharedaccesssignature" in fields:
            auth = Authorizer(account, sas=fields["sharedaccesssignature"])
        else:
            raise ConfigurationError("the storage connection string has neither AccountKey nor SharedAccessSignature")
        return cls(endpoints["table"], endpoints["queue"], auth)

    @classmethod
    def from_identity(cls, account: str, credential: TokenSource) -> StorageAccount:
        """An account reached with a managed identity's bearer tokens (``AzureWebJobsStorage__accountName``)."""
        return cls(Endpoint.parse(f"https://{account}.table.core.windows.net"),
                   Endpoint.parse(f"https://{account}.queue.core.windows.net"),
                   Authorizer(account, credential=credential))
