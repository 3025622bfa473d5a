// Mail page: the live sync progress, the folders with counts, and the message list, patched in
// place from the live channel (SignalR: syncProgress, messagesChanged) without reloading.
//
// Consistency rules (the payloads are described in mailsync/realtime/signalr_messages.py):
// * a fetch is the truth as of when it ran; events that arrive while one is in flight are kept
//   and applied after it renders, so a slow fetch cannot undo a newer event;
// * messagesChanged: removals first (a row goes only if it still shows that folder), then
//   upserts (replace the row with that id, drop it if it no longer fits the view, insert it in
//   date order if it belongs on this page). A truncated event, or any event while a search is
//   active (the server decides what matches), refetches the current page instead;
// * after every (re)connect the page refetches everything: events missed while offline are lost.
"use strict";

(() => {
  const { api, el, formatNumber, formatReceived, showSyncProgress } = window.Mailsync;
  const $ = (id) => document.getElementById(id);
  const PAGE_SIZE = 50;
  const HIGHLIGHT_MS = 2500;
  const PHASES = {
    pending: "waiting to start", folders: "listing folders", initial: "initial sync",
    incremental: "following changes", resync: "resyncing", synced: "synced",
    reauth_required: "reauthorization required",
  };

  const state = {
    accountId: null,
    token: null,
    folderId: null,
    unreadOnly: false,
    q: "",
    cursors: [null],     // cursors[n] opens page n
    page: 0,
    nextCursor: null,
    rows: new Map(),     // message_id -> row shown (same shape from the API and from events)
    folders: [],
    loads: 0,            // sequence number: only the newest fetch renders
    loading: false,
    pending: [],         // messagesChanged payloads that arrived during a fetch
    expected: 0,
  };

  /** Run ``fn`` at most once per ``ms``; calls during a run schedule one more run. */
  function coalesce(fn, ms) {
    let timer = null;
    let running = false;
    let again = false;
    const schedule = () => {
      if (timer || running) {
        again = true;
        return;
      }
      timer = setTimeout(async () => {
        timer = null;
        running = true;
        try {
          await fn();
        } catch (error) {
          showStatus(`Could not refresh: ${error.message}`);
        } finally {
          running = false;
          if (again) {
            again = false;
            schedule();
          }
        }
      }, ms);
    };
    return schedule;
  }

  const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));
  const accountPath = (suffix) => `accounts/${encodeURIComponent(state.accountId)}${suffix}`;

  function showStatus(text) {
    $("list-status").textContent = text;
  }

  function showPageError(text, withLink, link = { href: "index.html", text: "Add an account" }) {
    const box = $("page-error");
    box.replaceChildren(text, withLink ? " " : "", withLink ? el("a", link) : "");
    box.hidden = false;
  }

  // -- the message list --------------------------------------------------------------------------

  function newerFirst(a, b) {
    const ta = Date.parse(a.received_at || "") || 0;
    const tb = Date.parse(b.received_at || "") || 0;
    if (ta !== tb) return tb - ta;
    return a.message_id < b.message_id ? 1 : a.message_id > b.message_id ? -1 : 0;
  }

  function rowElement(m) {
    const sender = m.sender || {};
    const flagged = m.flag_status === "flagged" || m.flag_status === "complete";
    const selected = window.Mailsync.selection && window.Mailsync.selection.has(m.message_id);
    return el("li", { class: "msg", tabindex: "-1",
                      dataset: { messageId: m.message_id, folderId: m.folder_id, read: String(Boolean(m.is_read)),
                                 flag: m.flag_status || "notFlagged", pending: m.pending ? "true" : null } },
      el("input", { type: "checkbox", class: "select", checked: selected,
                    "aria-label": `Select “${m.subject || "(no subject)"}”` }),
      el("span", { class: "markers" },
        el("span", { class: "dot", title: m.is_read ? "Read" : "Unread" }),
        el("span", { class: "flag", "aria-hidden": "true", title: flagged ? "Flagged" : null, text: "⚑" }),
        el("span", { class: "visually-hidden",
                     text: `${m.is_read ? "Read" : "Unread"}${flagged ? (m.flag_status === "complete" ? ", flag completed" : ", flagged") : ""}.` })),
      el("span", { class: "from" },
        el("span", { class: "name", text: sender.name || sender.address || "(no sender)" }),
        sender.address ? [" ", el("span", { class: "addr", text: `<${sender.address}>` })] : null),
      el("span", { class: "subject", text: m.subject || "(no subject)" }),
      el("time", { datetime: m.received_at || null, text: formatReceived(m.received_at) }));
  }

  function rowNode(messageId) {
    for (const node of $("message-list").children) {
      if (node.dataset.messageId === messageId) return node;
    }
    return null;
  }

  function highlight(node) {
    node.classList.add("changed");
    setTimeout(() => node.classList.remove("changed"), HIGHLIGHT_MS);
  }

  function updateListChrome() {
    const count = state.rows.size;
    const list = $("message-list");
    const empty = list.querySelector(".empty");
    if (count === 0 && !empty) list.append(el("li", { class: "empty", text: "No messages here." }));
    if (count > 0 && empty) empty.remove();
    showStatus(count === 0 ? "No messages." : `${formatNumber(count)} messages on this page.`);
    $("newer").disabled = state.page === 0;
    $("older").disabled = !state.nextCursor;
    $("page-label").textContent = `Page ${state.page + 1}`;
  }

  function renderList(messages) {
    state.rows = new Map(messages.map((m) => [m.message_id, m]));
    $("message-list").replaceChildren(...messages.map(rowElement));
    updateListChrome();
  }

  function matchesView(m) {
    return (!state.folderId || m.folder_id === state.folderId) && (!state.unreadOnly || !m.is_read);
  }

  /** Whether a message that is not shown belongs between this page's first and last rows. */
  function belongsOnThisPage(m) {
    const shown = [...state.rows.values()];
    if (shown.length === 0) return state.page === 0;
    const first = shown.reduce((a, b) => (newerFirst(a, b) <= 0 ? a : b));
    const last = shown.reduce((a, b) => (newerFirst(a, b) >= 0 ? a : b));
    const afterFirst = state.page === 0 || newerFirst(first, m) < 0;
    const beforeLast = !state.nextCursor || newerFirst(m, last) < 0;
    return afterFirst && beforeLast;
  }

  function removeRow(messageId) {
    const node = rowNode(messageId);
    if (node) node.remove();
    state.rows.delete(messageId);
  }

  function upsertRow(m) {
    const fresh = rowElement(m);
    const old = rowNode(m.message_id);
    if (old) {
      old.replaceWith(fresh);
    } else {
      const list = $("message-list");
      let before = null;
      for (const node of list.children) {
        const shown = state.rows.get(node.dataset.messageId);
        if (shown && newerFirst(m, shown) < 0) {
          before = node;
          break;
        }
      }
      list.insertBefore(fresh, before);
    }
    state.rows.set(m.message_id, m);
    highlight(fresh);
  }

  // Live rows arrive out of order (an action's optimistic row from the API, a delta page's row from a
  // worker, each maybe delayed): like the store, keep a row unless the update's version is at least its.
  function isOlder(update, shown) {
    return Boolean(shown) && typeof update.version === "number" && typeof shown.version === "number"
      && update.version < shown.version;
  }

  function applyChanges(change) {
    if (!change || change.account_id !== state.accountId) return;
    if (state.loading) {
      state.pending.push(change);
      return;
    }
    refreshFolders();
    if (change.truncated || state.q) {
      reloadMessages();
      return;
    }
    for (const { folder_id: folderId, message_id: messageId } of change.removed || []) {
      const shown = state.rows.get(messageId);
      if (shown && shown.folder_id === folderId) removeRow(messageId);
    }
    for (const m of change.upserted || []) {
      if (isOlder(m, state.rows.get(m.message_id))) continue;
      if (state.rows.has(m.message_id)) {
        if (matchesView(m)) upsertRow(m);
        else removeRow(m.message_id);
      } else if (matchesView(m) && belongsOnThisPage(m)) {
        upsertRow(m);
      }
    }
    updateListChrome();
  }

  async function loadMessages() {
    const mine = ++state.loads;
    state.loading = true;
    try {
      const body = await api(accountPath("/messages"), {
        token: state.token,
        params: { folder_id: state.folderId, unread: state.unreadOnly ? "true" : null, q: state.q,
                  limit: PAGE_SIZE, cursor: state.cursors[state.page] },
      });
      if (mine !== state.loads) return;
      state.nextCursor = body.next_cursor;
      renderList(body.messages);
    } catch (error) {
      if (mine === state.loads) showStatus(`Could not load messages: ${error.message}`);
      throw error;
    } finally {
      if (mine === state.loads) {
        state.loading = false;
        const pending = state.pending;
        state.pending = [];
        for (const change of pending) applyChanges(change);
      }
    }
  }

  const reloadMessages = coalesce(loadMessages, 700);

  function openView({ folderId = state.folderId, unreadOnly = state.unreadOnly, q = state.q } = {}) {
    Object.assign(state, { folderId, unreadOnly, q, cursors: [null], page: 0, nextCursor: null });
    renderFolders();
    const folder = state.folders.find((f) => f.folder_id === folderId);
    $("list-scope").textContent = `— ${folder ? folder.name : "All mail"}${q ? `, matching “${q}”` : ""}`;
    showStatus("Loading…");
    loadMessages().catch(() => {});
  }

  // -- folders -------------------------------------------------------------------------------------

  /** Folders as a tree, each followed by its children; the API's order (well-known first) among siblings. */
  function treeOrder(folders) {
    const byId = new Map(folders.map((f) => [f.folder_id, f]));
    const children = new Map();
    for (const f of folders) {
      const parent = byId.has(f.parent_id) ? f.parent_id : null;
      if (!children.has(parent)) children.set(parent, []);
      children.get(parent).push(f);
    }
    const out = [];
    const visit = (parent, depth) => {
      for (const f of children.get(parent) || []) {
        if (out.length > folders.length) return;   // a cycle in parent ids: stop, never loop
        out.push([f, depth]);
        visit(f.folder_id, depth + 1);
      }
    };
    visit(null, 0);
    return out;
  }

  function folderButton(folderId, name, unread, total, depth) {
    const current = (state.folderId || null) === folderId;
    const label = `${name}: ${formatNumber(unread)} unread of ${formatNumber(total)}`;
    return el("li", {},
      el("button", { type: "button", "aria-current": current ? "true" : null, "aria-label": label,
                     dataset: { folderId: folderId || "" }, style: depth ? { paddingLeft: `${0.5 + depth}rem` } : null,
                     onclick: () => openView({ folderId }) },
        el("span", { class: "name", text: name }),
        el("span", { class: "counts" }, unread ? [el("span", { class: "unread", text: formatNumber(unread) }), " / "] : null,
           formatNumber(total))));
  }

  function renderFolders() {
    const list = $("folder-list");
    const focused = list.contains(document.activeElement) ? document.activeElement.dataset.folderId : undefined;
    const total = state.folders.reduce((sum, f) => sum + f.stored_count, 0);
    const unread = state.folders.reduce((sum, f) => sum + f.stored_unread, 0);
    list.replaceChildren(folderButton(null, "All mail", unread, total, 0),
                         ...treeOrder(state.folders).map(([f, depth]) => folderButton(f.folder_id, f.name,
                                                                                      f.stored_unread, f.stored_count,
                                                                                      depth)));
    if (focused !== undefined) {
      const again = [...list.querySelectorAll("button")].find((b) => b.dataset.folderId === focused);
      if (again) again.focus();
    }
  }

  async function loadFolders() {
    const body = await api(accountPath("/mailboxes"), { token: state.token });
    state.folders = body.folders;
    if (body.mailbox) {
      const who = body.mailbox.display_name ? `${body.mailbox.display_name} <${body.mailbox.address}>`
                                            : body.mailbox.address;
      $("account-address").textContent = `— ${who}`;
    }
    renderFolders();
  }

  const refreshFolders = coalesce(loadFolders, 1000);

  // -- sync progress -------------------------------------------------------------------------------

  function setPhase(phase) {
    const node = $("sync-phase");
    node.dataset.phase = phase || "";
    node.textContent = PHASES[phase] || phase || "–";
  }

  function setOverall(indexed, expected, synced) {
    showSyncProgress($("overall-bar"), $("overall-count"), indexed, expected, synced);
  }

  /** What a stopped account needs, in the words of its provider. */
  function reauthText(provider) {
    return provider === "imap"
      ? "The IMAP server no longer accepts the saved password; mailsync needs the current one to keep this "
        + "mailbox in sync."
      : "Outlook needs you to sign in again before mailsync can keep this mailbox in sync.";
  }

  function renderAccount(account) {
    const sync = account.sync;
    if (account.status === "reauth_required" || account.status === "error") {
      if (account.status === "reauth_required") {
        // The add-account page, following this account, offers its way back in (sign-in or password).
        showPageError(reauthText(account.provider), true,
                      { href: `index.html?account_id=${encodeURIComponent(account.account_id)}`, text: "Link it again" });
      } else {
        showPageError(`This account is not linked: ${account.error || "the sign-in failed"}.`, true);
      }
    }
    if (!sync) {
      setPhase(account.status === "linking" ? "pending" : account.status);
      return;
    }
    setPhase(account.status === "reauth_required" ? "reauth_required" : sync.phase);
    state.expected = sync.messages_expected || 0;
    $("sync-indexed").textContent = formatNumber(sync.messages_indexed);
    $("sync-folders").textContent = `${sync.folders_done} / ${sync.folders_total}`;
    setOverall(sync.messages_indexed, state.expected, sync.phase === "synced");
    $("folder-progress").replaceChildren(...(sync.folders || []).map((f) => {
      const labelId = `fp-${f.folder_id}`.replace(/[^A-Za-z0-9_-]/g, "_");
      const bar = el("progress", { max: f.done ? 1 : Math.max(f.messages_expected || 0, 1),
                                   value: f.done ? 1 : Math.min(f.messages_indexed, f.messages_expected || 0),
                                   "aria-labelledby": labelId });
      if (!f.done && !f.messages_expected) bar.removeAttribute("value");
      return el("li", { class: "bar", dataset: { folderId: f.folder_id, done: String(f.done) } },
        el("span", { id: labelId, text: `${f.name}${f.done ? "" : ` (${PHASES[f.phase] || f.phase})`}` }),
        bar,
        el("span", { class: "count", text: f.messages_expected ? `${formatNumber(f.messages_indexed)} / `
                                              + `${formatNumber(f.messages_expected)}` : formatNumber(f.messages_indexed) }));
    }));
  }

  async function loadAccount() {
    renderAccount(await api(accountPath(""), { token: state.token }));
  }

  const refreshAccount = coalesce(loadAccount, 600);

  function onProgress(event) {
    if (!event || event.account_id !== state.accountId) return;
    $("sync-indexed").textContent = formatNumber(event.messages_indexed);
    $("sync-folders").textContent = `${event.folders_done} / ${event.folders_total}`;
    $("sync-rate").textContent = event.rate_per_s > 0 ? `${formatNumber(event.rate_per_s)} messages/s` : "–";
    if (event.folder_id === null && (event.phase === "synced" || event.phase === "reauth_required")) {
      setPhase(event.phase);
    }
    setOverall(event.messages_indexed, state.expected, event.phase === "synced" && event.folder_id === null);
    refreshAccount();   // per-folder rows and the account's phase come from the summary
    refreshFolders();
  }

  // -- the live channel ----------------------------------------------------------------------------

  function setLive(stateName, text) {
    const node = $("live-status");
    node.dataset.state = stateName;
    node.textContent = `Live: ${text}`;
  }

  async function refreshAll() {
    await Promise.allSettled([loadAccount(), loadFolders(), loadMessages()]);
  }

  async function connectLive() {
    if (!window.signalR) {
      setLive("disconnected", "unavailable (the SignalR client did not load)");
      return;
    }
    const connection = new window.signalR.HubConnectionBuilder()
      .withUrl("/api", { accessTokenFactory: () => state.token })
      // Never give up: wait 0, 1, 2, 4, 8, then 15 s between attempts.
      .withAutomaticReconnect({ nextRetryDelayInMilliseconds: (context) =>
        (context.previousRetryCount === 0 ? 0 : Math.min(1000 * 2 ** (context.previousRetryCount - 1), 15000)) })
      .configureLogging(window.signalR.LogLevel.Warning)
      .build();
    connection.on("syncProgress", onProgress);
    connection.on("messagesChanged", applyChanges);
    connection.on("actionsFailed", (event) => {
      if (event && event.account_id === state.accountId && window.Mailsync.onActionsFailed) {
        window.Mailsync.onActionsFailed(event.failures || []);
      }
    });
    connection.onreconnecting(() => setLive("reconnecting", "reconnecting…"));
    connection.onreconnected(() => {
      setLive("connected", "connected");
      refreshAll();
    });
    connection.onclose(() => {
      setLive("disconnected", "disconnected, retrying…");
      startLive(connection);
    });
    await startLive(connection);
  }

  async function startLive(connection) {
    for (let attempt = 0; ; attempt += 1) {
      try {
        setLive(attempt ? "reconnecting" : "connecting", attempt ? "reconnecting…" : "connecting…");
        await connection.start();
        setLive("connected", "connected");
        await refreshAll();   // anything that changed before the channel was up
        return;
      } catch (error) {
        if (error && error.statusCode === 401) {
          setLive("disconnected", "refused (the access token is no longer valid)");
          return;
        }
        setLive("disconnected", "cannot connect, retrying…");
        await sleep(Math.min(1000 * 2 ** attempt, 15000));
      }
    }
  }

  // -- what the reading pane and the actions (reader.js) use ---------------------------------------

  window.Mailsync.list = {
    account: () => ({ accountId: state.accountId, token: state.token }),
    folders: () => state.folders,
    rows: () => [...state.rows.values()],
    row: (messageId) => state.rows.get(messageId),
    /** Patch the list as a messagesChanged event would (the optimistic update of an action). */
    apply: (change) => applyChanges({ account_id: state.accountId, upserted: [], removed: [], ...change }),
    reload: () => reloadMessages(),
  };

  // -- start ---------------------------------------------------------------------------------------

  document.addEventListener("DOMContentLoaded", () => {
    state.accountId = window.Mailsync.currentAccountId();
    state.token = window.Mailsync.tokenFor(state.accountId);
    if (!state.accountId || !state.token) {
      setLive("disconnected", "no account");
      showPageError("This browser tab has no linked account (access tokens are kept per tab).", true);
      return;
    }
    $("nav-add").href = `index.html?account_id=${encodeURIComponent(state.accountId)}`;
    $("search").addEventListener("submit", (event) => {
      event.preventDefault();
      openView({ q: $("q").value.trim(), unreadOnly: $("unread-only").checked });
    });
    $("unread-only").addEventListener("change", () => openView({ unreadOnly: $("unread-only").checked }));
    $("older").addEventListener("click", () => {
      if (!state.nextCursor) return;
      state.cursors[state.page + 1] = state.nextCursor;
      state.page += 1;
      loadMessages().catch(() => {});
    });
    $("newer").addEventListener("click", () => {
      if (state.page === 0) return;
      state.page -= 1;
      loadMessages().catch(() => {});
    });
    openView({});
    loadFolders().catch((error) => {
      if (error.status === 401 || error.status === 404) showPageError("This account is not available.", true);
    });
    loadAccount().catch(() => {});
    connectLive();
  });
})();
