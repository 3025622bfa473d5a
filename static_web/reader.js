// Reading pane and actions on the mail page: open a message (headers, the body in a sandboxed frame,
// attachments), mark read / unread, flag, move, delete — on the open message and on selected rows —
// with keyboard shortcuts.
//
// Every action patches the list at once (the optimistic row, before the request leaves), then sends
// PATCH / DELETE / POST messages/actions; the server answers 202 with the rows as they will look and
// the live channel settles them (messagesChanged) or reports a refusal (actionsFailed), after which
// the list shows the provider's truth again. The body is the server's sanitised HTML, shown in
// <iframe sandbox> (no scripts, a unique origin) with remote images parked until asked.
"use strict";

(() => {
  const { api, el, formatReceived } = window.Mailsync;
  const $ = (id) => document.getElementById(id);
  const selection = new Set();
  window.Mailsync.selection = selection;
  let open = null;          // the message open in the reader (the API's whole-message answer)
  let openRemote = false;   // remote images shown for the open message

  const list = () => window.Mailsync.list;
  const accountPath = (suffix) => `accounts/${encodeURIComponent(list().account().accountId)}${suffix}`;
  const token = () => list().account().token;

  function say(text) {
    $("action-status").textContent = text;
  }

  // -- the optimistic patch --------------------------------------------------------------------------

  function optimistic(ids, change) {
    const upserted = [];
    const removed = [];
    for (const id of ids) {
      const row = list().row(id) || (open && open.message_id === id ? open : null);
      if (!row) continue;
      if (change.delete) {
        const trash = list().folders().find((f) => f.role === "deleteditems");
        if (!change.permanent && trash && row.folder_id !== trash.folder_id) {
          upserted.push({ ...row, folder_id: trash.folder_id, pending: true });
        } else {
          removed.push({ folder_id: row.folder_id, message_id: id });
        }
        continue;
      }
      upserted.push({
        ...row, pending: true,
        is_read: change.is_read === undefined ? row.is_read : change.is_read,
        flag_status: change.flag_status === undefined ? row.flag_status : change.flag_status,
        folder_id: change.folder_id === undefined ? row.folder_id : change.folder_id,
      });
    }
    list().apply({ upserted, removed });
    if (open && ids.includes(open.message_id)) {
      const mine = upserted.find((r) => r.message_id === open.message_id);
      if (mine) Object.assign(open, { is_read: mine.is_read, flag_status: mine.flag_status, folder_id: mine.folder_id });
      else closeReader();
      renderReaderState();
    }
  }

  async function act(ids, change) {
    if (!ids.length) return;
    optimistic(ids, change);
    try {
      if (ids.length === 1 && change.delete) {
        await api(accountPath(`/messages/${encodeURIComponent(ids[0])}`), {
          method: "DELETE", token: token(), params: { permanent: change.permanent ? "true" : null } });
      } else if (ids.length === 1) {
        const answer = await api(accountPath(`/messages/${encodeURIComponent(ids[0])}`), {
          method: "PATCH", token: token(), body: change });
        if (answer && answer.message) list().apply({ upserted: [{ ...answer.message, pending: true }] });
      } else {
        const action = change.delete ? { delete: true, permanent: Boolean(change.permanent) } : change;
        const answer = await api(accountPath("/messages/actions"), {
          method: "POST", token: token(), body: { message_ids: ids, action } });
        if (answer.not_found && answer.not_found.length) say(`${answer.not_found.length} messages were already gone.`);
      }
    } catch (error) {
      say(`The action failed: ${error.message}`);
      list().reload();   // back to what the server has
    }
  }

  window.Mailsync.onActionsFailed = (failures) => {
    say(`${failures.length} action(s) could not be done at the mail provider and were undone`
        + `${failures[0] ? ` (${failures[0].message})` : ""}.`);
  };

  // -- selection ------------------------------------------------------------------------------------

  function renderSelection() {
    const count = selection.size;
    if (count && $("bulk-folder").options.length <= 1) fillPickers();
    $("selected-count").textContent = `${count} selected`;
    for (const control of document.querySelectorAll("#bulk [data-bulk], #bulk-folder")) control.disabled = count === 0;
    for (const box of document.querySelectorAll("#message-list .select")) {
      box.checked = selection.has(box.closest("li").dataset.messageId);
    }
  }

  function toggleSelected(id, on = !selection.has(id)) {
    if (on) selection.add(id);
    else selection.delete(id);
    renderSelection();
  }

  function bulk(kind) {
    const ids = [...selection];
    const changes = {
      read: { is_read: true }, unread: { is_read: false }, flag: { flag_status: "flagged" },
      unflag: { flag_status: "notFlagged" }, delete: { delete: true },
      move: { folder_id: $("bulk-folder").value },
    };
    if (kind === "move" && !$("bulk-folder").value) return;
    if (kind === "delete" || kind === "move") selection.clear();
    act(ids, changes[kind]);
    renderSelection();
  }

  // -- folder pickers -------------------------------------------------------------------------------

  function fillPickers() {
    const folders = list().folders();
    for (const picker of document.querySelectorAll(".folder-picker")) {
      const current = picker.value;
      picker.replaceChildren(el("option", { value: "", text: "Move to…" }),
                             ...folders.map((f) => el("option", { value: f.folder_id, text: f.name })));
      picker.value = current;
    }
  }

  // -- the reading pane ------------------------------------------------------------------------------

  function addresses(items) {
    return (items || []).filter(Boolean).map((a) => (a.name && a.name !== a.address ? `${a.name} <${a.address}>` : a.address))
      .join(", ");
  }

  function frameDocument(body, showRemote) {
    // The frame is sandboxed without scripts or same-origin; its own CSP forbids everything but
    // inline styles and (once asked) images. Remote images wait in data-remote-src.
    const policy = `default-src 'none'; style-src 'unsafe-inline'; img-src data:${showRemote ? " https: http:" : ""}`;
    const head = `<meta charset="utf-8"><meta http-equiv="Content-Security-Policy" content="${policy}">`
      + "<base target=\"_blank\"><style>body{font-family:system-ui,sans-serif;margin:0.8rem;overflow-wrap:anywhere}"
      + "img{max-width:100%}pre{white-space:pre-wrap}</style>";
    if (body.content_type === "html") {
      let html = body.html || "";
      if (showRemote) html = html.replace(/ data-remote-src="/g, ' src="');
      return `<!doctype html><html><head>${head}</head><body>${html}</body></html>`;
    }
    const text = (body.text || "").replace(/[&<>]/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;" })[c]);
    return `<!doctype html><html><head>${head}</head><body><pre>${text}</pre></body></html>`;
  }

  function renderReaderState() {
    if (!open) return;
    $("reader-read").textContent = open.is_read ? "Mark unread" : "Mark read";
    $("reader-flag").textContent = open.flag_status === "flagged" ? "Unflag" : "Flag";
    $("reader").dataset.read = String(Boolean(open.is_read));
    $("reader").dataset.flag = open.flag_status;
    $("reader").dataset.folderId = open.folder_id;
    for (const node of $("message-list").children) {
      node.setAttribute("aria-current", node.dataset.messageId === open.message_id ? "true" : "false");
    }
  }

  async function download(attachment) {
    const url = new URL(`/api/${accountPath(`/messages/${encodeURIComponent(open.message_id)}/attachments/`
                                            + encodeURIComponent(attachment.attachment_id))}`, location.origin);
    const response = await fetch(url, { headers: { "X-Mailsync-Authorization": `Bearer ${token()}` } });
    if (!response.ok) {
      say(`Could not download ${attachment.name} (${response.status}).`);
      return;
    }
    const blob = await response.blob();
    const link = el("a", { href: URL.createObjectURL(blob), download: attachment.name });
    document.body.append(link);
    link.click();
    link.remove();
    setTimeout(() => URL.revokeObjectURL(link.href), 10_000);
  }

  function renderReader(message) {
    open = message;
    openRemote = false;
    $("reader").hidden = false;
    $("reader").dataset.messageId = message.message_id;
    $("reader-subject").textContent = message.subject || "(no subject)";
    const rows = [["From", addresses([message.from])], ["To", addresses(message.to)], ["Cc", addresses(message.cc)],
                  ["Reply to", addresses(message.reply_to)], ["Date", formatReceived(message.received_at)],
                  ["Categories", (message.categories || []).join(", ")]];
    $("reader-headers").replaceChildren(...rows.filter(([, v]) => v).flatMap(([k, v]) => [el("dt", { text: k }),
                                                                                           el("dd", { text: v })]));
    const remote = message.body.content_type === "html" && (message.body.html || "").includes("data-remote-src=");
    $("reader-images").hidden = !remote;
    $("reader-body").srcdoc = frameDocument(message.body, false);
    $("reader-attachments").replaceChildren(...(message.attachments.length ? message.attachments.map((a) =>
      el("li", { dataset: { attachmentId: a.attachment_id } },
        el("button", { type: "button", class: "link", text: `Download ${a.name}`, onclick: () => download(a) }),
        ` ${a.content_type}, ${Math.max(1, Math.round(a.size / 1024))} KB${a.is_inline ? ", inline" : ""}`))
      : [el("li", { class: "empty", text: "No attachments." })]));
    fillPickers();
    renderReaderState();
  }

  function closeReader() {
    open = null;
    $("reader").hidden = true;
    for (const node of $("message-list").children) node.removeAttribute("aria-current");
  }

  async function openMessage(id) {
    say("Opening…");
    try {
      const message = await api(accountPath(`/messages/${encodeURIComponent(id)}`), { token: token() });
      renderReader(message);
      say("");
      const row = list().row(id);
      if (row && !row.is_read) act([id], { is_read: true });   // opening marks read, as mail clients do
    } catch (error) {
      say(`Could not open the message: ${error.message}`);
    }
  }

  // -- keyboard ---------------------------------------------------------------------------------------

  function focusedRow() {
    const active = document.activeElement && document.activeElement.closest
      ? document.activeElement.closest("#message-list li.msg") : null;
    if (active) return active;
    return open ? [...$("message-list").children].find((n) => n.dataset.messageId === open.message_id) : null;
  }

  function step(delta) {
    const rows = [...$("message-list").querySelectorAll("li.msg")];
    if (!rows.length) return;
    const at = rows.indexOf(focusedRow());
    const next = rows[Math.min(rows.length - 1, Math.max(0, at < 0 ? 0 : at + delta))];
    next.focus();
    openMessage(next.dataset.messageId);
  }

  function onKey(event) {
    if (event.ctrlKey || event.metaKey || event.altKey) return;
    const target = event.target;
    if (target.closest && target.closest("input:not(.select), textarea, select")) return;
    const row = focusedRow();
    const id = row ? row.dataset.messageId : open && open.message_id;
    const shown = id ? list().row(id) || open : null;
    const keys = {
      j: () => step(1), k: () => step(-1),
      Enter: () => row && openMessage(row.dataset.messageId), o: () => row && openMessage(row.dataset.messageId),
      u: () => shown && act([id], { is_read: !shown.is_read }),
      s: () => shown && act([id], { flag_status: shown.flag_status === "flagged" ? "notFlagged" : "flagged" }),
      "#": () => shown && act([id], { delete: true }), Delete: () => shown && act([id], { delete: true }),
      v: () => (open ? $("reader-folder") : $("bulk-folder")).focus(),
      x: () => id && toggleSelected(id),
      Escape: () => closeReader(),
    };
    const handler = keys[event.key];
    if (!handler) return;
    event.preventDefault();
    handler();
  }

  // -- wiring ------------------------------------------------------------------------------------------

  document.addEventListener("DOMContentLoaded", () => {
    if (!list()) return;
    $("message-list").addEventListener("click", (event) => {
      const row = event.target.closest("li.msg");
      if (!row) return;
      if (event.target.classList.contains("select")) {
        toggleSelected(row.dataset.messageId, event.target.checked);
        return;
      }
      row.focus();
      openMessage(row.dataset.messageId);
    });
    $("select-all").addEventListener("change", (event) => {
      for (const row of list().rows()) toggleSelected(row.message_id, event.target.checked);
    });
    for (const button of document.querySelectorAll("#bulk [data-bulk]")) {
      button.addEventListener("click", () => bulk(button.dataset.bulk));
    }
    $("bulk-folder").addEventListener("focus", fillPickers);
    $("reader-folder").addEventListener("focus", fillPickers);
    $("reader-close").addEventListener("click", closeReader);
    $("reader-read").addEventListener("click", () => open && act([open.message_id], { is_read: !open.is_read }));
    $("reader-flag").addEventListener("click", () => open && act([open.message_id], {
      flag_status: open.flag_status === "flagged" ? "notFlagged" : "flagged" }));
    $("reader-move").addEventListener("click", () => {
      const folderId = $("reader-folder").value;
      if (open && folderId && folderId !== open.folder_id) act([open.message_id], { folder_id: folderId });
    });
    $("reader-delete").addEventListener("click", () => open && act([open.message_id], { delete: true }));
    $("reader-show-images").addEventListener("click", () => {
      if (!open) return;
      openRemote = true;
      $("reader-body").srcdoc = frameDocument(open.body, openRemote);
      $("reader-images").hidden = true;
    });
    document.addEventListener("keydown", onKey);
    // Rows re-render on every change: keep the checkboxes in step with the selection.
    new MutationObserver(() => renderSelection()).observe($("message-list"), { childList: true });
    renderSelection();
  });
})();
