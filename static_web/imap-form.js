// The IMAP form of the add-account page: check the fields, POST /api/accounts with
// {provider: "imap", host, port, security, username, password, display_name}, and on success
// store the access token and open the mail page, as the Outlook flow ends. The server tries the
// login before it links anything, so its 400s (wrong password, unreachable host, bad input) are
// shown next to the field they concern and the form stays filled — except the password.
// The password only ever travels in the POST body: never in a URL, the console or storage.
"use strict";

window.MailsyncImapForm = (() => {
  const { api, readableError, saveToken, tokenFor } = window.Mailsync;
  const $ = (id) => document.getElementById(id);
  const DEFAULT_PORTS = { tls: "993", starttls: "143", none: "143" };
  // Host names and IP literals, as mailsync/linking/imap.py accepts them.
  const HOST = /^(?=.{1,253}$)[A-Za-z0-9]([A-Za-z0-9-]{0,62}[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]{0,62}[A-Za-z0-9])?)*\.?$|^\[?[0-9a-fA-F:.]+\]?$/;
  const CONTROL = /[\u0000-\u001f]/;
  const FIELDS = ["host", "security", "port", "username", "password"];
  // Which field a server error is about, so the message sits next to it and focus goes there.
  const ERROR_FIELD = {
    imap_login_failed: "password",
    imap_unreachable: "host",
    imap_unsupported: "host",
    imap_tls_failed: "security",
    address_not_allowed: "host",
    insecure_imap_refused: "security",
    wrong_mailbox: "username",
  };
  const HINTS = {
    imap_login_failed: "Check the user name and password. Gmail and Fastmail need an app password.",
    imap_unreachable: "Check the server name, the port and the security setting.",
    imap_tls_failed: "Check the port and the security setting (993 is TLS, 143 is STARTTLS).",
    login_checks_busy: "Many logins are being checked right now; try again in a few seconds.",
    wrong_mailbox: "This account is linked to another mailbox; log in with that mailbox's user name.",
  };

  const input = (name) => $(`imap-${name}`);

  /** The client-side checks; returns {field: message} for every field that is wrong. */
  function validate(values) {
    const errors = {};
    if (!values.host) errors.host = "Enter the IMAP server's name, e.g. imap.example.com.";
    else if (!HOST.test(values.host)) errors.host = "This is not a server name or IP address.";
    if (!/^\d{1,5}$/.test(values.port) || Number(values.port) < 1 || Number(values.port) > 65535) {
      errors.port = "Enter a port from 1 to 65535.";
    }
    if (!values.username) errors.username = "Enter the user name (often the email address).";
    else if (CONTROL.test(values.username)) errors.username = "The user name holds characters that cannot be sent.";
    if (!values.password) errors.password = "Enter the password or app password.";
    else if (CONTROL.test(values.password)) errors.password = "The password holds characters that cannot be sent.";
    if (CONTROL.test(values.display_name)) errors.display_name = "The display name holds characters that cannot be sent.";
    return errors;
  }

  function values() {
    return {
      host: input("host").value.trim(),
      port: input("port").value.trim(),
      security: input("security").value,
      username: input("username").value.trim(),
      password: input("password").value,   // as typed: spaces may belong to it
      display_name: input("display-name").value.trim(),
    };
  }

  function clearErrors() {
    for (const name of FIELDS) {
      input(name).removeAttribute("aria-invalid");
      const box = $(`imap-${name}-error`);
      box.textContent = "";
      box.hidden = true;
    }
    $("imap-error").hidden = true;
  }

  function markField(name, text) {
    const field = input(name) || input("host");
    field.setAttribute("aria-invalid", "true");
    const box = $(`${field.id}-error`);
    if (box && text) {
      box.textContent = text;
      box.hidden = false;
    }
    return field;
  }

  /** Field errors from the client-side checks: each next to its field, focus on the first. */
  function showFieldErrors(errors) {
    let first = null;
    for (const name of [...FIELDS, "display_name"]) {
      if (!errors[name]) continue;
      const field = markField(name === "display_name" ? "display-name" : name, errors[name]);
      first = first || field;
    }
    const count = Object.keys(errors).length;
    showFormError(count === 1 ? "One field needs attention." : `${count} fields need attention.`);
    if (first) first.focus();
  }

  function showFormError(text) {
    const box = $("imap-error");
    box.textContent = text;
    box.hidden = false;
  }

  /** Which field an invalid_imap_settings message is about: it starts with the field's name. */
  function fieldOf(error) {
    if (ERROR_FIELD[error.code]) return ERROR_FIELD[error.code];
    const named = /^(host|port|security|username|password|display_name)\b/.exec(error.message || "");
    return named ? named[1] : null;
  }

  function showServerError(error) {
    const name = fieldOf(error);
    const text = error.code === "network_error" ? readableError(error.code) : error.message || readableError(null);
    const hint = HINTS[error.code];
    showFormError(hint ? `${text} ${hint}` : text);
    const field = name ? markField(name === "display_name" ? "display-name" : name, null) : null;
    // The password is never kept after a failed attempt; focus goes where the fix is.
    (field && field !== input("password") ? field : input("password")).focus();
  }

  function setBusy(busy) {
    const form = $("imap-form");
    form.setAttribute("aria-busy", String(busy));
    for (const control of form.querySelectorAll("input, select, button")) control.disabled = busy;
    $("imap-submit").textContent = busy ? "Checking the login…" : $("imap-submit").dataset.label;
    $("imap-busy").textContent = busy ? "Logging in to the IMAP server; this can take a few seconds." : "";
  }

  async function submit(event) {
    event.preventDefault();
    if ($("imap-form").getAttribute("aria-busy") === "true") return;
    clearErrors();
    const fields = values();
    const errors = validate(fields);
    if (Object.keys(errors).length) {
      showFieldErrors(errors);
      return;
    }
    const accountId = $("imap-account-id").value || null;
    const body = { provider: "imap", host: fields.host, port: Number(fields.port), security: fields.security,
                   username: fields.username, password: fields.password };
    if (fields.display_name) body.display_name = fields.display_name;
    if (accountId) body.account_id = accountId;
    setBusy(true);
    let result;
    try {
      result = await api("accounts", { method: "POST", body, token: accountId ? tokenFor(accountId) : null });
    } catch (error) {
      setBusy(false);
      input("password").value = "";
      showServerError(error);
      return;
    }
    input("password").value = "";
    if (result.access_token) saveToken(result.account_id, result.access_token);
    $("imap-busy").textContent = "Linked. Opening the mail page…";
    location.assign(`data.html?account_id=${encodeURIComponent(result.account_id)}`);
  }

  /** Keep the port on the security's default unless the user typed another one. */
  function followSecurity(previous) {
    const port = input("port");
    if (!port.value.trim() || port.value.trim() === DEFAULT_PORTS[previous]) {
      port.value = DEFAULT_PORTS[input("security").value];
    }
  }

  /** Offer "no encryption": only where the server says linking accepts it (a local test Dovecot). */
  function offerInsecure() {
    const security = input("security");
    if (security.querySelector("option[value='none']")) return;
    const option = document.createElement("option");
    option.value = "none";
    option.textContent = "None, unencrypted (local test servers only)";
    security.append(option);
  }

  /** Wire the form (at once, so a submit never falls through to the browser's own). */
  function init() {
    const security = input("security");
    $("imap-submit").dataset.label = $("imap-submit").textContent;
    let previous = security.value;
    security.addEventListener("change", () => {
      followSecurity(previous);
      previous = security.value;
    });
    $("imap-form").addEventListener("submit", submit);
  }

  /** Link an existing IMAP account again (after reauth_required): same form, with its account id. */
  function relink(accountId) {
    $("imap-account-id").value = accountId;
    $("imap-submit").dataset.label = "Link again";
    $("imap-submit").textContent = "Link again";
    clearErrors();
    showFormError(readableError("imap_reauth_required"));
    input("host").focus();
  }

  return { init, offerInsecure, relink, validate };
})();
