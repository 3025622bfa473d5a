"""How fast the Graph sandbox serves message delta (prints figures; asserts nothing about speed).

    .venv/bin/python -m bench.sandbox_delta [--messages 100000] [--users 1] [--page 500] [--clients 1]

Starts an in-process sandbox, takes a delegated token per user through the
sandbox identity platform, and pages every folder's delta with ``$select``
(what a sync engine asks for) and without it (full messages). Several
clients page different mailboxes at once to show the server's ceiling.
"""

from __future__ import annotations

import argparse
import time
from concurrent.futures import ThreadPoolExecutor

import orjson
import requests

from graph_sandbox import SandboxConfig
from graph_sandbox.server import SandboxServer
from tests.graph_sandbox.signin import user_tokens

SELECT = "subject,from,toRecipients,ccRecipients,receivedDateTime,sentDateTime,lastModifiedDateTime,isRead,flag," \
         "importance,categories,hasAttachments,conversationId,internetMessageId,bodyPreview,parentFolderId,isDraft"


def page_mailbox(base_url: str, token: str, folders: list[str], page: int, select: str | None) -> tuple[int, int]:
    session = requests.Session()
    session.headers.update({"Authorization": f"Bearer {token}",
                            "Prefer": f'IdType="ImmutableId", odata.maxpagesize={page}'})
    messages = pages = 0
    for folder in folders:
        url = f"{base_url}/v1.0/me/mailFolders/{folder}/messages/delta" + (f"?$select={select}" if select else "")
        while url:
            response = session.get(url, timeout=60)
            response.raise_for_status()
            body = orjson.loads(response.content)
            messages += len(body["value"])
            pages += 1
            url = body.get("@odata.nextLink")
    return messages, pages


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--messages", type=int, default=100_000, help="messages per user")
    parser.add_argument("--users", type=int, default=1)
    parser.add_argument("--page", type=int, default=500)
    parser.add_argument("--clients", type=int, default=1, help="mailboxes paged at once")
    args = parser.parse_args()
    started = time.perf_counter()
    server = SandboxServer(SandboxConfig(users=args.users, messages_per_user=args.messages,
                                         rate_limit_requests=10**9))
    base_url = server.start()
    print(f"sandbox up with {args.users} x {args.messages} messages in {time.perf_counter() - started:.1f} s")
    users = sorted(server.state.users.values(), key=lambda u: u.index)[: max(1, args.clients)]
    tokens = [str(user_tokens(base_url, u.mail, scope="Mail.ReadWrite User.Read")[0]["access_token"]) for u in users]
    for label, select in (("$select", SELECT), ("full", None)):
        started = time.perf_counter()
        jobs = [(tok, [f.id for f in server.state.mailbox(u.id).all_folders()]) for u, tok in zip(users, tokens,
                                                                                                   strict=True)]
        with ThreadPoolExecutor(max_workers=len(users)) as pool:
            results = list(pool.map(lambda job, sel=select: page_mailbox(base_url, job[0], job[1], args.page, sel),
                                    jobs))
        elapsed = time.perf_counter() - started
        messages, pages = sum(r[0] for r in results), sum(r[1] for r in results)
        print(f"{label:8} {messages} messages, {pages} pages of <= {args.page} in {elapsed:.1f} s: "
              f"{pages / elapsed:.1f} pages/s, {messages / elapsed:,.0f} messages/s ({len(users)} client(s))")
    server.stop()


if __name__ == "__main__":
    main()
