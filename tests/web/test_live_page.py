"""The live page in a real browser: link a sandbox account, watch it sync, watch Outlook changes arrive.

Everything is real: the devhost runs every function (linking, the sync
worker on Azurite's queue, the webhook the sandbox notifies, negotiate, the
read API) and serves ``static_web/``; Debian's Chromium runs the pages with
the unmodified ``@microsoft/signalr`` browser bundle; the sign-in is the
sandbox's own page. Changes are made through Graph, as Outlook would, and
must show on the open mail page without a reload. Waits are generous and
nothing is timed.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from devhost.services.process import free_port
from graph_sandbox.config import SandboxConfig
from tests.fixtures.devhost import DevhostProcess, start_devhost
from tests.fixtures.graph_sandbox import SandboxTestServer, start_sandbox
from tests.web.conftest import web_env

if TYPE_CHECKING:
    from playwright.sync_api import Page

MESSAGES_PER_USER = 160
SYNC_TIMEOUT_MS = 180_000
CHANGE_TIMEOUT_MS = 45_000
PAGE_SIZE = 50


@dataclass
class LiveStack:
    host: DevhostProcess
    sandbox: SandboxTestServer

    @property
    def base_url(self) -> str:
        return self.host.base_url


@pytest.fixture(scope="module")
def live(azurite: Any, search_store_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveStack]:
    sandbox = start_sandbox(SandboxConfig(seed=31, users=2, messages_per_user=MESSAGES_PER_USER))
    port = free_port()
    env = web_env(connection_string=azurite.connection_string, search_store_url=search_store_url,
                  sandbox_url=sandbox.base_url, port=port, local_dir=tmp_path_factory.mktemp("local"),
                  GRAPH_PAGE_SIZE="40")   # several pages per folder: progress has steps to show
    host = start_devhost(env, port=port, log_dir=tmp_path_factory.mktemp("devhost"))
    try:
        yield LiveStack(host, sandbox)
    finally:
        host.stop(timeout_s=15)
        sandbox.stop()


def newest_first(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The store's order: received time, newest first; ties by id, descending."""
    return sorted(messages, key=lambda m: (m["receivedDateTime"], m["id"]), reverse=True)


def shown_rows(page: Page) -> list[dict[str, str]]:
    rows: list[dict[str, str]] = page.eval_on_selector_all("#message-list li.msg", """nodes => nodes.map(n => ({
        id: n.dataset.messageId, folder: n.dataset.folderId, read: n.dataset.read, flag: n.dataset.flag,
        subject: n.querySelector('.subject').textContent, name: n.querySelector('.name').textContent,
        addr: (n.querySelector('.addr') || {}).textContent || ''}))""")
    return rows


def row(page: Page, message_id: str) -> Any:
    return page.locator(f"#message-list li.msg[data-message-id='{message_id}']")


def test_link_sync_and_follow_outlook_changes_live(live: LiveStack, browser_page: Page, artifacts: Path) -> None:
    from playwright.sync_api import expect

    page = browser_page
    problems: list[str] = []
    page.on("pageerror", lambda error: problems.append(f"page error: {error}"))
    page.on("console", lambda message: problems.append(f"console: {message.text} at {message.location.get('url')}")
            if message.type == "error" and message.location.get("url", "").startswith(live.base_url) else None)
    page.on("response", lambda response: problems.append(f"HTTP {response.status}: {response.url}")
            if response.status >= 400 else None)
    user = live.sandbox.users[0]

    # -- add-account page: sandbox note, Connect Outlook, the sandbox's real sign-in page ----------
    page.goto(f"{live.base_url}/index.html")
    note = page.locator("#sandbox-note")
    expect(note).to_be_visible()
    expect(note.get_by_role("link", name="sandbox mailbox page")).to_have_attribute(
        "href", f"{live.sandbox.base_url}/sandbox/mail")
    page.get_by_role("button", name="Connect Outlook").click()
    page.wait_for_url(f"{live.sandbox.base_url}/**")
    page.locator(f"button.user[value='{user.user_principal_name}']").click()
    page.wait_for_url(re.compile(re.escape(f"{live.base_url}/index.html?account_id=") + r"\w+"))

    state = page.locator("#account-state")
    expect(state).to_have_attribute("data-state", re.compile("^(connected|syncing|synced)$"), timeout=30_000)
    expect(state).to_contain_text(user.mail)
    expect(state).to_have_attribute("data-state", "synced", timeout=SYNC_TIMEOUT_MS)
    expect(page.locator(".steps li[data-step='synced']")).to_have_class(re.compile(r"\bdone\b"))
    page.screenshot(path=str(artifacts / "add-account-page.png"), full_page=True)

    # -- mail page: live channel up, phase synced, the inbox equal to the sandbox's ----------------
    page.get_by_role("link", name="Open the mail page").click()
    page.wait_for_url(re.compile(r"/data\.html\?account_id=\w+"))
    expect(page.locator("#live-status")).to_have_attribute("data-state", "connected", timeout=30_000)
    expect(page.locator("#sync-phase")).to_have_attribute("data-phase", "synced", timeout=60_000)
    expect(page.locator("#account-address")).to_contain_text(user.mail)

    snapshot = live.sandbox.snapshot(user.mail)
    folders = {f["wellKnownName"]: f for f in snapshot["folders"] if f["wellKnownName"]}
    inbox_id, archive_id = folders["inbox"]["id"], folders["archive"]["id"]
    inbox = newest_first([m for m in snapshot["messages"] if m["folderId"] == inbox_id])
    assert len(inbox) > PAGE_SIZE, "the sandbox inbox should need more than one page"
    page.get_by_role("button", name=re.compile(r"^Inbox: ")).click()
    expect(page.get_by_role("button", name=re.compile(r"^Inbox: "))).to_have_attribute("aria-current", "true")
    inbox_unread = sum(1 for m in inbox if not m["isRead"])
    expect(page.get_by_role("button", name=re.compile(r"^Inbox: "))).to_have_accessible_name(
        f"Inbox: {inbox_unread} unread of {len(inbox)}")
    expected = inbox[:PAGE_SIZE]
    page.wait_for_function(
        "ids => [...document.querySelectorAll('#message-list li.msg')].map(n => n.dataset.messageId).join() === ids",
        arg=",".join(m["id"] for m in expected), timeout=30_000)
    rows = shown_rows(page)
    for shown, truth in zip(rows, expected, strict=True):
        assert shown["subject"] == (truth["subject"] or "(no subject)")
        assert shown["name"] == (truth["from"]["name"] or truth["from"]["address"])
        assert shown["addr"] == f"<{truth['from']['address']}>"
        assert shown["read"] == str(truth["isRead"]).lower() and shown["flag"] == truth["flagStatus"]
    expect(page.get_by_role("button", name="Older")).to_be_enabled()

    # -- changes in "Outlook" (Graph) show up without a reload -----------------------------------
    page.evaluate("window.__sameDocument = 'yes'")
    graph = live.sandbox.graph(user.mail)
    unread = next(m for m in expected if not m["isRead"])
    to_move, to_delete = [m for m in expected if m["id"] != unread["id"]][:2]

    assert graph.patch(f"me/messages/{unread['id']}", json={"isRead": True}).ok
    expect(row(page, unread["id"])).to_have_attribute("data-read", "true", timeout=CHANGE_TIMEOUT_MS)

    assert graph.post(f"me/messages/{to_move['id']}/move", json={"destinationId": archive_id}).ok
    expect(row(page, to_move["id"])).to_have_count(0, timeout=CHANGE_TIMEOUT_MS)

    assert graph.delete(f"me/messages/{to_delete['id']}").status_code == 204
    expect(row(page, to_delete["id"])).to_have_count(0, timeout=CHANGE_TIMEOUT_MS)

    subject = f"Live page check {uuid.uuid4().hex[:8]}"
    sent = graph.post("me/sendMail", json={"message": {
        "subject": subject, "body": {"contentType": "Text", "content": "sent by the browser test"},
        "toRecipients": [{"emailAddress": {"address": user.mail}}]}})
    assert sent.status_code == 202, sent.text
    new_row = page.locator("#message-list li.msg", has_text=subject)
    expect(new_row).to_have_count(1, timeout=CHANGE_TIMEOUT_MS)
    expect(new_row).to_have_attribute("data-read", "false")
    expect(page.locator("#message-list li.msg").first).to_contain_text(subject)   # newest, so first

    # The folder counts follow too: one unread fewer, one more; two gone, one new.
    expect(page.get_by_role("button", name=re.compile(r"^Inbox: "))).to_have_accessible_name(
        f"Inbox: {inbox_unread - 1 - sum(not m['isRead'] for m in (to_move, to_delete)) + 1} unread "
        f"of {len(inbox) - 2 + 1}", timeout=CHANGE_TIMEOUT_MS)
    assert page.evaluate("window.__sameDocument") == "yes", "the page was reloaded"

    page.screenshot(path=str(artifacts / "data-page.png"), full_page=True)
    page.set_viewport_size({"width": 400, "height": 900})
    page.screenshot(path=str(artifacts / "data-page-narrow.png"), full_page=True)
    assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth"), "wider than a narrow window"
    assert not problems, problems

