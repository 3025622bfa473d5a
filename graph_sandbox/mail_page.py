"""``/sandbox/mail``: a plain mailbox page, so a person can act "in Outlook".

Each sandbox user's folders and messages, with the actions a demo needs:
mark read/unread, flag/unflag, move, delete, and send new mail. Every action
runs the same mailbox operation, with the same validation, as the Graph
request that does it (``PATCH /messages/{id}``, ``POST .../move``,
``DELETE``, ``POST /sendMail``), so change notifications and delta see
exactly what they would see from a Graph client.

    GET  /sandbox/mail?user=&folder=&message=&page=   the page
    POST /sandbox/mail/action    user, folder, message, action[, destination]  -> 303 back
    POST /sandbox/mail/send      user, to, cc, subject, body                   -> 303 back

No JavaScript is needed; forms post and redirect back (post/redirect/get),
so a reload never repeats an action.
"""

from __future__ import annotations

import html
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlencode

from aiohttp import web

from graph_sandbox.mailbox import Folder, Mailbox, MailboxError, Message
from graph_sandbox.message_bodies import message_changes, new_message_fields

PAGE_SIZE = 50
ACTIONS = {
    "read": {"isRead": True},
    "unread": {"isRead": False},
    "flag": {"flag": {"flagStatus": "flagged"}},
    "unflag": {"flag": {"flagStatus": "notFlagged"}},
    "complete": {"flag": {"flagStatus": "complete"}},
}


class MailPage:
    """The sandbox's mailbox page (see the module docstring)."""

    def __init__(self, state: Any) -> None:
        self.state = state

    def routes(self) -> list[web.RouteDef]:
        return [
            web.get("/sandbox/mail", self.page),
            web.post("/sandbox/mail/action", self.action),
            web.post("/sandbox/mail/send", self.send),
        ]

    # -- lookups -----------------------------------------------------------------

    def _user(self, ref: str | None) -> Any:
        users = sorted(self.state.users.values(), key=lambda u: u.mail.lower())
        if not ref:
            return users[0]
        user = self.state.user(ref)
        if user is None:
            raise web.HTTPNotFound(text=f"No sandbox user {ref!r}.", content_type="text/plain")
        return user

    @staticmethod
    def _folder(box: Mailbox, ref: str | None) -> Folder:
        try:
            return box.folder(ref or "inbox")
        except MailboxError:
            return box.folder("inbox")

    # -- actions -------------------------------------------------------------------

    async def action(self, request: web.Request) -> web.Response:
        form = await request.post()
        user = self._user(str(form.get("user", "")))
        box = self.state.mailbox(user.id)
        folder = self._folder(box, str(form.get("folder", "")))
        action = str(form.get("action", ""))
        notice = error = None
        try:
            message = box.message(str(form.get("message", "")))
            if action in ACTIONS:
                # The body a Graph client would PATCH, through the API's own validation.
                changes = message_changes(ACTIONS[action], message, self.state.clock.time_ms())
                box.update_message(message, changes)
                notice = f"Marked {action}: {message.subject}"
            elif action == "move":
                destination = box.folder(str(form.get("destination", "")))
                box.move_message(message, destination.id)
                notice = f"Moved to {destination.display_name}: {message.subject}"
            elif action == "delete":
                box.delete_message(message)
                notice = f"Deleted: {message.subject}"
            else:
                error = f"Unknown action {action!r}."
        except MailboxError as exc:
            error = f"{exc.code}: {exc.message}"
        return self._back(user.id, folder.id, notice=notice, error=error, page=str(form.get("page", "")))

    async def send(self, request: web.Request) -> web.Response:
        form = await request.post()
        user = self._user(str(form.get("user", "")))
        box = self.state.mailbox(user.id)
        folder = self._folder(box, str(form.get("folder", "")))
        body = {
            "subject": str(form.get("subject", "")),
            "body": {"contentType": "text", "content": str(form.get("body", ""))},
            "toRecipients": _recipients(str(form.get("to", ""))),
            "ccRecipients": _recipients(str(form.get("cc", ""))),
        }
        try:
            fields = new_message_fields(body, box)
            if not (fields["to"] or fields["cc"]):
                raise MailboxError(400, "ErrorInvalidRecipients",
                                   "At least one recipient is required, but none were found.")
            self.state.mailboxes.send_mail(box, fields, save_to_sent=True)
        except MailboxError as exc:
            return self._back(user.id, folder.id, error=f"{exc.code}: {exc.message}")
        return self._back(user.id, folder.id, notice=f"Sent: {body['subject'] or '(no subject)'}")

    @staticmethod
    def _back(user_id: str, folder_id: str, *, notice: str | None = None, error: str | None = None,
              page: str = "") -> web.Response:
        query = {"user": user_id, "folder": folder_id}
        if page and page != "1":
            query["page"] = page
        if notice:
            query["notice"] = notice
        if error:
            query["error"] = error
        return web.Response(status=303, headers={"Location": "/sandbox/mail?" + urlencode(query)})

    # -- the page ----------------------------------------------------------------------

    async def page(self, request: web.Request) -> web.Response:
        q = request.query
        user = self._user(q.get("user"))
        box = self.state.mailbox(user.id)
        folder = self._folder(box, q.get("folder"))
        try:
            page_no = max(1, int(q.get("page", "1")))
        except ValueError:
            page_no = 1
        messages = box.messages_newest_first(folder.id)
        pages = max(1, -(-len(messages) // PAGE_SIZE))
        page_no = min(page_no, pages)
        shown = messages[(page_no - 1) * PAGE_SIZE: page_no * PAGE_SIZE]
        selected = None
        if q.get("message"):
            selected = box.by_rest.get(q["message"]) or box.by_immutable.get(q["message"])

        parts = [
            self._header(user, q.get("notice"), q.get("error")),
            "<div class='cols'>",
            f"<nav>{self._folders(box, user.id, folder.id)}</nav>",
            "<section>",
            f"<h2>{html.escape(folder.display_name)} <small>{len(messages)} messages, {folder.unread} unread"
            "</small></h2>",
            self._table(box, user.id, folder, shown, page_no),
            self._pager(user.id, folder.id, page_no, pages),
            self._message(box, selected) if selected is not None else "",
            self._compose(user, folder.id),
            "</section></div>",
        ]
        return web.Response(text=_PAGE.format(title=f"{user.display_name} - Sandbox mail", body="".join(parts)),
                            content_type="text/html", headers={"Cache-Control": "no-store"})

    def _header(self, user: Any, notice: str | None, error: str | None) -> str:
        options = "".join(
            f"<option value='{html.escape(u.id)}'{' selected' if u.id == user.id else ''}>"
            f"{html.escape(u.display_name)} &lt;{html.escape(u.mail)}&gt;</option>"
            for u in sorted(self.state.users.values(), key=lambda u: u.mail.lower()))
        banner = ""
        if notice:
            banner += f"<p class='notice' role='status'>{html.escape(notice)}</p>"
        if error:
            banner += f"<p class='error' role='alert'>{html.escape(error)}</p>"
        return ("<header><b>Graph sandbox mail</b>"
                "<form method='GET' action='/sandbox/mail'><label>Mailbox "
                f"<select name='user' onchange='this.form.submit()'>{options}</select></label>"
                "<button type='submit'>Open</button></form>"
                f"<a href='/sandbox/mail?user={html.escape(user.id)}'>Refresh</a></header>{banner}")

    def _folders(self, box: Mailbox, user_id: str, current: str) -> str:
        def tree(parent_id: str) -> str:
            items = []
            for child in box.child_folders(parent_id):
                link = "/sandbox/mail?" + urlencode({"user": user_id, "folder": child.id})
                unread = f" <b>{child.unread}</b>" if child.unread else ""
                cls = " class='current'" if child.id == current else ""
                sub = tree(child.id) if child.children else ""
                items.append(f"<li><a{cls} href='{html.escape(link)}'>{html.escape(child.display_name)}</a>"
                             f"{unread}{sub}</li>")
            return f"<ul>{''.join(items)}</ul>" if items else ""
        return tree(box.root_id)

    def _table(self, box: Mailbox, user_id: str, folder: Folder, shown: list[Message], page_no: int) -> str:
        if not shown:
            return "<p class='empty'>No messages in this folder.</p>"
        targets = [f for f in box.all_folders() if f.id != folder.id and f.search is None]
        rows = []
        for m in shown:
            sender = (m.from_ or m.sender or {}).get("emailAddress", {})
            who = sender.get("name") or sender.get("address") or "(unknown)"
            flag = m.flag.get("flagStatus", "notFlagged")
            open_link = "/sandbox/mail?" + urlencode({"user": user_id, "folder": folder.id, "message": m.rest_id,
                                                      "page": page_no})
            hidden = (f"<input type='hidden' name='user' value='{html.escape(user_id)}'>"
                      f"<input type='hidden' name='folder' value='{html.escape(folder.id)}'>"
                      f"<input type='hidden' name='message' value='{html.escape(m.rest_id)}'>"
                      f"<input type='hidden' name='page' value='{page_no}'>")
            mark = {"flagged": "&#9873;", "complete": "&#10003;"}.get(flag, "")
            toggle_read = ("unread", "Mark unread") if m.is_read else ("read", "Mark read")
            toggle_flag = ("unflag", "Unflag") if flag == "flagged" else ("flag", "Flag")
            moves = "".join(f"<option value='{html.escape(f.id)}'>{html.escape(f.display_name)}</option>"
                            for f in targets)
            rows.append(
                f"<tr class='{'read' if m.is_read else 'unread'}' data-id='{html.escape(m.rest_id)}'>"
                f"<td class='flag'>{mark}</td>"
                f"<td>{html.escape(who)}</td>"
                f"<td><a href='{html.escape(open_link)}'>{html.escape(m.subject or '(no subject)')}</a></td>"
                f"<td class='when'>{_when(m.received_ms)}</td>"
                f"<td class='acts'><form method='POST' action='/sandbox/mail/action'>{hidden}"
                f"<button name='action' value='{toggle_read[0]}'>{toggle_read[1]}</button>"
                f"<button name='action' value='{toggle_flag[0]}'>{toggle_flag[1]}</button>"
                f"<button name='action' value='delete'>Delete</button>"
                f"<select name='destination' aria-label='Move to'>{moves}</select>"
                "<button name='action' value='move'>Move</button></form></td></tr>")
        return ("<table><thead><tr><th></th><th>From</th><th>Subject</th><th>Received</th><th></th></tr></thead>"
                f"<tbody>{''.join(rows)}</tbody></table>")

    @staticmethod
    def _pager(user_id: str, folder_id: str, page_no: int, pages: int) -> str:
        if pages <= 1:
            return ""
        def link(n: int, text: str) -> str:
            href = "/sandbox/mail?" + urlencode({"user": user_id, "folder": folder_id, "page": n})
            return f"<a href='{html.escape(href)}'>{text}</a>"
        prev = link(page_no - 1, "&larr; Newer") if page_no > 1 else ""
        nxt = link(page_no + 1, "Older &rarr;") if page_no < pages else ""
        return f"<p class='pager'>{prev} page {page_no} of {pages} {nxt}</p>"

    @staticmethod
    def _message(box: Mailbox, m: Message) -> str:
        content, _ = box.body_of(m)
        sender = (m.from_ or m.sender or {}).get("emailAddress", {})
        to = ", ".join(r["emailAddress"]["address"] for r in m.to)
        body = (f"<iframe sandbox title='Message body' srcdoc='{html.escape(content, quote=True)}'></iframe>"
                if m.body_type == "html" else f"<pre>{html.escape(content)}</pre>")
        return (f"<article><h3>{html.escape(m.subject or '(no subject)')}</h3>"
                f"<p class='meta'>From {html.escape(sender.get('name', ''))} "
                f"&lt;{html.escape(sender.get('address', ''))}&gt; to {html.escape(to)} &middot; "
                f"{_when(m.received_ms)}</p>{body}</article>")

    def _compose(self, user: Any, folder_id: str) -> str:
        others = "".join(f"<option value='{html.escape(u.mail)}'>" for u in self.state.users.values()
                         if u.id != user.id)
        return ("<details class='compose'><summary>New message</summary>"
                "<form method='POST' action='/sandbox/mail/send'>"
                f"<input type='hidden' name='user' value='{html.escape(user.id)}'>"
                f"<input type='hidden' name='folder' value='{html.escape(folder_id)}'>"
                "<label>To <input name='to' list='people' required placeholder='someone@example.com, ...'></label>"
                "<label>Cc <input name='cc' list='people'></label>"
                "<label>Subject <input name='subject'></label>"
                "<label>Body <textarea name='body' rows='6'></textarea></label>"
                f"<datalist id='people'>{others}</datalist>"
                "<button type='submit'>Send</button></form></details>")


def _recipients(raw: str) -> list[dict[str, Any]]:
    addresses = [a.strip() for a in raw.replace(";", ",").split(",") if a.strip()]
    return [{"emailAddress": {"address": a}} for a in addresses]


def _when(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, tz=UTC).strftime("%Y-%m-%d %H:%M")


_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title}</title>
<style>
body{{font-family:system-ui,"Segoe UI",sans-serif;margin:0;color:#222;background:#fafafa}}
header{{display:flex;gap:16px;align-items:center;padding:8px 16px;background:#0f6cbd;color:#fff}}
header form{{margin:0}} header a{{color:#fff}}
.cols{{display:flex;gap:16px;padding:12px 16px}} nav{{min-width:200px}} section{{flex:1;min-width:0}}
nav ul{{list-style:none;padding-left:12px;margin:0}} nav>ul{{padding-left:0}} nav li{{margin:3px 0}}
nav a{{text-decoration:none;color:#0f6cbd}} nav a.current{{font-weight:700;color:#000}}
table{{width:100%;border-collapse:collapse;background:#fff}}
td,th{{padding:4px 6px;border-bottom:1px solid #e5e5e5;text-align:left;vertical-align:middle;font-size:14px}}
tr.unread td{{font-weight:600}} tr.unread td.flag{{border-left:3px solid #0f6cbd}}
td.flag{{width:18px;color:#c50f1f}} td.when{{white-space:nowrap;color:#555}}
td.acts form{{display:flex;gap:4px;flex-wrap:wrap;margin:0}} td.acts button,td.acts select{{font-size:12px}}
.notice{{background:#dff6dd;padding:6px 16px;margin:0}} .error{{background:#fde7e9;padding:6px 16px;margin:0}}
article{{background:#fff;margin-top:12px;padding:8px 12px;border:1px solid #ddd}}
article iframe{{width:100%;height:260px;border:0}} .meta{{color:#555;font-size:13px}}
.compose{{margin-top:12px}} .compose form{{display:grid;gap:6px;max-width:640px}}
.compose input,.compose textarea{{width:100%;font:inherit}} small{{color:#666;font-weight:400}}
</style></head><body>{body}</body></html>
"""
