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
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import requests

from devhost.services.process import free_port
from graph_sandbox.config import SandboxConfig
from tests.fixtures.devhost import DevhostProcess, start_devhost
from tests.fixtures.graph_sandbox import SandboxTestServer, start_sandbox
from tests.linking.browser import submit_sign_in
from tests.web.conftest import web_env

if TYPE_CHECKING:
    from playwright.sync_api import Page

pytestmark = pytest.mark.browser

MESSAGES_PER_USER = 160
SYNC_TIMEOUT_MS = 180_000
CHANGE_TIMEOUT_MS = 45_000
PAGE_SIZE = 50


@dataclass
class LiveStack:
    host: DevhostProcess
    sandbox: SandboxTestServer
    env: dict[str, str]
    port: int
    log_dir: Path

    @property
    def base_url(self) -> str:
        return self.host.base_url

    def restart(self, between: Callable[[], None]) -> None:
        """Stop the devhost (gracefully, as Ctrl-C), run ``between``, start it again on the same port."""
        self.host.stop(timeout_s=15)
        between()
        self.host = start_devhost(self.env, port=self.port, log_dir=self.log_dir)

    def link(self, index: int) -> tuple[str, str]:
        """Link sandbox user ``index`` over HTTP, as the pages would: (account_id, access token)."""
        browser = requests.Session()   # keeps the sign-in cookie for the callback
        created = browser.post(f"{self.base_url}/api/accounts", json={"provider": "outlook"}, timeout=30)
        assert created.status_code == 201, created.text
        body = created.json()
        location = submit_sign_in(body["authorize_url"], self.sandbox.users[index].user_principal_name)
        assert browser.get(location, allow_redirects=False, timeout=30).status_code == 302
        return body["account_id"], body["access_token"]


@pytest.fixture(scope="module")
def live(azurite: Any, search_store_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveStack]:
    sandbox = start_sandbox(SandboxConfig(seed=31, users=3, messages_per_user=MESSAGES_PER_USER))
    port = free_port()
    env = web_env(connection_string=azurite.connection_string, search_store_url=search_store_url,
                  sandbox_url=sandbox.base_url, port=port, local_dir=tmp_path_factory.mktemp("local"),
                  GRAPH_PAGE_SIZE="40")   # several pages per folder: progress has steps to show
    log_dir = tmp_path_factory.mktemp("devhost")
    stack = LiveStack(start_devhost(env, port=port, log_dir=log_dir), sandbox, env, port, log_dir)
    try:
        yield stack
    finally:
        stack.host.stop(timeout_s=15)
        sandbox.stop()


def watch_problems(page: Page, base_url: str) -> list[str]:
    """Script errors, console errors of our pages, and failed requests, collected while the test runs."""
    problems: list[str] = []
    page.on("pageerror", lambda error: problems.append(f"page error: {error}"))
    page.on("console", lambda message: problems.append(f"console: {message.text} at {message.location.get('url')}")
            if message.type == "error" and message.location.get("url", "").startswith(base_url) else None)
    page.on("response", lambda response: problems.append(f"HTTP {response.status}: {response.url}")
            if response.status >= 400 else None)
    return problems


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
    problems = watch_problems(page, live.base_url)
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

    # Paging: the next page is the sandbox's next 50, and back.
    page.get_by_role("button", name="Older").click()
    page.wait_for_function(
        "ids => [...document.querySelectorAll('#message-list li.msg')].map(n => n.dataset.messageId).join() === ids",
        arg=",".join(m["id"] for m in inbox[PAGE_SIZE:2 * PAGE_SIZE]), timeout=30_000)
    expect(page.locator("#page-label")).to_have_text("Page 2")
    page.get_by_role("button", name="Newer").click()
    expect(page.locator("#message-list li.msg").first).to_have_attribute("data-message-id", expected[0]["id"])
    expect(page.get_by_role("button", name="Newer")).to_be_disabled()

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

    # A folder renamed in Outlook is renamed on the page: the me/mailFolders subscription's
    # notification, one folder-list round, the progress event on the live channel (no poll, no reload).
    renamed = next(f for f in snapshot["folders"] if not f["wellKnownName"] and not f["isHidden"])
    new_name = f"Renamed {uuid.uuid4().hex[:6]}"
    assert graph.patch(f"me/mailFolders/{renamed['id']}", json={"displayName": new_name}).ok
    expect(page.locator(f"#folder-list button[data-folder-id='{renamed['id']}'] .name")).to_have_text(
        new_name, timeout=CHANGE_TIMEOUT_MS)
    assert page.evaluate("window.__sameDocument") == "yes", "the page was reloaded"

    # The search box finds the new message (the server searches), and clearing it brings the folder back.
    page.get_by_label("Search mail").fill(subject)
    page.get_by_label("Search mail").press("Enter")
    expect(page.locator("#message-list li.msg")).to_have_count(1)
    expect(page.locator("#message-list li.msg")).to_contain_text(subject)
    page.get_by_label("Search mail").fill("")
    page.get_by_role("button", name="Search").click()
    expect(page.locator("#message-list li.msg")).to_have_count(PAGE_SIZE)

    page.evaluate("window.scrollTo(0, 0)")
    page.screenshot(path=str(artifacts / "data-page.png"))    # the first screen (docs/screenshot-data-page.png)
    page.screenshot(path=str(artifacts / "data-page-full.png"), full_page=True)
    page.set_viewport_size({"width": 400, "height": 900})
    page.screenshot(path=str(artifacts / "data-page-narrow.png"), full_page=True)
    assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth"), "wider than a narrow window"
    assert not problems, problems


def test_a_cancelled_sign_in_reads_as_such_and_retry_signs_in_again(live: LiveStack, browser_page: Page) -> None:
    from playwright.sync_api import expect

    page = browser_page
    problems = watch_problems(page, live.base_url)
    user = live.sandbox.users[1]
    page.goto(f"{live.base_url}/index.html")
    page.get_by_role("button", name="Connect Outlook").click()
    page.wait_for_url(f"{live.sandbox.base_url}/**")
    page.get_by_role("button", name="Cancel").click()
    page.wait_for_url(re.compile(r"/index\.html\?account_id=\w+.*error=access_denied"))
    expect(page.locator("#account-state")).to_have_attribute("data-state", "error")
    expect(page.locator("#account-error")).to_contain_text("cancelled")
    expect(page.locator(".steps li[data-step='linking']")).to_have_class(re.compile(r"\bfailed\b"))
    account_id = page.evaluate("new URLSearchParams(location.search).get('account_id')")

    page.get_by_role("button", name="Try again").click()
    page.wait_for_url(f"{live.sandbox.base_url}/**")
    page.locator(f"button.user[value='{user.user_principal_name}']").click()
    page.wait_for_url(re.compile(re.escape(f"{live.base_url}/index.html?account_id={account_id}")))
    state = page.locator("#account-state")
    expect(state).to_have_attribute("data-state", re.compile("^(connected|syncing|synced)$"), timeout=30_000)
    expect(state).to_contain_text(user.mail)
    expect(page.locator("#account-error")).to_be_hidden()
    assert not problems, problems


def test_the_live_channel_reconnects_after_the_host_restarts(live: LiveStack, browser_page: Page) -> None:
    from playwright.sync_api import expect

    page = browser_page
    account_id, token = live.link(2)
    user = live.sandbox.users[2]
    page.goto(f"{live.base_url}/index.html")
    page.evaluate("([id, token]) => sessionStorage.setItem('mailsync.tokens', JSON.stringify({[id]: token}))",
                  [account_id, token])
    page.goto(f"{live.base_url}/data.html?account_id={account_id}")
    live_status = page.locator("#live-status")
    expect(live_status).to_have_attribute("data-state", "connected", timeout=30_000)
    expect(page.locator("#sync-phase")).to_have_attribute("data-phase", "synced", timeout=SYNC_TIMEOUT_MS)
    page.evaluate("window.__sameDocument = 'yes'")

    def while_down() -> None:
        expect(live_status).to_have_attribute("data-state", re.compile("^(reconnecting|disconnected)$"),
                                              timeout=30_000)

    live.restart(while_down)
    expect(live_status).to_have_attribute("data-state", "connected", timeout=60_000)

    newest = page.locator("#message-list li.msg").first
    message_id = newest.get_attribute("data-message-id")
    read = newest.get_attribute("data-read") == "true"
    graph = live.sandbox.graph(user.mail)
    assert graph.patch(f"me/messages/{message_id}", json={"isRead": not read}).ok
    expect(row(page, str(message_id))).to_have_attribute("data-read", str(not read).lower(),
                                                         timeout=CHANGE_TIMEOUT_MS)
    assert page.evaluate("window.__sameDocument") == "yes", "the page was reloaded"
