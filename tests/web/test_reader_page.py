"""The reading pane and the actions in a real browser, on Outlook (the Graph sandbox) and IMAP (Dovecot).

The whole stack runs (devhost with every function, Azurite, the store,
Debian's Chromium). Each action is made on the page, and the test checks
the provider itself has it — Graph's answer, or a second IMAP connection —
not only the page. Waits are generous and nothing is timed.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from devhost.services.process import free_port
from graph_sandbox.config import SandboxConfig
from tests.fixtures.devhost import DevhostProcess, start_devhost
from tests.fixtures.dovecot import DovecotServer, ImapUser, logged_in, rfc822
from tests.fixtures.graph_sandbox import SandboxTestServer, start_sandbox
from tests.web.conftest import web_env
from tests.web.test_live_page import watch_problems

if TYPE_CHECKING:
    from playwright.sync_api import Page

pytestmark = pytest.mark.browser

SYNC_TIMEOUT_MS = 120_000
WAIT_MS = 30_000


def eventually(check: Callable[[], bool], what: str, timeout_s: float = 30.0) -> None:
    """Poll the provider until ``check`` holds (the page's change reaches it through the queue)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.2)
    raise AssertionError(f"the provider never had it: {what}")


def row(page: Page, message_id: str) -> Any:
    return page.locator(f"#message-list li.msg[data-message-id='{message_id}']")


@pytest.fixture(scope="module")
def outlook_stack(azurite: Any, search_store_url: str,
                  tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[DevhostProcess, SandboxTestServer]]:
    sandbox = start_sandbox(SandboxConfig(seed=17, users=1, messages_per_user=40))
    port = free_port()
    env = web_env(connection_string=azurite.connection_string, search_store_url=search_store_url,
                  sandbox_url=sandbox.base_url, port=port, local_dir=tmp_path_factory.mktemp("local"))
    host = start_devhost(env, port=port, log_dir=tmp_path_factory.mktemp("devhost"))
    try:
        yield host, sandbox
    finally:
        host.stop(timeout_s=15)
        sandbox.stop()


def test_read_and_act_on_outlook(outlook_stack: tuple[DevhostProcess, SandboxTestServer], browser_page: Page,
                                 artifacts: Path) -> None:
    from playwright.sync_api import expect

    host, sandbox = outlook_stack
    page = browser_page
    problems = watch_problems(page, host.base_url)
    user = sandbox.users[0]
    graph = sandbox.graph(user.mail)
    inbox_id = graph.get("me/mailFolders/inbox").json()["id"]
    archive_id = graph.get("me/mailFolders/archive").json()["id"]
    deleted_id = graph.get("me/mailFolders/deleteditems").json()["id"]
    # A message with attachments in the Inbox, unread (moved there before linking if the seed put none).
    rich = graph.get("me/messages", params={"$filter": "hasAttachments eq true", "$top": "1",
                                             "$select": "id,subject"}).json()["value"][0]
    graph.post(f"me/messages/{rich['id']}/move", json={"destinationId": inbox_id})
    graph.patch(f"me/messages/{rich['id']}", json={"isRead": False})

    page.goto(f"{host.base_url}/index.html")
    page.get_by_role("button", name="Connect Outlook").click()
    page.wait_for_url(f"{sandbox.base_url}/**")
    page.locator(f"button.user[value='{user.user_principal_name}']").click()
    expect(page.locator("#account-state")).to_have_attribute("data-state", "synced", timeout=SYNC_TIMEOUT_MS)
    page.get_by_role("link", name="Open the mail page").click()
    expect(page.locator("#live-status")).to_have_attribute("data-state", "connected", timeout=WAIT_MS)
    page.get_by_role("button", name=re.compile(r"^Inbox: ")).click()
    expect(row(page, rich["id"])).to_have_count(1, timeout=WAIT_MS)
    # Live rows arrive out of order (an action's row from the API, a delta page's from a worker, either
    # late): one older than what the list shows does not undo it; one as new does apply.
    shown = page.evaluate("id => window.Mailsync.list.row(id)", rich["id"])
    assert isinstance(shown["version"], int)
    page.evaluate("row => window.Mailsync.list.apply({upserted: [{...row, is_read: !row.is_read, "
                  "version: row.version - 1}]})", shown)
    expect(row(page, rich["id"])).to_have_attribute("data-read", str(shown["is_read"]).lower())
    page.evaluate("row => window.Mailsync.list.apply({upserted: [row]})", shown)

    def message(mid: str) -> dict[str, Any]:
        return graph.get(f"me/messages/{mid}", params={"$select": "isRead,flag,parentFolderId"}).json()

    # -- open: headers, the sanitised body in a sandboxed frame, attachments; opening marks read ----
    row(page, rich["id"]).locator(".subject").click()
    reader = page.locator("#reader")
    expect(reader).to_be_visible(timeout=WAIT_MS)
    expect(page.locator("#reader-subject")).to_have_text(rich["subject"])
    frame = page.locator("#reader-body")
    expect(frame).to_have_attribute("sandbox", "")
    assert "<script" not in (frame.get_attribute("srcdoc") or "")
    expect(page.frame_locator("#reader-body").locator("p").first).to_be_visible()
    attachments = page.locator("#reader-attachments li button")
    expect(attachments.first).to_be_visible()
    with page.expect_download() as download:
        attachments.first.click()
    assert Path(download.value.path()).stat().st_size > 0
    expect(row(page, rich["id"])).to_have_attribute("data-read", "true")
    eventually(lambda: message(rich["id"])["isRead"] is True, "opened message read")

    # -- flag from the reader, then with the keyboard (s) unflag -------------------------------------
    page.locator("#reader-flag").click()
    expect(row(page, rich["id"])).to_have_attribute("data-flag", "flagged")
    eventually(lambda: message(rich["id"])["flag"]["flagStatus"] == "flagged", "flagged")
    row(page, rich["id"]).focus()
    page.keyboard.press("s")
    expect(row(page, rich["id"])).to_have_attribute("data-flag", "notFlagged")
    eventually(lambda: message(rich["id"])["flag"]["flagStatus"] == "notFlagged", "unflagged by key")

    # -- move from the reader: the row leaves the Inbox at once; Outlook has it in Archive -------------
    page.locator("#reader-folder").select_option(archive_id)
    page.locator("#reader-move").click()
    expect(row(page, rich["id"])).to_have_count(0)
    eventually(lambda: message(rich["id"])["parentFolderId"] == archive_id, "moved to Archive")

    # -- selected rows: mark unread, then delete (to Deleted Items) -----------------------------------
    rows = page.locator("#message-list li.msg")
    ids = [rows.nth(i).get_attribute("data-message-id") for i in range(2)]
    for mid in ids:
        row(page, mid).locator(".select").check()
    expect(page.locator("#selected-count")).to_have_text("2 selected")
    page.locator("#bulk [data-bulk='unread']").click()
    for mid in ids:
        expect(row(page, mid)).to_have_attribute("data-read", "false")
    eventually(lambda: all(message(m)["isRead"] is False for m in ids), "bulk unread")
    page.locator("#bulk [data-bulk='delete']").click()
    for mid in ids:
        expect(row(page, mid)).to_have_count(0)
    eventually(lambda: all(message(m)["parentFolderId"] == deleted_id for m in ids), "bulk delete")
    page.screenshot(path=str(artifacts / "data-page-reader.png"), full_page=True)
    assert problems == [], problems


# --- IMAP ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def imap_host(azurite: Any, search_store_url: str,
              tmp_path_factory: pytest.TempPathFactory) -> Iterator[DevhostProcess]:
    port = free_port()
    env = web_env(connection_string=azurite.connection_string, search_store_url=search_store_url,
                  sandbox_url="", port=port, local_dir=tmp_path_factory.mktemp("local"),
                  IMAP_ALLOW_INSECURE="1", IMAP_TIMEOUT_S="10")
    del env["GRAPH_SANDBOX_URL"]
    host = start_devhost(env, port=port, log_dir=tmp_path_factory.mktemp("devhost"))
    try:
        yield host
    finally:
        host.stop(timeout_s=15)


@pytest.fixture
def imap_user(dovecot: DovecotServer) -> ImapUser:
    user = dovecot.add_user()
    start = datetime.now(UTC) - timedelta(days=1)
    user.seed_maildir({"INBOX": [(rfc822(f"Imap message {i}", sender=f"Sender {i} <s{i}@example.org>",
                                         date=start + timedelta(minutes=i)), "", start + timedelta(minutes=i))
                                 for i in range(6)], "Archive": [], "Trash": []})
    return user


def _flags(user: ImapUser) -> dict[str, tuple[str, set[bytes]]]:
    found: dict[str, tuple[str, set[bytes]]] = {}
    with logged_in(user) as client:
        for folder in ("INBOX", "Archive", "Trash"):
            client.select_folder(folder, readonly=True)
            uids = client.search("ALL")
            for data in client.fetch(uids, ["ENVELOPE", "FLAGS"]).values() if uids else ():
                found[data[b"ENVELOPE"].subject.decode()] = (folder, set(data[b"FLAGS"]))
    return found


def test_read_and_act_on_imap(imap_host: DevhostProcess, imap_user: ImapUser, browser_page: Page) -> None:
    from playwright.sync_api import expect

    page = browser_page
    problems = watch_problems(page, imap_host.base_url)
    page.goto(f"{imap_host.base_url}/index.html")
    page.get_by_label("IMAP (Gmail, Fastmail, Dovecot…)").check()
    form = page.locator("#imap-form")
    form.get_by_label("Security").select_option("none")
    form.get_by_label("IMAP server").fill(imap_user.host)
    form.get_by_label("Port").fill(str(imap_user.port))
    form.get_by_label("User name or email address").fill(imap_user.username)
    form.get_by_label("Password or app password").fill(imap_user.password)
    page.get_by_role("button", name="Link IMAP account").click()
    page.wait_for_url("**/data.html?account_id=*", timeout=WAIT_MS)
    expect(page.locator("#sync-phase")).to_have_attribute("data-phase", "synced", timeout=SYNC_TIMEOUT_MS)
    page.get_by_role("button", name=re.compile(r"^inbox: ", re.IGNORECASE)).click()
    rows = page.locator("#message-list li.msg")
    expect(rows).to_have_count(6, timeout=WAIT_MS)

    def subject_row(subject: str) -> Any:
        return page.locator("#message-list li.msg", has=page.locator(".subject", has_text=subject))

    # Open (marks read at the server), flag by key, move from the reader.
    subject_row("Imap message 5").locator(".subject").click()
    expect(page.locator("#reader-subject")).to_have_text("Imap message 5", timeout=WAIT_MS)
    expect(page.frame_locator("#reader-body").locator("pre")).to_contain_text("Hello.")
    eventually(lambda: b"\\Seen" in _flags(imap_user)["Imap message 5"][1], "opened message \\Seen")
    subject_row("Imap message 5").focus()
    page.keyboard.press("s")
    eventually(lambda: b"\\Flagged" in _flags(imap_user)["Imap message 5"][1], "\\Flagged by key")
    page.locator("#reader-folder").select_option("Archive")
    page.locator("#reader-move").click()
    expect(subject_row("Imap message 5")).to_have_count(0)
    eventually(lambda: _flags(imap_user)["Imap message 5"][0] == "Archive", "moved to Archive")

    # Selected rows: delete goes to Trash.
    for subject in ("Imap message 4", "Imap message 3"):
        subject_row(subject).locator(".select").check()
    page.locator("#bulk [data-bulk='delete']").click()
    expect(rows).to_have_count(3)
    eventually(lambda: all(_flags(imap_user)[s][0] == "Trash" for s in ("Imap message 4", "Imap message 3")),
               "deleted to Trash")
    assert problems == [], problems
