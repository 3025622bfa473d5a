// Shared by both pages: the API client, the per-tab token store, small DOM and text helpers.
// Plain browser JavaScript (no build step); everything hangs off window.Mailsync.
"use strict";

window.Mailsync = (() => {
  // Access tokens live in sessionStorage: per tab, gone when the tab closes, never sent anywhere
  // but our own API (as a bearer token). One token per account: {account_id: token}.
  const TOKENS = "mailsync.tokens";
  const CURRENT = "mailsync.current";

  function tokens() {
    try {
      const value = JSON.parse(sessionStorage.getItem(TOKENS) || "{}");
      return value && typeof value === "object" ? value : {};
    } catch {
      return {};
    }
  }

  function saveToken(accountId, token) {
    const all = tokens();
    all[accountId] = token;
    sessionStorage.setItem(TOKENS, JSON.stringify(all));
    sessionStorage.setItem(CURRENT, accountId);
  }

  function tokenFor(accountId) {
    return accountId ? tokens()[accountId] || null : null;
  }

  /** The account this page is about: ?account_id=..., else the last one linked in this tab. */
  function currentAccountId() {
    const fromUrl = new URLSearchParams(location.search).get("account_id");
    if (fromUrl) {
      sessionStorage.setItem(CURRENT, fromUrl);
      return fromUrl;
    }
    return sessionStorage.getItem(CURRENT);
  }

  class ApiError extends Error {
    constructor(status, code, message) {
      super(message);
      this.status = status;
      this.code = code;
    }
  }

  /** Call /api/<path>; JSON in and out; throws ApiError with the server's {error: {code, message}}. */
  async function api(path, { method = "GET", token = null, body, params } = {}) {
    const url = new URL(`/api/${path}`, location.origin);
    for (const [key, value] of Object.entries(params || {})) {
      if (value !== null && value !== undefined && value !== "") url.searchParams.set(key, String(value));
    }
    const headers = { Accept: "application/json" };
    // Not Authorization: Static Web Apps overwrites it on proxied API calls.
    if (token) headers["X-Mailsync-Authorization"] = `Bearer ${token}`;
    if (body !== undefined) headers["Content-Type"] = "application/json";
    let response;
    try {
      response = await fetch(url, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
    } catch (error) {
      throw new ApiError(0, "network_error", "mailsync cannot be reached. Check your connection and try again.");
    }
    if (response.status === 204) return null;
    let data = null;
    try {
      data = await response.json();
    } catch {
      data = null;
    }
    if (!response.ok) {
      const error = (data && data.error) || {};
      throw new ApiError(response.status, error.code || `http_${response.status}`,
                         error.message || `${response.status} ${response.statusText}`);
    }
    return data;
  }

  /** Build an element; strings become text nodes (never HTML), so mail content cannot inject markup. */
  function el(tag, attrs = {}, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs)) {
      if (value === null || value === undefined || value === false) continue;
      if (key === "class") node.className = value;
      else if (key === "text") node.textContent = value;
      else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
      else if (key === "dataset") Object.assign(node.dataset, value);
      // An object of CSSOM properties, never a style attribute: the pages' CSP (style-src 'self')
      // blocks inline style attributes, but not properties set from our own script.
      else if (key === "style") Object.assign(node.style, value);
      else node.setAttribute(key, value === true ? "" : String(value));
    }
    for (const child of children.flat()) {
      if (child === null || child === undefined || child === false) continue;
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  }

  const timeOnly = new Intl.DateTimeFormat(undefined, { hour: "2-digit", minute: "2-digit" });
  const dateAndTime = new Intl.DateTimeFormat(undefined, { year: "numeric", month: "short", day: "numeric",
                                                           hour: "2-digit", minute: "2-digit" });

  /** A received time the way a mail client shows it: the time today, the date otherwise. */
  function formatReceived(iso) {
    if (!iso) return "";
    const when = new Date(iso);
    if (Number.isNaN(when.getTime())) return "";
    return when.toDateString() === new Date().toDateString() ? timeOnly.format(when) : dateAndTime.format(when);
  }

  const number = new Intl.NumberFormat();
  function formatNumber(value) {
    return value === null || value === undefined ? "–" : number.format(value);
  }

  /** A sync's progress bar and its "indexed / expected" text (indeterminate until the folder sizes are known). */
  function showSyncProgress(bar, count, indexed, expected, synced) {
    if (synced) {
      bar.max = 1;
      bar.value = 1;
    } else if (expected > 0) {
      bar.max = expected;
      bar.value = Math.min(indexed, expected);
    } else {
      bar.removeAttribute("value");
    }
    count.textContent = expected > 0 ? `${formatNumber(indexed)} / ${formatNumber(expected)}` : formatNumber(indexed);
  }

  // The OAuth and account error codes the page may see, in words a person understands.
  const READABLE = {
    access_denied: "The sign-in was cancelled, or access to the mailbox was not granted.",
    consent_required: "Access to the mailbox was not granted.",
    reauth_required: "Outlook needs you to sign in again: the permission mailsync had was revoked or has expired.",
    imap_reauth_required: "The IMAP server refused the saved password. Enter the current password to link it again.",
    login_expired: "The sign-in took too long and expired.",
    invalid_grant: "The sign-in could not be completed (the code was already used or has expired).",
    address_in_use: "This mailbox is already linked to another mailsync account.",
    wrong_mailbox: "You signed in with a different mailbox than the one linked to this account.",
    temporarily_unavailable: "mailsync could not start the sync just now. Try again in a moment.",
    account_not_found: "This account no longer exists.",
    network_error: "mailsync cannot be reached. Check your connection and try again.",
  };

  function readableError(code, description) {
    return READABLE[code] || description || "Something went wrong while linking the account.";
  }

  return {
    ApiError, api, currentAccountId, el, formatNumber, formatReceived, readableError, saveToken, showSyncProgress,
    tokenFor,
  };
})();
