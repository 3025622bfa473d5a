"""Where the OAuth callback may send the browser back to: an allow-list, no open redirect.

A return URL is accepted only when it is an absolute ``http(s)`` URL whose
origin (scheme, host, port) equals an allow-list entry's, and whose path is
inside that entry's path. Everything that browsers or URL parsers read
differently is refused outright rather than normalised: user-info
(``https://ok@evil``), backslashes, control characters and whitespace,
protocol-relative and relative URLs, other schemes.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from urllib.parse import SplitResult, parse_qsl, urlencode, urlsplit, urlunsplit

from mailsync.errors import ConfigurationError, InputError

MAX_URL_LENGTH = 2048
DEFAULT_PAGE = "/data.html"


def _origin(parts: SplitResult) -> tuple[str, str, int]:
    scheme = parts.scheme.lower()
    port = parts.port or (443 if scheme == "https" else 80)
    return scheme, (parts.hostname or "").lower(), port


def _split_strict(url: str) -> SplitResult:
    if not url or len(url) > MAX_URL_LENGTH:
        raise InputError("return_url is empty or too long", code="invalid_return_url")
    if any(c in url for c in "\\ \t\r\n") or any(ord(c) < 0x20 or ord(c) == 0x7F for c in url):
        raise InputError("return_url contains characters that are not allowed", code="invalid_return_url")
    try:
        parts = urlsplit(url)
        _ = parts.port  # raises ValueError for a malformed port
    except ValueError as exc:
        raise InputError("return_url is not a valid URL", code="invalid_return_url") from exc
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
        raise InputError("return_url must be an absolute http(s) URL", code="invalid_return_url")
    if parts.username is not None or parts.password is not None or "@" in parts.netloc:
        raise InputError("return_url must not contain user information", code="invalid_return_url")
    return parts


class ReturnUrlPolicy:
    """The allow-list of return URLs, and the default one (the data page)."""

    def __init__(self, allowlist: Iterable[str], default_url: str) -> None:
        self._allowed: list[tuple[tuple[str, str, int], str]] = []
        for entry in allowlist:
            try:
                parts = _split_strict(entry)
            except InputError as exc:
                raise ConfigurationError(f"RETURN_URL_ALLOWLIST entry {entry!r} is not an http(s) origin") from exc
            self._allowed.append((_origin(parts), parts.path.rstrip("/")))
        if not self._allowed:
            raise ConfigurationError("RETURN_URL_ALLOWLIST is empty")
        self.default_url = self.check(default_url)

    @classmethod
    def from_base(cls, allowlist: Iterable[str], public_base_url: str) -> ReturnUrlPolicy:
        return cls(allowlist, public_base_url.rstrip("/") + DEFAULT_PAGE)

    def check(self, url: str | None) -> str:
        """``url`` if allowed (the default when None/empty); InputError (400) otherwise."""
        if url is None or url == "":
            return self.default_url
        if not isinstance(url, str):
            raise InputError("return_url must be a string", code="invalid_return_url")
        parts = _split_strict(url)
        origin = _origin(parts)
        path = parts.path or "/"
        for allowed_origin, allowed_path in self._allowed:
            if origin == allowed_origin and (not allowed_path or path == allowed_path
                                             or path.startswith(allowed_path + "/")):
                return url
        raise InputError("return_url is not on the allow-list", code="invalid_return_url")


def with_params(url: str, params: Mapping[str, str]) -> str:
    """``url`` with ``params`` added to its query (replacing same-named ones); fragment kept."""
    parts = urlsplit(url)
    query = [(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True) if k not in params]
    query.extend(params.items())
    return urlunsplit((parts.scheme, parts.netloc, parts.path, urlencode(query), parts.fragment))
