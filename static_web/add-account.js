// Add-account page: choose the provider; Outlook starts linking ("Connect Outlook") and, back from
// Microsoft's sign-in, follows the account: linking → connected as <address> → syncing → synced, or
// a readable error with a retry button. IMAP links at once through the form in imap-form.js.
"use strict";

(() => {
  const { api, currentAccountId, formatNumber, readableError, saveToken, showSyncProgress, tokenFor } = window.Mailsync;
  const $ = (id) => document.getElementById(id);
  const POLL_MS = 1000;
  const STEPS = ["linking", "connected", "syncing", "synced"];
  let sandboxMailUrl = null;

  async function showSandboxNote() {
    try {
      const config = await api("config");
      if (config.imap_allow_insecure) window.MailsyncImapForm.offerInsecure();
      if (config.sandbox && config.sandbox_mail_url) {
        sandboxMailUrl = config.sandbox_mail_url;
        $("sandbox-link").href = sandboxMailUrl;
        $("sandbox-note").hidden = false;
      }
    } catch {
      // The note is a courtesy; the page works without it.
    }
  }

  /** Start linking: a new account, or (accountId given) sign in again for an existing one. */
  async function startLinking(accountId, button, errorBox) {
    button.disabled = true;
    errorBox.hidden = true;
    const body = { provider: "outlook", return_url: location.origin + location.pathname };
    let token = null;
    if (accountId) {
      token = tokenFor(accountId);
      body.account_id = accountId;
    }
    try {
      const result = await api("accounts", { method: "POST", body, token });
      if (result.access_token) saveToken(result.account_id, result.access_token);
      location.assign(result.authorize_url);
    } catch (error) {
      errorBox.textContent = `Could not start the sign-in: ${error.message}`;
      errorBox.hidden = false;
      button.disabled = false;
      button.focus();
    }
  }

  function markSteps(current, failed) {
    const index = STEPS.indexOf(current);
    for (const item of document.querySelectorAll(".steps li")) {
      const position = STEPS.indexOf(item.dataset.step);
      item.classList.toggle("done", position < index || (current === "synced" && position === index));
      item.classList.toggle("current", position === index && current !== "synced" && !failed);
      item.classList.toggle("failed", position === index && Boolean(failed));
      if (position === index) item.setAttribute("aria-current", "step");
      else item.removeAttribute("aria-current");
    }
  }

  function setState(state, text) {
    const box = $("account-state");
    box.dataset.state = state;
    box.textContent = text;
  }

  function showProgress(sync) {
    const box = $("account-progress");
    if (!sync) {
      box.hidden = true;
      return;
    }
    showSyncProgress($("account-bar"), $("account-progress-count"), sync.messages_indexed || 0,
                     sync.messages_expected || 0, sync.phase === "synced");
    box.hidden = false;
  }

  function showError(text, retryLabel) {
    const box = $("account-error");
    box.textContent = text;
    box.hidden = false;
    const retry = $("retry");
    retry.textContent = retryLabel;
    retry.hidden = false;
  }

  /** Render one GET /api/accounts/{id} answer; returns true while there is more to wait for. */
  function render(account, callbackError) {
    const sync = account.sync || null;
    const who = account.address ? `${account.display_name ? account.display_name + " " : ""}<${account.address}>` : "";
    $("account-error").hidden = true;
    $("retry").hidden = true;
    $("open-data").hidden = true;
    if (sandboxMailUrl && account.address) {
      $("sandbox-link").href = `${sandboxMailUrl}?user=${encodeURIComponent(account.address)}`;
    }
    switch (account.status) {
      case "linking":
        if (callbackError) {
          markSteps("linking", true);
          setState("error", "The account is not linked.");
          showError(readableError(callbackError.code, callbackError.description), "Try again");
          return false;
        }
        markSteps("linking");
        setState("linking", "Linking… waiting for the Microsoft sign-in to finish.");
        showProgress(null);
        return true;
      case "syncing": {
        const started = sync && (sync.messages_indexed > 0 || ["initial", "resync"].includes(sync.phase));
        markSteps(started ? "syncing" : "connected");
        setState(started ? "syncing" : "connected",
                 started ? `Connected as ${who}. Syncing: ${formatNumber(sync.messages_indexed)} messages so far, `
                           + `${sync.folders_done} of ${sync.folders_total} folders done.`
                         : `Connected as ${who}. Starting the initial sync…`);
        showProgress(sync);
        $("open-data").hidden = false;
        return true;
      }
      case "synced":
        markSteps("synced");
        setState("synced", `Synced: ${who}, ${formatNumber(sync ? sync.messages_indexed : null)} messages. `
                           + `Changes made in ${account.provider === "imap" ? "the mailbox" : "Outlook"} now appear `
                           + "on the mail page as they happen.");
        showProgress(sync);
        $("open-data").hidden = false;
        return false;
      case "reauth_required":
        markSteps("connected", true);
        setState("reauth_required", `Reauthorization required for ${who || "this account"}.`);
        if (account.provider === "imap") {
          // No sign-in page to go back to: the same form, with the account id and the new password.
          showError(readableError("imap_reauth_required", account.error), "Enter the new password");
          $("retry").onclick = () => {
            chooseProvider("imap");
            window.MailsyncImapForm.relink(account.account_id);
          };
          return false;
        }
        showError(readableError("reauth_required", account.error), "Sign in again");
        return false;
      default: {
        markSteps("linking", true);
        setState("error", "The account could not be linked.");
        const code = callbackError ? callbackError.code : null;
        showError(code ? readableError(code, account.error) : (account.error || readableError(null)), "Try again");
        return false;
      }
    }
  }

  async function follow(accountId, callbackError) {
    $("account").hidden = false;
    $("open-data").href = `data.html?account_id=${encodeURIComponent(accountId)}`;
    $("nav-data").href = $("open-data").href;
    $("retry").onclick = () => startLinking(accountId, $("retry"), $("account-error"));
    const token = tokenFor(accountId);
    if (!token) {
      markSteps("linking", true);
      setState("error", "This browser tab has no access token for that account.");
      showError("Access tokens are kept only in the tab that connected the account. Connect it again.",
                "Connect again");
      $("retry").onclick = () => startLinking(null, $("retry"), $("account-error"));
      return;
    }
    let failures = 0;
    for (;;) {
      let more;
      try {
        more = render(await api(`accounts/${encodeURIComponent(accountId)}`, { token }), callbackError);
        failures = 0;
      } catch (error) {
        if (error.status === 401 || error.status === 404) {
          markSteps("linking", true);
          setState("error", "This account is not available.");
          showError(error.status === 404 ? readableError("account_not_found") : "The access token was refused.",
                    "Connect again");
          $("retry").onclick = () => startLinking(null, $("retry"), $("account-error"));
          return;
        }
        failures += 1;
        setState($("account-state").dataset.state || "linking", `Cannot reach mailsync (${error.message}); retrying…`);
        more = true;
      }
      if (!more) return;
      await new Promise((resolve) => setTimeout(resolve, Math.min(POLL_MS * 2 ** failures, 10000)));
    }
  }

  /** Show the chosen provider's section; the radio buttons are the one source of the choice. */
  function chooseProvider(provider) {
    for (const radio of document.querySelectorAll("input[name='provider']")) radio.checked = radio.value === provider;
    $("outlook-section").hidden = provider !== "outlook";
    $("imap-section").hidden = provider !== "imap";
  }

  document.addEventListener("DOMContentLoaded", () => {
    window.MailsyncImapForm.init();
    for (const radio of document.querySelectorAll("input[name='provider']")) {
      radio.addEventListener("change", () => chooseProvider(radio.value));
    }
    chooseProvider(document.querySelector("input[name='provider']:checked").value);
    showSandboxNote();
    const connect = $("connect");
    connect.addEventListener("click", () => startLinking(null, connect, $("connect-error")));
    const params = new URLSearchParams(location.search);
    const accountId = params.get("account_id");
    if (accountId) {
      currentAccountId();   // remembers it for the mail page
      const code = params.get("error");
      follow(accountId, code ? { code, description: params.get("error_description") } : null);
    }
  });
})();
