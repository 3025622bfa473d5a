"""The sandbox's /v1.0 mail API over HTTP: users, folders, messages, sendMail, errors."""

from __future__ import annotations

from datetime import datetime

import pytest
import requests

from tests.fixtures.graph_sandbox import SandboxTestServer


@pytest.fixture
def sandbox(sandbox_factory) -> SandboxTestServer:
    return sandbox_factory(users=3, messages_per_user=60)


def graph_error(response: requests.Response, status: int, code: str) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code, error
    assert error["message"]
    assert error["innerError"]["request-id"] == response.headers["request-id"]
    return error


def all_pages(session, url: str, **kwargs) -> list[dict]:
    items: list[dict] = []
    while url:
        response = session.get(url, **kwargs)
        assert response.status_code == 200, response.text
        body = response.json()
        items += body["value"]
        url = body.get("@odata.nextLink")
    return items


# -- users -----------------------------------------------------------------------


def test_me_returns_the_signed_in_user(graph_sandbox: SandboxTestServer) -> None:
    user = graph_sandbox.users[0]
    body = graph_sandbox.graph(user).get("me").json()
    assert (body["id"], body["mail"], body["userPrincipalName"], body["displayName"]) == (
        user.id, user.mail, user.user_principal_name, user.display_name)


def test_users_by_id_or_address_with_an_app_token(graph_sandbox: SandboxTestServer) -> None:
    user = graph_sandbox.users[1]
    app = graph_sandbox.graph()
    assert app.get(f"users/{user.id}").json()["mail"] == user.mail
    assert app.get(f"users/{user.mail.upper()}").json()["id"] == user.id
    graph_error(app.get("users/nobody@contoso.onmicrosoft.com/messages"), 404, "ErrorInvalidUser")
    graph_error(app.get("me"), 400, "BadRequest")


def test_a_delegated_token_reaches_only_its_own_mailbox(graph_sandbox: SandboxTestServer) -> None:
    me, other = graph_sandbox.users[0], graph_sandbox.users[1]
    session = graph_sandbox.graph(me)
    assert session.get(f"users/{me.mail}/mailFolders/inbox").status_code == 200
    graph_error(session.get(f"users/{other.id}/mailFolders/inbox"), 403, "ErrorAccessDenied")


def test_no_token_gets_graphs_401(graph_sandbox: SandboxTestServer) -> None:
    response = requests.get(f"{graph_sandbox.base_url}/v1.0/me/messages", timeout=10)
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "InvalidAuthenticationToken"


def test_missing_permission_is_403(graph_sandbox: SandboxTestServer) -> None:
    user = graph_sandbox.users[0]
    token = graph_sandbox.user_token(user.mail, scope="Mail.Read offline_access openid")
    session = requests.Session()
    session.headers["Authorization"] = f"Bearer {token}"
    base = f"{graph_sandbox.base_url}/v1.0/me"
    assert session.get(f"{base}/mailFolders/inbox/messages?$top=1", timeout=10).status_code == 200
    graph_error(session.post(f"{base}/sendMail", json={"message": {"toRecipients": [
        {"emailAddress": {"address": user.mail}}]}}, timeout=10), 403, "ErrorAccessDenied")
    first = session.get(f"{base}/messages?$top=1", timeout=10).json()["value"][0]
    graph_error(session.patch(f"{base}/messages/{first['id']}", json={"isRead": True}, timeout=10),
                403, "ErrorAccessDenied")


# -- folders -------------------------------------------------------------------------


def test_folders_list_pages_and_holds_the_well_known_folders(graph_sandbox: SandboxTestServer) -> None:
    session = graph_sandbox.graph(graph_sandbox.users[0])
    first = session.get("me/mailFolders?$top=3").json()
    assert len(first["value"]) == 3 and "@odata.nextLink" in first
    folders = all_pages(session, "me/mailFolders?$top=3")
    names = [f["displayName"] for f in folders]
    assert len(names) == len(set(names))
    for name in ("Inbox", "Sent Items", "Drafts", "Deleted Items", "Archive", "Junk Email"):
        assert name in names
    snapshot = graph_sandbox.snapshot(graph_sandbox.users[0])
    root = snapshot["rootFolderId"]
    # Search folders are listed with the others (as mailSearchFolders); the snapshot keeps them apart.
    every = [*snapshot["folders"], *snapshot["searchFolders"]]
    assert sorted(f["id"] for f in folders) == sorted(f["id"] for f in every if f["parentFolderId"] == root)


def test_folder_by_well_known_name_and_child_folders(graph_sandbox: SandboxTestServer) -> None:
    session = graph_sandbox.graph(graph_sandbox.users[0])
    inbox = session.get("me/mailFolders/Inbox").json()
    assert inbox["displayName"] == "Inbox"
    assert session.get(f"me/mailFolders('{inbox['id']}')").json()["id"] == inbox["id"]
    snapshot = graph_sandbox.snapshot(graph_sandbox.users[0])
    truth = next(f for f in snapshot["folders"] if f["id"] == inbox["id"])
    assert (inbox["totalItemCount"], inbox["unreadItemCount"], inbox["childFolderCount"]) == (
        truth["totalItemCount"], truth["unreadItemCount"], truth["childFolderCount"])
    children = session.get("me/mailFolders/inbox/childFolders").json()["value"]
    assert len(children) == inbox["childFolderCount"]
    for child in children:
        assert child["parentFolderId"] == inbox["id"]
        nested = session.get(f"me/mailFolders/inbox/childFolders/{child['id']}").json()
        assert nested["id"] == child["id"]
    graph_error(session.get("me/mailFolders/not-a-folder"), 404, "ErrorItemNotFound")


def test_child_folders_of_the_root_page_through_next_links(graph_sandbox: SandboxTestServer) -> None:
    # The root's childFolders nextLink names the root by its id; Graph answers it.
    session = graph_sandbox.graph(graph_sandbox.users[0])
    root = session.get("me/mailFolders/msgfolderroot").json()
    assert session.get(f"me/mailFolders/{root['id']}").json()["id"] == root["id"]
    url: str | None = "me/mailFolders/msgfolderroot/childFolders?$top=3"
    seen: list[str] = []
    while url:
        response = session.get(url)
        assert response.status_code == 200, response.text
        seen += [f["id"] for f in response.json()["value"]]
        url = response.json().get("@odata.nextLink")
    top = session.get("me/mailFolders?$top=100").json()["value"]
    assert len(seen) > 3 and seen == [f["id"] for f in top]


def test_create_rename_delete_folder(sandbox: SandboxTestServer) -> None:
    session = sandbox.graph(sandbox.users[0])
    created = session.post("me/mailFolders", json={"displayName": "Invoices 2026"})
    assert created.status_code == 201, created.text
    folder = created.json()
    graph_error(session.post("me/mailFolders", json={"displayName": "invoices 2026"}), 409, "ErrorFolderExists")
    child = session.post(f"me/mailFolders/{folder['id']}/childFolders", json={"displayName": "Paid"}).json()
    assert child["parentFolderId"] == folder["id"]
    renamed = session.patch(f"me/mailFolders/{folder['id']}", json={"displayName": "Invoices"}).json()
    assert renamed["displayName"] == "Invoices" and renamed["childFolderCount"] == 1
    graph_error(session.patch("me/mailFolders/inbox", json={"displayName": "Mail"}), 400, "ErrorInvalidRequest")
    graph_error(session.delete("me/mailFolders/inbox"), 400, "ErrorDeleteDistinguishedFolder")
    graph_error(session.post("me/mailFolders", json={"displayName": ""}), 400, "ErrorInvalidRequest")
    graph_error(session.post("me/mailFolders", json={"displayName": "x", "color": "red"}), 400, "RequestBodyRead")

    # Deleting moves the folder under Deleted Items; deleting it there removes it.
    assert session.delete(f"me/mailFolders/{folder['id']}").status_code == 204
    deleted_items = session.get("me/mailFolders/deleteditems").json()
    assert session.get(f"me/mailFolders/{folder['id']}").json()["parentFolderId"] == deleted_items["id"]
    assert session.delete(f"me/mailFolders/{folder['id']}").status_code == 204
    graph_error(session.get(f"me/mailFolders/{folder['id']}"), 404, "ErrorItemNotFound")
    graph_error(session.get(f"me/mailFolders/{child['id']}"), 404, "ErrorItemNotFound")


# -- messages: read -----------------------------------------------------------------------


def test_messages_select_top_orderby_and_filter(graph_sandbox: SandboxTestServer) -> None:
    session = graph_sandbox.graph(graph_sandbox.users[0])
    page = session.get("me/mailFolders/inbox/messages?$select=subject,isRead,receivedDateTime&$top=5"
                       "&$orderby=receivedDateTime desc").json()
    assert len(page["value"]) == 5 and page["@odata.nextLink"]
    for item in page["value"]:
        assert set(item) == {"@odata.etag", "id", "subject", "isRead", "receivedDateTime"}
    everything = all_pages(session, "me/mailFolders/inbox/messages?$select=receivedDateTime,isRead&$top=7")
    times = [datetime.fromisoformat(m["receivedDateTime"]) for m in everything]
    assert times == sorted(times, reverse=True)
    inbox = session.get("me/mailFolders/inbox").json()
    assert len(everything) == inbox["totalItemCount"]
    unread = all_pages(session, "me/mailFolders/inbox/messages?$filter=isRead eq false&$top=50")
    assert len(unread) == inbox["unreadItemCount"] and all(not m["isRead"] for m in unread)
    cutoff = times[len(times) // 2].strftime("%Y-%m-%dT%H:%M:%SZ")
    recent = all_pages(session, f"me/mailFolders/inbox/messages?$filter=receivedDateTime ge {cutoff}&$top=50")
    assert len(recent) == sum(1 for t in times if t >= times[len(times) // 2])
    graph_error(session.get("me/messages?$filter=subject eq 'x'"), 400, "ErrorInvalidUrlQueryFilter")
    graph_error(session.get("me/messages?$select=subject,nonsense"), 400, "RequestBroker--ParseUri")
    graph_error(session.get("me/messages?$top=1001"), 400, "BadRequest")


def test_get_message_full_payload_and_text_body(graph_sandbox: SandboxTestServer) -> None:
    session = graph_sandbox.graph(graph_sandbox.users[0])
    listed = session.get("me/messages?$top=1").json()["value"][0]
    full = session.get(f"me/messages/{listed['id']}").json()
    for name in ("subject", "from", "toRecipients", "receivedDateTime", "isRead", "flag", "body",
                 "parentFolderId", "changeKey", "lastModifiedDateTime", "conversationId", "internetMessageId"):
        assert name in full
    assert full["body"]["contentType"] == "html"
    text = session.get(f"me/messages/{listed['id']}", headers={
        "Prefer": 'IdType="ImmutableId", outlook.body-content-type="text"'})
    assert text.json()["body"]["contentType"] == "text" and "<p>" not in text.json()["body"]["content"]
    assert 'outlook.body-content-type="text"' in text.headers["Preference-Applied"]


# -- messages: change ----------------------------------------------------------------------


def test_patch_read_flag_categories_importance(sandbox: SandboxTestServer) -> None:
    session = sandbox.graph(sandbox.users[0])
    message = session.get("me/mailFolders/inbox/messages?$top=1&$filter=isRead eq false").json()["value"][0]
    before = session.get(f"me/messages/{message['id']}").json()
    patched = session.patch(f"me/messages/{message['id']}", json={
        "isRead": True, "flag": {"flagStatus": "flagged"}, "categories": ["Red category"], "importance": "high"})
    assert patched.status_code == 200, patched.text
    after = session.get(f"me/messages/{message['id']}").json()
    assert after["isRead"] is True and after["importance"] == "high" and after["categories"] == ["Red category"]
    assert after["flag"]["flagStatus"] == "flagged" and after["flag"]["dueDateTime"]["timeZone"] == "UTC"
    assert after["changeKey"] != before["changeKey"]
    assert after["lastModifiedDateTime"] >= before["lastModifiedDateTime"]
    done = session.patch(f"me/messages/{message['id']}", json={"flag": {"flagStatus": "complete"}}).json()
    assert done["flag"]["flagStatus"] == "complete" and "completedDateTime" in done["flag"]

    graph_error(session.patch(f"me/messages/{message['id']}", json={"isRead": "yes"}), 400, "BadRequest")
    graph_error(session.patch(f"me/messages/{message['id']}", json={"importance": "urgent"}), 400, "BadRequest")
    graph_error(session.patch(f"me/messages/{message['id']}", json={"mood": "happy"}), 400, "RequestBodyRead")
    graph_error(session.patch(f"me/messages/{message['id']}", json={"subject": "new"}), 400,
                "ErrorInvalidPropertyUpdateSentMessage")
    graph_error(session.patch(f"me/messages/{message['id']}", data=b"{not json",
                              headers={"Content-Type": "application/json"}), 400, "BadRequest")
    assert session.get(f"me/messages/{message['id']}").json()["importance"] == "high"   # nothing half-applied


def test_move_changes_the_rest_id_but_not_the_immutable_id(sandbox: SandboxTestServer) -> None:
    user = sandbox.users[0]
    rest, immutable = sandbox.graph(user, immutable=False), sandbox.graph(user)
    archive = rest.get("me/mailFolders/archive").json()["id"]
    message = rest.get("me/mailFolders/inbox/messages?$top=1&$select=internetMessageId").json()["value"][0]
    immutable_id = immutable.get(f"me/messages/{message['id']}?$select=internetMessageId").json()["id"]
    assert immutable_id != message["id"]

    moved = rest.post(f"me/messages/{message['id']}/move", json={"destinationId": "archive"})
    assert moved.status_code == 201, moved.text
    assert moved.json()["id"] != message["id"] and moved.json()["parentFolderId"] == archive
    graph_error(rest.get(f"me/messages/{message['id']}"), 404, "ErrorItemNotFound")     # old REST id is gone
    again = immutable.post(f"me/messages/{immutable_id}/move", json={"destinationId": "inbox"})
    assert again.json()["id"] == immutable_id and again.headers["Preference-Applied"] == 'IdType="ImmutableId"'
    graph_error(rest.post(f"me/messages/{immutable_id}/move", json={}), 400, "ErrorInvalidRequest")
    graph_error(rest.post(f"me/messages/{immutable_id}/move", json={"destinationId": "nowhere"}), 404,
                "ErrorItemNotFound")

    copy = immutable.post(f"me/messages/{immutable_id}/copy", json={"destinationId": "archive"}).json()
    assert copy["id"] != immutable_id and copy["parentFolderId"] == archive
    assert copy["internetMessageId"] == moved.json()["internetMessageId"]


def test_delete_goes_to_deleted_items_then_away(sandbox: SandboxTestServer) -> None:
    session = sandbox.graph(sandbox.users[0])
    deleted_items = session.get("me/mailFolders/deleteditems").json()
    message = session.get("me/mailFolders/inbox/messages?$top=1").json()["value"][0]
    assert session.delete(f"me/messages/{message['id']}").status_code == 204
    assert session.get(f"me/messages/{message['id']}").json()["parentFolderId"] == deleted_items["id"]
    assert session.get("me/mailFolders/deleteditems").json()["totalItemCount"] == deleted_items["totalItemCount"] + 1
    assert session.delete(f"me/messages/{message['id']}").status_code == 204
    graph_error(session.get(f"me/messages/{message['id']}"), 404, "ErrorItemNotFound")
    graph_error(session.delete(f"me/messages/{message['id']}"), 404, "ErrorItemNotFound")


def test_send_mail_delivers_to_sandbox_recipients(sandbox: SandboxTestServer) -> None:
    alice, bob = sandbox.users[0], sandbox.users[1]
    subject = "Quarterly numbers (sandbox test)"
    response = sandbox.graph(alice).post("me/sendMail", json={"message": {
        "subject": subject, "body": {"contentType": "text", "content": "See attached numbers."},
        "toRecipients": [{"emailAddress": {"address": bob.mail, "name": bob.display_name}}],
        "ccRecipients": [{"emailAddress": {"address": "partner@fabrikam.com"}}]}})
    assert response.status_code == 202, response.text
    app = sandbox.graph()
    received = app.get(f"users/{bob.id}/mailFolders/inbox/messages?$top=1").json()["value"][0]
    assert received["subject"] == subject and received["isRead"] is False
    assert received["from"]["emailAddress"]["address"] == alice.mail
    assert received["body"] == {"contentType": "text", "content": "See attached numbers."}
    sent = app.get(f"users/{alice.id}/mailFolders/sentitems/messages?$top=1").json()["value"][0]
    assert sent["subject"] == subject and sent["internetMessageId"] == received["internetMessageId"]
    graph_error(sandbox.graph(alice).post("me/sendMail", json={"message": {"subject": "nobody"}}), 400,
                "ErrorInvalidRecipients")
    graph_error(sandbox.graph(alice).post("me/sendMail", json={"message": {"toRecipients": [
        {"emailAddress": {"address": "not-an-address"}}]}}), 400, "ErrorInvalidRecipients")


def test_draft_create_update_and_send(sandbox: SandboxTestServer) -> None:
    alice, bob = sandbox.users[0], sandbox.users[1]
    session = sandbox.graph(alice)
    drafts = session.get("me/mailFolders/drafts").json()
    created = session.post("me/messages", json={"subject": "Draft plan", "body": {
        "contentType": "html", "content": "<p>First <b>draft</b></p>"}})
    assert created.status_code == 201, created.text
    draft = created.json()
    assert draft["isDraft"] is True and draft["parentFolderId"] == drafts["id"]
    assert draft["bodyPreview"] == "First draft"
    updated = session.patch(f"me/messages/{draft['id']}", json={
        "subject": "Final plan", "toRecipients": [{"emailAddress": {"address": bob.mail}}]}).json()
    assert updated["subject"] == "Final plan"
    assert session.post(f"me/messages/{draft['id']}/send").status_code == 202
    graph_error(session.get(f"me/messages/{draft['id']}"), 404, "ErrorItemNotFound")
    inbox = sandbox.graph().get(f"users/{bob.id}/mailFolders/inbox/messages?$top=1").json()["value"][0]
    assert inbox["subject"] == "Final plan" and inbox["isDraft"] is False


def test_unknown_segments_and_methods(graph_sandbox: SandboxTestServer) -> None:
    session = graph_sandbox.graph(graph_sandbox.users[0])
    graph_error(session.get("me/calendars"), 400, "BadRequest")
    graph_error(session.get("nothing/here"), 400, "BadRequest")
    assert session.put("me/mailFolders/inbox", json={}).status_code == 405


def test_move_folder_keeps_its_id_and_messages(sandbox: SandboxTestServer) -> None:
    session = sandbox.graph(sandbox.users[0])
    projects = session.post("me/mailFolders", json={"displayName": "Projects 2027"}).json()
    message = session.get("me/mailFolders/inbox/messages?$top=1").json()["value"][0]
    session.post(f"me/messages/{message['id']}/move", json={"destinationId": projects["id"]})
    moved = session.post(f"me/mailFolders/{projects['id']}/move", json={"destinationId": "archive"})
    assert moved.status_code == 201, moved.text
    archive = session.get("me/mailFolders/archive").json()
    assert moved.json()["id"] == projects["id"] and moved.json()["parentFolderId"] == archive["id"]
    assert moved.json()["totalItemCount"] == 1
    assert session.get(f"me/messages/{message['id']}").json()["parentFolderId"] == projects["id"]
    graph_error(session.post(f"me/mailFolders/{archive['id']}/move", json={"destinationId": projects["id"]}),
                400, "ErrorInvalidRequest")                     # a distinguished folder stays put
    inner = session.post(f"me/mailFolders/{projects['id']}/childFolders", json={"displayName": "Inner"}).json()
    graph_error(session.post(f"me/mailFolders/{projects['id']}/move", json={"destinationId": inner["id"]}),
                400, "ErrorMoveCopyFailed")                     # not into its own subfolder
