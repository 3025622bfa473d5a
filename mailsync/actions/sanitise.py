"""Message HTML made safe to display: ``nh3`` (Python bindings of the Rust ``ammonia`` sanitiser).

Why a library and not our own filter: mail HTML is hostile input written
for parsers that forgive everything, and a hand-written tag filter is the
classic source of XSS (mutation XSS through parser differentials, ``<svg>``
and ``<math>`` namespace tricks, entity-encoded ``javascript:`` URLs).
ammonia parses with html5ever (the HTML5 algorithm browsers use) and
re-serialises an allow-list; nh3 is its maintained Python binding (used by
PyPI's readme renderer, which replaced bleach, now deprecated, with it).

What is kept: text formatting, tables, lists, links (``http``, ``https``,
``mailto``; ``rel="noopener noreferrer"`` added) and images. What goes:
scripts, styles elements, event handlers, forms, frames, ``style``
attributes (CSS can exfiltrate through ``url()``), and every URL scheme
but those. Remote images stay in the HTML with their ``src`` renamed to
``data-remote-src``: the page shows them only when the user asks (a remote
image is a read receipt for the sender); ``cid:`` images (inline
attachments) are rewritten to the attachment's download URL by the caller.
The page renders the result inside ``<iframe sandbox>`` with no scripts as
a second wall.
"""

from __future__ import annotations

import re

import nh3

TAGS = frozenset({
    "a", "abbr", "b", "blockquote", "br", "caption", "center", "code", "col", "colgroup", "dd", "del", "div", "dl",
    "dt", "em", "font", "h1", "h2", "h3", "h4", "h5", "h6", "hr", "i", "img", "ins", "kbd", "li", "ol", "p", "pre",
    "q", "s", "small", "span", "strike", "strong", "sub", "sup", "table", "tbody", "td", "tfoot", "th", "thead",
    "tr", "tt", "u", "ul",
})
ATTRIBUTES = {
    "*": {"align", "dir", "lang", "title"},
    "a": {"href", "name"},
    "img": {"src", "alt", "width", "height", "data-remote-src"},
    "td": {"colspan", "rowspan", "valign", "width"},
    "th": {"colspan", "rowspan", "valign", "width"},
    "table": {"border", "cellpadding", "cellspacing", "width"},
    "font": {"color", "face", "size"},
    "col": {"span", "width"},
}
_REMOTE_SRC = re.compile(r'(<img\b[^>]*?)\ssrc="(https?://[^"]*)"', re.IGNORECASE)


def sanitise_html(html: str) -> str:
    """The body's HTML with only the allow-listed tags and attributes; remote images parked in ``data-remote-src``."""
    cleaned = nh3.clean(html, tags=set(TAGS), attributes={k: set(v) for k, v in ATTRIBUTES.items()},
                        url_schemes={"http", "https", "mailto", "cid"}, link_rel="noopener noreferrer",
                        strip_comments=True)
    # After cleaning, attribute values are quoted with " and entity-encoded: the pattern sees canonical HTML.
    return _REMOTE_SRC.sub(r'\1 data-remote-src="\2"', cleaned)
