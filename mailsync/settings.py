"""Configuration, read once from the environment.

``Settings.from_env()`` is the only place in the project that reads
environment variables. Everything else receives a ``Settings`` (or the
few values it needs) through its constructor. Names match what Azure
Functions app settings use, so ``local.settings.json``'s ``Values`` and the
Bicep templates fill the same keys.
"""

from __future__ import annotations

import base64
import os
from collections.abc import Mapping
from dataclasses import dataclass, field

from mailsync.errors import ConfigurationError

SANDBOX_DEFAULT_URL = "http://127.0.0.1:7081"


def _flag(value: str | None, default: bool) -> bool:
    if value is None or value == "":
        return default
    return value.strip().lower() in {"1", "true", "yes", "on"}


def _int(env: Mapping[str, str], name: str, default: int) -> int:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError as exc:
        raise ConfigurationError(f"{name} must be an integer, got {raw!r}") from exc


def _float(env: Mapping[str, str], name: str, default: float) -> float:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        return float(raw)
    except ValueError as exc:
        raise ConfigurationError(f"{name} must be a number, got {raw!r}") from exc


def _list(raw: str | None) -> tuple[str, ...]:
    if not raw:
        return ()
    return tuple(part.strip() for part in raw.split(",") if part.strip())


def _keys(raw: str | None) -> tuple[tuple[str, bytes], ...]:
    """Parse ``kid:base64key[,kid:base64key...]``; the first key encrypts, all decrypt."""
    keys: list[tuple[str, bytes]] = []
    for item in _list(raw):
        kid, sep, b64 = item.partition(":")
        if not sep or not kid:
            raise ConfigurationError("TOKEN_ENCRYPTION_KEYS entries must look like kid:base64key")
        try:
            key = base64.b64decode(b64, validate=True)
        except ValueError as exc:
            raise ConfigurationError(f"TOKEN_ENCRYPTION_KEYS key {kid!r} is not base64") from exc
        if len(key) not in (16, 24, 32):
            raise ConfigurationError(f"TOKEN_ENCRYPTION_KEYS key {kid!r} must be 128, 192 or 256 bits")
        keys.append((kid, key))
    return tuple(keys)


def _proxy_configured(env: Mapping[str, str]) -> bool:
    """True when a proxy variable is set (urllib's rule: a name ending in ``_proxy``, any case, non-empty)."""
    return any(value and name.lower().endswith("_proxy") for name, value in env.items())


@dataclass(frozen=True)
class Settings:
    """Every setting mailsync reads. Frozen: pass it down, never mutate it."""

    # Azure Storage (queues + tables). Local: a connection string (Azurite).
    # Azure: identity-based, AzureWebJobsStorage__accountName (+ __clientId).
    storage_connection_string: str | None = None
    storage_account_name: str | None = None
    storage_client_id: str | None = None
    sync_queue_name: str = "mailsync-sync"
    table_prefix: str = "mailsync"

    # Search store. SEARCH_ENGINE: auto (ask the server), opensearch or elasticsearch.
    elasticsearch_url: str | None = None
    search_engine: str = "auto"
    elasticsearch_api_key: str | None = field(default=None, repr=False)
    # Elasticsearch only: send plain application/json instead of the vendor
    # compatible-with type (Elasticsearch 8/9 accept both; proxies may not).
    elasticsearch_plain_json: bool = True
    index_prefix: str = "mailsync"
    store_body_text: bool = True
    body_text_max_chars: int = 32_000
    # Bulk chunks are bounded by both (see docs/store.md for the measurements).
    elasticsearch_bulk_docs: int = 1_000
    elasticsearch_bulk_bytes: int = 8 * 1024 * 1024
    # _bulk requests of one write in flight at once (see docs/store.md for the measurements).
    elasticsearch_bulk_writers: int = 2
    # Primary shards of a new index; accounts are spread by routing.
    elasticsearch_shards: int = 1
    # Replicas of a new index; None keeps the cluster's default (1). The embedded single
    # node sets 0: it has nowhere to put a replica, so 1 only leaves every index yellow.
    elasticsearch_replicas: int | None = None

    # Microsoft identity platform / Graph.
    ms_client_id: str | None = None
    ms_client_secret: str | None = field(default=None, repr=False)
    ms_tenant: str = "common"
    # When set, every login.microsoftonline.com / graph.microsoft.com call is
    # routed to this local Graph sandbox instead (no app registration needed).
    graph_sandbox_url: str | None = None
    public_base_url: str = "http://127.0.0.1:7071"
    return_url_allowlist: tuple[str, ...] = ()

    # Secrets at rest: kid:base64key pairs; the first one encrypts.
    token_encryption_keys: tuple[tuple[str, bytes], ...] = field(default=(), repr=False)
    # Rich change notifications (mailsync.monitoring.resource_data): PEM private keys and their RSA
    # certificates, the first certificate current. None: a development one in sandbox mode, else none.
    notification_certificates: str | None = field(default=None, repr=False)

    # Sync engine.
    # Short: the live page hears about an invocation's progress when it ends.
    sync_time_budget_s: float = 20.0
    graph_page_size: int = 500
    # Outlook keeps only the newest few delta links of a folder (3 in the reports): the engine
    # never holds a saved link older than that (mailsync/sync/pipeline.py, the read-ahead window).
    delta_links_kept: int = 3
    graph_max_concurrency: int = 4
    folder_lease_s: float = 300.0
    first_screen_messages: int = 50
    poll_interval_s: int = 900
    subscription_renew_before_s: int = 6 * 3600

    # Change monitoring (mailsync.monitoring; see docs/change-monitoring.md).
    subscription_lifetime_s: int = 4230 * 60     # Graph's maximum for Outlook messages
    notify_coalesce_s: int = 0                   # extra queue delay for NOTIFIED jobs (0: measured best)
    notify_confirm_s: int = 10                   # a job only confirming stored notified states waits this long
    notify_max_ids: int = 100                    # message ids kept per account before "all folders"
    poll_tick_s: int = 60                        # period of the poll_scheduler timer
    poll_interval_subscribed_s: int = 6 * 3600   # safety sweep of accounts with a healthy webhook; 0 = off
    store_resync_per_s: float = 10.0             # accounts whose resync starts per second after a store loss

    # IMAP accounts (mailsync.providers.imap; see docs/imap.md).
    imap_page_size: int = 1000                   # messages per UID FETCH page
    imap_timeout_s: float = 20.0                 # connect and read timeout
    imap_allow_insecure: bool = False            # allow "security": "none" (plaintext) — tests / local dev only
    imap_poll_concurrency: int = 8               # STATUS polls of IMAP accounts in flight per timer tick
    # Exceptions to the outbound address policy (mailsync.security.outbound): CIDRs, addresses or
    # host names a user-supplied IMAP host may resolve into. Empty in production; tests and local
    # development list their loopback Dovecot.
    imap_allowed_hosts: tuple[str, ...] = ()
    imap_verify_concurrency: int = 4             # login checks of POST /api/accounts in flight per process
    imap_verify_timeout_s: float = 5.0           # login check: connect + greeting timeout (later reads: imap_timeout_s)

    # Realtime.
    signalr_hub: str = "mailsync"
    # The SignalR service the page's negotiate hands out (mailsync.realtime.connection_info): a
    # connection string with an AccessKey locally (the devhost), identity-based in Azure
    # (AzureSignalRConnectionString__serviceUri + __clientId, access keys disabled).
    signalr_connection_string: str | None = field(default=None, repr=False)
    signalr_service_uri: str | None = None
    signalr_client_id: str | None = None

    # Outbound HTTP settings of the environment, read here once. requests (``Session.trust_env``)
    # and the Azure SDK's transport (``use_env_settings``) otherwise read the environment on
    # *every* request: two scans of all of os.environ for proxy variables, the CA bundle variables
    # and a look for ~/.netrc. That was the largest single CPU item of a mailbox change (~17.5
    # scans per change, 1-3 ms each on a loaded machine; docs/scaling.md). So: with no proxy
    # variable at start-up (Azure Functions, local runs) the clients are told not to read the
    # environment and get the CA bundle from here (``http_clients_read_env``); with one, they keep
    # reading it per request as before (requests applies no_proxy only in that mode).
    http_proxy_configured: bool = False
    http_ca_bundle: str | None = None            # REQUESTS_CA_BUNDLE or CURL_CA_BUNDLE (requests' order)

    # HTTP front door.
    max_body_bytes: int = 1_000_000
    # How many proxies of ours append to X-Forwarded-For: 1 = the Functions front end (or the devhost),
    # 2 = behind the Static Web App as well (mailsync/security/client_ip.py).
    trusted_proxy_hops: int = 1

    # Limits on anonymous work, per client IP (IPv6: per /64); a count of 0 turns one off (docs/security.md).
    rate_limit_new_accounts: int = 10              # new accounts ...
    rate_limit_new_accounts_period_s: int = 3600   # ... per this many seconds (a token bucket: bursts up to the count)
    rate_limit_imap_attempts: int = 10             # IMAP logins tried while linking ...
    rate_limit_imap_attempts_period_s: int = 600   # ... per this many seconds
    linked_accounts_per_client_per_day: int = 10   # accounts actually linked per client per day
    stale_linking_s: int = 3600                    # never-linked accounts idle this long are deleted (hourly)
    log_format: str = "json"

    # Local state (sandbox-only development key, ...): never used in Azure.
    local_dir: str = ".local"

    @property
    def http_clients_read_env(self) -> bool:
        """Whether HTTP clients read proxies (and the CA bundle) from the environment per request."""
        return self.http_proxy_configured

    @property
    def http_verify(self) -> str | bool:
        """TLS verification for clients that do not read the environment: the CA bundle it named, else the default."""
        return self.http_ca_bundle or True

    @property
    def uses_graph_sandbox(self) -> bool:
        """True when no Microsoft app registration is configured (demo tenant)."""
        return self.graph_sandbox_url is not None

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        """Read the settings from ``env`` (default: ``os.environ``)."""
        e: Mapping[str, str] = os.environ if env is None else env
        client_id = e.get("MS_CLIENT_ID") or None
        sandbox = e.get("GRAPH_SANDBOX_URL") or None
        if client_id is None and sandbox is None:
            # No app registration: the Graph sandbox stands in for Outlook.
            sandbox = SANDBOX_DEFAULT_URL
        client_secret = e.get("MS_CLIENT_SECRET") or None
        if sandbox is not None and client_id is None:
            # The sandbox's built-in demo app registration (public values that
            # only open the local demo tenant). Imported here, where it is needed,
            # so the constants live once, beside the sandbox routing.
            from mailsync.auth.sandbox_routing import SANDBOX_CLIENT_ID, SANDBOX_CLIENT_SECRET
            client_id, client_secret = SANDBOX_CLIENT_ID, client_secret or SANDBOX_CLIENT_SECRET
        public_base_url = (e.get("PUBLIC_BASE_URL") or "http://127.0.0.1:7071").rstrip("/")
        allow = _list(e.get("RETURN_URL_ALLOWLIST")) or (public_base_url,)
        settings = cls(
            storage_connection_string=e.get("AzureWebJobsStorage") or None,
            storage_account_name=e.get("AzureWebJobsStorage__accountName") or None,
            storage_client_id=e.get("AzureWebJobsStorage__clientId") or None,
            sync_queue_name=e.get("SYNC_QUEUE_NAME") or "mailsync-sync",
            table_prefix=e.get("TABLE_PREFIX") or "mailsync",
            elasticsearch_url=e.get("ELASTICSEARCH_URL") or None,
            elasticsearch_api_key=e.get("ELASTICSEARCH_API_KEY") or None,
            search_engine=(e.get("SEARCH_ENGINE") or "auto").strip().lower(),
            elasticsearch_plain_json=_flag(e.get("ELASTICSEARCH_PLAIN_JSON"), True),
            index_prefix=e.get("ELASTICSEARCH_INDEX_PREFIX") or "mailsync",
            store_body_text=_flag(e.get("STORE_BODY_TEXT"), True),
            body_text_max_chars=_int(e, "BODY_TEXT_MAX_CHARS", 32_000),
            elasticsearch_bulk_docs=_int(e, "ELASTICSEARCH_BULK_DOCS", 1_000),
            elasticsearch_bulk_bytes=_int(e, "ELASTICSEARCH_BULK_BYTES", 8 * 1024 * 1024),
            elasticsearch_bulk_writers=_int(e, "ELASTICSEARCH_BULK_WRITERS", 2),
            elasticsearch_shards=_int(e, "ELASTICSEARCH_SHARDS", 1),
            elasticsearch_replicas=_int(e, "ELASTICSEARCH_REPLICAS", -1) if e.get("ELASTICSEARCH_REPLICAS") else None,
            ms_client_id=client_id,
            ms_client_secret=client_secret,
            ms_tenant=e.get("MS_TENANT") or "common",
            graph_sandbox_url=sandbox.rstrip("/") if sandbox else None,
            public_base_url=public_base_url,
            return_url_allowlist=allow,
            token_encryption_keys=_keys(e.get("TOKEN_ENCRYPTION_KEYS")),
            notification_certificates=e.get("NOTIFICATION_CERTIFICATES") or None,
            sync_time_budget_s=_float(e, "SYNC_TIME_BUDGET_S", 20.0),
            graph_page_size=_int(e, "GRAPH_PAGE_SIZE", 500),
            delta_links_kept=_int(e, "DELTA_LINKS_KEPT", 3),
            graph_max_concurrency=_int(e, "GRAPH_MAX_CONCURRENCY", 4),
            folder_lease_s=_float(e, "FOLDER_LEASE_S", 300.0),
            first_screen_messages=_int(e, "FIRST_SCREEN_MESSAGES", 50),
            poll_interval_s=_int(e, "POLL_INTERVAL_S", 900),
            subscription_renew_before_s=_int(e, "SUBSCRIPTION_RENEW_BEFORE_S", 6 * 3600),
            subscription_lifetime_s=_int(e, "SUBSCRIPTION_LIFETIME_S", 4230 * 60),
            notify_coalesce_s=_int(e, "NOTIFY_COALESCE_S", 0),
            notify_confirm_s=_int(e, "NOTIFY_CONFIRM_S", 10),
            notify_max_ids=_int(e, "NOTIFY_MAX_IDS", 100),
            poll_tick_s=_int(e, "POLL_TICK_S", 60),
            poll_interval_subscribed_s=_int(e, "POLL_INTERVAL_SUBSCRIBED_S", 6 * 3600),
            store_resync_per_s=_float(e, "STORE_RESYNC_PER_S", 10.0),
            imap_page_size=_int(e, "IMAP_PAGE_SIZE", 1000),
            imap_timeout_s=_float(e, "IMAP_TIMEOUT_S", 20.0),
            imap_allow_insecure=_flag(e.get("IMAP_ALLOW_INSECURE"), False),
            imap_poll_concurrency=_int(e, "IMAP_POLL_CONCURRENCY", 8),
            imap_allowed_hosts=_list(e.get("IMAP_ALLOWED_HOSTS")),
            imap_verify_concurrency=_int(e, "IMAP_VERIFY_CONCURRENCY", 4),
            imap_verify_timeout_s=_float(e, "IMAP_VERIFY_TIMEOUT_S", 5.0),
            signalr_hub=e.get("SIGNALR_HUB") or "mailsync",
            signalr_connection_string=e.get("AzureSignalRConnectionString") or None,
            signalr_service_uri=e.get("AzureSignalRConnectionString__serviceUri") or None,
            signalr_client_id=e.get("AzureSignalRConnectionString__clientId") or None,
            max_body_bytes=_int(e, "MAX_BODY_BYTES", 1_000_000),
            trusted_proxy_hops=_int(e, "TRUSTED_PROXY_HOPS", 1),
            rate_limit_new_accounts=_int(e, "RATE_LIMIT_NEW_ACCOUNTS", 10),
            rate_limit_new_accounts_period_s=_int(e, "RATE_LIMIT_NEW_ACCOUNTS_PERIOD_S", 3600),
            rate_limit_imap_attempts=_int(e, "RATE_LIMIT_IMAP_ATTEMPTS", 10),
            rate_limit_imap_attempts_period_s=_int(e, "RATE_LIMIT_IMAP_ATTEMPTS_PERIOD_S", 600),
            linked_accounts_per_client_per_day=_int(e, "LINKED_ACCOUNTS_PER_CLIENT_PER_DAY", 10),
            stale_linking_s=_int(e, "STALE_LINKING_S", 3600),
            log_format=e.get("LOG_FORMAT") or "json",
            local_dir=e.get("MAILSYNC_LOCAL_DIR") or ".local",
            http_proxy_configured=_proxy_configured(e),
            http_ca_bundle=e.get("REQUESTS_CA_BUNDLE") or e.get("CURL_CA_BUNDLE") or None,
        )
        settings.validate()
        return settings

    def validate(self) -> None:
        """Raise ConfigurationError for contradictory settings."""
        if self.ms_client_id and not self.ms_client_secret and not self.uses_graph_sandbox:
            raise ConfigurationError("MS_CLIENT_ID is set but MS_CLIENT_SECRET is not")
        if not 1 <= self.graph_max_concurrency <= 4:
            raise ConfigurationError("GRAPH_MAX_CONCURRENCY must be 1..4 (Graph allows 4 per mailbox)")
        if not 1 <= self.graph_page_size <= 1000:
            raise ConfigurationError("GRAPH_PAGE_SIZE must be 1..1000")
        if not 2 <= self.delta_links_kept <= 100:
            raise ConfigurationError("DELTA_LINKS_KEPT must be 2..100 (Outlook keeps about 3)")
        if not 1 <= self.imap_page_size <= 10_000 or self.imap_timeout_s <= 0 or self.imap_poll_concurrency < 1:
            raise ConfigurationError(
                "IMAP_PAGE_SIZE must be 1..10000, IMAP_TIMEOUT_S and IMAP_POLL_CONCURRENCY positive")
        if not 1 <= self.imap_verify_concurrency <= 64 or not 0 < self.imap_verify_timeout_s <= 60:
            raise ConfigurationError("IMAP_VERIFY_CONCURRENCY must be 1..64 and IMAP_VERIFY_TIMEOUT_S 0..60 s")
        if not 60 <= self.subscription_lifetime_s <= 4230 * 60:
            raise ConfigurationError("SUBSCRIPTION_LIFETIME_S must be 60..253800 (Graph's Outlook maximum)")
        if not 0 <= self.subscription_renew_before_s < self.subscription_lifetime_s:
            raise ConfigurationError("SUBSCRIPTION_RENEW_BEFORE_S must be shorter than SUBSCRIPTION_LIFETIME_S")
        if self.poll_interval_s < 1 or self.poll_tick_s < 1 or self.poll_interval_subscribed_s < 0:
            raise ConfigurationError("POLL_INTERVAL_S and POLL_TICK_S must be positive")
        if not self.store_resync_per_s > 0:
            raise ConfigurationError("STORE_RESYNC_PER_S must be positive")
        if not 0 <= self.notify_coalesce_s <= 60 or self.notify_max_ids < 1:
            raise ConfigurationError("NOTIFY_COALESCE_S must be 0..60 and NOTIFY_MAX_IDS positive")
        if not 0 <= self.notify_confirm_s <= 300:
            raise ConfigurationError("NOTIFY_CONFIRM_S must be 0..300")
        if min(self.rate_limit_new_accounts, self.rate_limit_imap_attempts,
               self.linked_accounts_per_client_per_day) < 0:
            raise ConfigurationError("RATE_LIMIT_* counts and LINKED_ACCOUNTS_PER_CLIENT_PER_DAY must be >= 0 (0: off)")
        if min(self.rate_limit_new_accounts_period_s, self.rate_limit_imap_attempts_period_s) < 1:
            raise ConfigurationError("RATE_LIMIT_*_PERIOD_S must be positive")
        if self.trusted_proxy_hops < 1 or self.stale_linking_s < 600:
            raise ConfigurationError("TRUSTED_PROXY_HOPS must be >= 1 and STALE_LINKING_S >= 600 "
                                     "(longer than a pending sign-in lives)")
        if self.search_engine not in ("auto", "opensearch", "elasticsearch"):
            raise ConfigurationError(
                f"SEARCH_ENGINE must be auto, opensearch or elasticsearch, got {self.search_engine!r}")
        if min(self.elasticsearch_bulk_docs, self.elasticsearch_shards) < 1 or self.elasticsearch_bulk_bytes < 65536:
            raise ConfigurationError(
                "ELASTICSEARCH_BULK_DOCS and ELASTICSEARCH_SHARDS must be positive, ELASTICSEARCH_BULK_BYTES >= 65536"
            )
        if not 1 <= self.elasticsearch_bulk_writers <= 16:
            raise ConfigurationError("ELASTICSEARCH_BULK_WRITERS must be 1..16")
        if self.elasticsearch_replicas is not None and self.elasticsearch_replicas < 0:
            raise ConfigurationError("ELASTICSEARCH_REPLICAS must be 0 or more (unset: the cluster's default)")
