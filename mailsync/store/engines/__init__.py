"""The search engines the store speaks to, one module each, and the choice between them.

``SEARCH_ENGINE`` (``Settings.search_engine``) names the engine:
``opensearch``, ``elasticsearch``, or ``auto`` (the default), which asks
the server once: ``GET /`` answers ``version.distribution: "opensearch"``
on OpenSearch (and osmem-server); Elasticsearch sends no distribution.
Only the chosen engine's client is imported.
"""

from __future__ import annotations

import base64
import json
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

from mailsync.errors import ConfigurationError, StoreError, StoreUnavailable
from mailsync.settings import Settings
from mailsync.store.engine import SearchEngine

ENGINES = ("opensearch", "elasticsearch")
AUTO = "auto"
# Straight to the server, as both clients go (they ignore HTTP_PROXY too).
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def connect(url: str, *, engine: str = AUTO, api_key: str | None = None, plain_json: bool = True,
            request_timeout_s: float = 30.0, pool_size: int = 10) -> SearchEngine:
    """A client for the search server at ``url``, for the named ``engine`` (``auto``: ask the server).

    Raises StoreUnavailable when ``auto`` cannot reach the server, StoreError
    when it answers as neither engine, ConfigurationError for a setting
    the engine cannot use.
    """
    url = url.rstrip("/")
    if engine == AUTO:
        engine = detect(url, api_key=api_key, timeout_s=min(request_timeout_s, 10.0))
    if engine == "opensearch":
        if api_key:
            raise ConfigurationError("ELASTICSEARCH_API_KEY is an Elasticsearch API key; for a secured "
                                     "OpenSearch cluster put user:password in ELASTICSEARCH_URL")
        from mailsync.store.engines.opensearch import OpenSearchEngine

        return OpenSearchEngine.connect(url, request_timeout_s=request_timeout_s, pool_size=pool_size)
    if engine == "elasticsearch":
        from mailsync.store.engines.elasticsearch import ElasticsearchEngine

        return ElasticsearchEngine.connect(url, api_key=api_key, plain_json=plain_json,
                                           request_timeout_s=request_timeout_s)
    raise ConfigurationError(f"SEARCH_ENGINE must be one of {AUTO}, {', '.join(ENGINES)}; got {engine!r}")


def connect_from_settings(settings: Settings, *, request_timeout_s: float = 30.0) -> SearchEngine:
    """:func:`connect` with ELASTICSEARCH_URL, SEARCH_ENGINE, ELASTICSEARCH_API_KEY and _PLAIN_JSON."""
    if not settings.elasticsearch_url:
        raise ConfigurationError("ELASTICSEARCH_URL is not set")
    return connect(settings.elasticsearch_url, engine=settings.search_engine,
                   api_key=settings.elasticsearch_api_key, plain_json=settings.elasticsearch_plain_json,
                   request_timeout_s=request_timeout_s)


def detect(url: str, *, api_key: str | None = None, timeout_s: float = 10.0) -> str:
    """``opensearch`` or ``elasticsearch``, from the server's ``GET /``.

    Plain HTTP from the standard library, so the probe needs neither
    client (and neither client's own checks get in the way of asking).
    """
    info = _server_info(url, api_key=api_key, timeout_s=timeout_s)
    version = info.get("version")
    if not isinstance(version, dict) or "number" not in version:
        raise StoreError(f"the server at {_safe(url)} does not answer GET / like a search engine")
    distribution = str(version.get("distribution") or "").lower()
    if distribution == "opensearch":
        return "opensearch"
    if not distribution:   # Elasticsearch has no distribution field (it has build_flavor)
        return "elasticsearch"
    raise StoreError(f"the server at {_safe(url)} is {distribution} {version.get('number')}, "
                     f"which the store does not speak (set SEARCH_ENGINE to one of {', '.join(ENGINES)})")


def _server_info(url: str, *, api_key: str | None, timeout_s: float) -> dict[str, Any]:
    parts = urllib.parse.urlsplit(url)
    headers = {"Accept": "application/json"}
    if api_key:
        headers["Authorization"] = f"ApiKey {api_key}"
    elif parts.username is not None:
        user_pass = f"{urllib.parse.unquote(parts.username)}:{urllib.parse.unquote(parts.password or '')}"
        headers["Authorization"] = "Basic " + base64.b64encode(user_pass.encode()).decode()
    bare = _safe(url).rstrip("/") + "/"
    request = urllib.request.Request(bare, headers=headers)
    try:
        with _OPENER.open(request, timeout=timeout_s) as response:
            body = json.loads(response.read())
    except urllib.error.HTTPError as exc:
        if exc.code in (429, 502, 503, 504):
            raise StoreUnavailable(f"the search store at {_safe(url)} answered {exc.code}", retry_after_s=5.0) \
                from exc
        raise StoreError(f"the search store at {_safe(url)} answered GET / with {exc.code}") from exc
    except (urllib.error.URLError, OSError) as exc:
        raise StoreUnavailable(f"the search store at {_safe(url)} is unreachable ({exc})", retry_after_s=5.0) \
            from exc
    except ValueError as exc:
        raise StoreError(f"the search store at {_safe(url)} answered GET / with something not JSON") from exc
    if not isinstance(body, dict):
        raise StoreError(f"the search store at {_safe(url)} answered GET / with something not an object")
    return body


def _safe(url: str) -> str:
    """``url`` without credentials (for messages, and for the probe, which sends them as a header)."""
    parts = urllib.parse.urlsplit(url)
    return urllib.parse.urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))
