"""The add-account page links a Dovecot account, and the mail page follows its changes live.

The same stack as test_live_page.py (the devhost running every function and
serving ``static_web/``, Azurite, the store, Debian's Chromium) with Dovecot
instead of the Graph sandbox, and the IMAP listener
(``python -m mailsync.providers.imap_listener``) running beside the devhost
with the same app settings — what a deployment runs to see IMAP changes
within a second (the poll timer's STATUS poll would see them within a
minute). Changes are made by a second IMAP client, as another device would.
Waits are generous and nothing is timed.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from azure.core.exceptions import ResourceNotFoundError

from devhost.services.devhost_process import INHERITED_ENV
from devhost.services.process import ROOT, free_port, stop_process
from mailsync.settings import Settings
from mailsync.storage.connection import table_client
from tests.fixtures.devhost import DevhostProcess, start_devhost
from tests.fixtures.dovecot import DovecotServer, ImapUser, logged_in, rfc822
from tests.web.conftest import web_env
from tests.web.test_live_page import watch_problems

if TYPE_CHECKING:
    from playwright.sync_api import Page

pytestmark = pytest.mark.browser

SEEDED = 12
SYNC_TIMEOUT_MS = 60_000
CHANGE_TIMEOUT_MS = 30_000


@dataclass
class ImapStack:
    host: DevhostProcess
    listener: subprocess.Popen[bytes]
    listener_log: Path
    env: dict[str, str]

    @property
    def base_url(self) -> str:
        return self.host.base_url

    def wait_until_watched(self, account_id: str, timeout_s: float = 30.0) -> None:
        """Until the listener reports the account watched (its log line): changes from then on are seen."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if any("listener watching the account" in line and account_id in line
                   for line in self.listener_log.read_text(errors="replace").splitlines()):
                return
            assert self.listener.poll() is None, self.listener_log.read_text(errors="replace")[-3000:]
            time.sleep(0.1)
        raise AssertionError(f"the listener did not watch {account_id}:\n{self.listener_log.read_text()[-3000:]}")

    def linked_accounts(self) -> list[dict[str, Any]]:
        """Every account row (and credential row) in the accounts table."""
        try:
            return [dict(e) for e in table_client(Settings.from_env(self.env), "accounts").list_entities()]
        except ResourceNotFoundError:   # created on the first link
            return []


@pytest.fixture(scope="module")
def imap_stack(azurite: Any, search_store_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ImapStack]:
    port = free_port()
    env = web_env(connection_string=azurite.connection_string, search_store_url=search_store_url,
                  sandbox_url="", port=port, local_dir=tmp_path_factory.mktemp("local"),
                  IMAP_ALLOW_INSECURE="1", IMAP_TIMEOUT_S="10")
    del env["GRAPH_SANDBOX_URL"]   # no Outlook here
    log_dir = tmp_path_factory.mktemp("devhost")
    host = start_devhost(env, port=port, log_dir=log_dir)
    listener_env = {k: v for k, v in os.environ.items() if k in INHERITED_ENV}
    listener_env.update({"PYTHONUNBUFFERED": "1", "LOG_FORMAT": "json", **env})
    with (log_dir / "listener.log").open("wb") as log:
        # --refresh-s: how soon a newly linked account is watched (default 30 s).
        listener = subprocess.Popen([sys.executable, "-m", "mailsync.providers.imap_listener", "--refresh-s", "0.5"],
                                    cwd=ROOT, env=listener_env, stdout=log, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL)
    try:
        yield ImapStack(host, listener, log_dir / "listener.log", env)
    finally:
        stop_process(listener, grace_s=5)
        host.stop(timeout_s=15)


@pytest.fixture
def mailbox(dovecot_refusals: DovecotServer) -> ImapUser:
    """A seeded mailbox on the Dovecot meant for wrong passwords (its auth penalty stays there)."""
    user = dovecot_refusals.add_user()
    start = datetime.now(UTC) - timedelta(days=2)
    user.seed_maildir({"INBOX": [(rfc822(f"Seeded message {i}", sender=f"Sender {i} <s{i}@example.org>",
                                         date=start + timedelta(minutes=i)), "S" if i % 2 else "",
                                  start + timedelta(minutes=i)) for i in range(SEEDED)]})
    return user


def row_by_subject(page: Page, subject: str) -> Any:
    return page.locator("#message-list li.msg").filter(has=page.locator(".subject", has_text=subject))


def test_link_dovecot_from_the_page_and_follow_its_changes_live(imap_stack: ImapStack, mailbox: ImapUser,
                                                                browser_page: Page, artifacts: Path) -> None:
    from playwright.sync_api import expect

    page = browser_page
    problems = watch_problems(page, imap_stack.base_url)
    page.goto(f"{imap_stack.base_url}/index.html")
    expect(page.locator("#imap-section")).to_be_hidden()
    page.get_by_label("IMAP (Gmail, Fastmail, Dovecot…)").check()
    expect(page.locator("#outlook-section")).to_be_hidden()
    form = page.locator("#imap-form")
    expect(form.get_by_label("Port")).to_have_value("993")

    # -- keyboard only: an empty submit marks the fields and focuses the first ----------------------
    form.get_by_label("IMAP server").focus()
    page.keyboard.press("Enter")
    expect(form.get_by_label("IMAP server")).to_be_focused()
    expect(form.get_by_label("IMAP server")).to_have_attribute("aria-invalid", "true")
    expect(page.locator("#imap-password-error")).to_contain_text("Enter the password")

    # "no encryption" is offered because this devhost allows it (IMAP_ALLOW_INSECURE); 143 follows.
    expect(form.locator("#imap-security option[value='none']")).to_have_count(1)
    form.get_by_label("Security").select_option("none")
    expect(form.get_by_label("Port")).to_have_value("143")
    form.get_by_label("IMAP server").fill(mailbox.host)
    form.get_by_label("Port").fill(str(mailbox.port))
    form.get_by_label("User name or email address").fill(mailbox.username)
    form.get_by_label("Display name").fill("Dovecot on the page")

    # -- a wrong password: the server's reason next to the form, nothing linked, the rest kept -----
    wrong = "not-" + mailbox.password
    form.get_by_label("Password or app password").fill(wrong)
    form.get_by_label("Password or app password").press("Enter")
    error = page.locator("#imap-error")
    expect(error).to_contain_text("refused the user name or password", timeout=CHANGE_TIMEOUT_MS)
    expect(form.get_by_label("Password or app password")).to_have_value("")
    expect(form.get_by_label("Password or app password")).to_be_focused()
    expect(form.get_by_label("IMAP server")).to_have_value(mailbox.host)
    expect(form.get_by_label("User name or email address")).to_have_value(mailbox.username)
    expect(page.get_by_role("button", name="Link IMAP account")).to_be_enabled()
    assert imap_stack.linked_accounts() == []
    assert "/index.html" in page.url

    # -- the right one: linked, token kept for the tab, the mail page --------------------------------
    form.get_by_label("Password or app password").fill(mailbox.password)
    page.get_by_role("button", name="Link IMAP account").click()
    page.wait_for_url("**/data.html?account_id=*", timeout=CHANGE_TIMEOUT_MS)
    for where in (page.url, page.evaluate("JSON.stringify(localStorage)"),
                  page.evaluate("JSON.stringify(sessionStorage)"), imap_stack.host.logs()):
        assert mailbox.password not in where and wrong not in where
    expect(page.locator("#live-status")).to_have_attribute("data-state", "connected", timeout=30_000)
    expect(page.locator("#sync-phase")).to_have_attribute("data-phase", "synced", timeout=SYNC_TIMEOUT_MS)
    expect(page.locator("#account-address")).to_contain_text(mailbox.username)
    inbox = page.get_by_role("button", name=re.compile(r"^inbox: ", re.IGNORECASE))
    inbox.click()
    expect(inbox).to_have_attribute("aria-current", "true")
    expect(inbox).to_have_accessible_name(re.compile(rf": {SEEDED // 2} unread of {SEEDED}$"))
    rows = page.locator("#message-list li.msg")
    expect(rows).to_have_count(SEEDED, timeout=30_000)
    expect(rows.first.locator(".subject")).to_have_text(f"Seeded message {SEEDED - 1}")

    # -- another device changes the mailbox; each change shows without a reload ----------------------
    imap_stack.wait_until_watched(page.url.rsplit("account_id=", 1)[1])
    page.evaluate("document.body.dataset.marker = 'no reload'")
    unread = row_by_subject(page, "Seeded message 10")   # even: seeded unread
    expect(unread).to_have_attribute("data-read", "false")
    with logged_in(mailbox) as other:
        other.select_folder("INBOX")
        envelopes = other.fetch(other.search("ALL"), ["ENVELOPE"])
        by_subject = {data[b"ENVELOPE"].subject.decode(): uid for uid, data in envelopes.items()}
        other.add_flags([by_subject["Seeded message 10"]], [b"\\Seen"])
        expect(unread).to_have_attribute("data-read", "true", timeout=CHANGE_TIMEOUT_MS)

        other.move([by_subject["Seeded message 9"]], "Archive")
        expect(row_by_subject(page, "Seeded message 9")).to_have_count(0, timeout=CHANGE_TIMEOUT_MS)
        archive = page.get_by_role("button", name=re.compile(r"^archive: ", re.IGNORECASE))
        expect(archive).to_have_accessible_name(re.compile(r"of 1$"), timeout=CHANGE_TIMEOUT_MS)

        other.add_flags([by_subject["Seeded message 8"]], [b"\\Deleted"])
        other.uid_expunge([by_subject["Seeded message 8"]])
        expect(row_by_subject(page, "Seeded message 8")).to_have_count(0, timeout=CHANGE_TIMEOUT_MS)

        other.append("INBOX", rfc822("Fresh from another device", sender="Carol <carol@example.net>"))
        expect(rows.first.locator(".subject")).to_have_text("Fresh from another device", timeout=CHANGE_TIMEOUT_MS)
    expect(rows).to_have_count(SEEDED - 1)
    assert page.evaluate("document.body.dataset.marker") == "no reload"
    page.screenshot(path=str(artifacts / "data-page-imap.png"), full_page=True)

    # The one failed request is the refused login; nothing else went wrong on the pages.
    refused = [p for p in problems if p.startswith("HTTP 400") and p.endswith("/api/accounts")]
    logged = [p for p in problems if "status of 400" in p and "/api/accounts" in p]   # Chromium's console line
    assert len(refused) == 1 and [p for p in problems if p not in refused + logged] == [], problems
