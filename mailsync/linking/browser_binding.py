"""Binding a sign-in to the browser that started it: the defence against login CSRF.

Without it, the OAuth ``state`` proves only that *some* browser holds a
sign-in link mailsync made. An attacker could create an account, keep its
access token, and forward the ``authorize_url`` to a victim: the victim
signs in at the genuine Microsoft page and the callback links the
*victim's* mailbox to the *attacker's* account.

So ``POST /api/accounts`` (and a re-link) also hands the browser a cookie
holding a random nonce, and the pending sign-in records the nonce's
SHA-256. The callback is a top-level navigation back to our own origin,
which carries the cookie (``SameSite=Lax`` sends cookies on top-level
GETs); a forwarded link opened in another browser has no such cookie, and
the callback refuses it before anything is read from the identity platform.

The cookie:

- ``HttpOnly`` (page script never needs it), ``SameSite=Lax``, ``Path=/``,
  and ``Secure`` whenever ``PUBLIC_BASE_URL`` is https;
- lives as long as a pending sign-in (10 minutes), refreshed at each start;
- keeps its nonce across starts from the same browser (a well-formed cookie
  is reused), so two tabs linking two mailboxes at once both complete.

No ``__Host-`` prefix: Azure Static Web Apps has been reported to add a
``Domain`` attribute to cookies its linked backend sets
(Azure/static-web-apps#636), and browsers drop a ``__Host-`` cookie that has
one, which would make every sign-in fail. docs/security.md says what this
leaves open (a sibling sub-domain planting the cookie) and why it is small.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import timedelta

from mailsync.security.secrets import hash_secret, new_secret

COOKIE_NAME = "mailsync-signin"
NONCE_BYTES = 32
# base64url of 32 random bytes, no padding: exactly what new_secret() makes.
_NONCE = re.compile(r"^[A-Za-z0-9_-]{43}$")


@dataclass(frozen=True)
class BrowserBinding:
    """Issues, reads and checks the sign-in cookie."""

    secure: bool
    max_age: timedelta

    @classmethod
    def for_base_url(cls, public_base_url: str, max_age: timedelta) -> BrowserBinding:
        """Secure cookies exactly when the app is served over https (``PUBLIC_BASE_URL``)."""
        return cls(secure=public_base_url.lower().startswith("https://"), max_age=max_age)

    @staticmethod
    def nonce_from(cookie_header: str | None) -> str | None:
        """The well-formed sign-in nonce in a ``Cookie`` header, or None.

        Browsers send one ``Cookie`` header joined by ``; ``; a proxy that
        merged several joins them with ``, `` (the devhost does): both
        separate here, and neither can occur inside a nonce.
        """
        if not cookie_header:
            return None
        for part in re.split(r"[;,]", cookie_header):
            name, sep, value = part.strip().partition("=")
            if sep and name == COOKIE_NAME and _NONCE.match(value.strip()):
                return value.strip()
        return None

    @staticmethod
    def issue(existing: str | None) -> str:
        """The nonce to bind the next sign-in to: the browser's current one if it has one."""
        if existing is not None and _NONCE.match(existing):
            return existing
        return new_secret(NONCE_BYTES)

    def set_cookie(self, nonce: str) -> str:
        """The ``Set-Cookie`` header value that hands ``nonce`` to the browser."""
        attributes = [f"{COOKIE_NAME}={nonce}", "Path=/", f"Max-Age={int(self.max_age.total_seconds())}",
                      "HttpOnly", "SameSite=Lax"]
        if self.secure:
            attributes.append("Secure")
        return "; ".join(attributes)

    @staticmethod
    def digest(nonce: str) -> str:
        """What the pending sign-in stores (never the nonce itself)."""
        return hash_secret(nonce)
