"""The composition root: builds the core services from Settings, once per process.

Blueprints call ``runtime()`` and take what they need. Adapters are created
lazily (first use) so an HTTP function that never touches the store does
not connect to it, and clients with connection pools are shared across
invocations of the same worker process. This, and the Settings it holds,
is the only process-wide state.
"""

from __future__ import annotations

import functools
from functools import cached_property
from typing import TYPE_CHECKING, Any

from mailsync.logs import configure_logging
from mailsync.settings import Settings

if TYPE_CHECKING:
    from mailsync.actions.service import MessageActionService
    from mailsync.auth.msal_app import MsalApp
    from mailsync.auth.token_provider import MsalTokenProvider
    from mailsync.linking.access import AccountAccess
    from mailsync.linking.browser_binding import BrowserBinding
    from mailsync.linking.service import LinkingService
    from mailsync.monitoring.client_state import ClientStates
    from mailsync.monitoring.delta_lag import DeltaLag
    from mailsync.monitoring.handler import MonitoringJobs
    from mailsync.monitoring.imap_poll import ImapStatusPoller
    from mailsync.monitoring.lifecycle import LifecycleReceiver
    from mailsync.monitoring.notifications import NotificationReceiver
    from mailsync.monitoring.polling import PollScheduler
    from mailsync.monitoring.recent_accounts import RecentAccounts
    from mailsync.monitoring.resource_data import NotificationKeys
    from mailsync.monitoring.subscriptions import SubscriptionManager
    from mailsync.monitoring.validation_tokens import ValidationTokens
    from mailsync.ports import LiveConnections, LiveSender
    from mailsync.providers.imap import ImapProviderFactory
    from mailsync.reading import MailReader
    from mailsync.realtime.live_channel import LiveChannel
    from mailsync.security.crypto import TokenCipher
    from mailsync.storage.accounts import TableAccountRepository
    from mailsync.storage.job_queue import AzureJobQueue
    from mailsync.storage.rate_limits import TableRateLimiter
    from mailsync.storage.subscriptions import TablePendingStore, TableSubscriptionStore
    from mailsync.storage.sync_table import SyncStateTable
    from mailsync.storage.tokens import TableTokenStore
    from mailsync.store.action_ledger import SearchActionLedger
    from mailsync.store.search_store import SearchStore
    from mailsync.sync.engine import SyncEngine
    from mailsync.sync.status import SyncStatus
    from mailsync.sync.worker import SyncWorker


class Runtime:
    """Lazily built adapters and services. Add one cached property per service."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    @cached_property
    def job_queue(self) -> AzureJobQueue:
        """The sync job queue (SYNC_QUEUE_NAME), created on first enqueue if missing."""
        from mailsync.storage.job_queue import AzureJobQueue

        return AzureJobQueue(self.settings)

    @cached_property
    def store(self) -> SearchStore:
        """The search store at ELASTICSEARCH_URL; missing indices are created on first use.

        If the store is down this raises StoreUnavailable and is not cached, so the next call retries.
        """
        from mailsync.store.search_store import SearchStore

        store = SearchStore.from_settings(self.settings)
        store.ensure_ready()
        return store

    # -- accounts and linking (docs/linking.md) ----------------------------------

    @cached_property
    def token_cipher(self) -> TokenCipher:
        """AES-GCM for secrets at rest (TOKEN_ENCRYPTION_KEYS; a local dev key only in sandbox mode)."""
        from mailsync.security.crypto import load_cipher

        return load_cipher(self.settings)

    def _linking_table(self, suffix: str) -> Any:
        from mailsync.storage.connection import table_client
        from mailsync.storage.table_errors import ensure_table

        # Few, quick retries: these serve HTTP requests that answer 503 + Retry-After instead.
        table = table_client(self.settings, suffix, retry_total=2, retry_backoff_factor=0.3)
        ensure_table(table)
        return table

    @cached_property
    def token_store(self) -> TableTokenStore:
        """Sealed token caches (and other credentials), one row per account and kind."""
        from mailsync.storage.tokens import TableTokenStore

        return TableTokenStore(self._linking_table("accounts"), self.token_cipher)

    @cached_property
    def accounts(self) -> TableAccountRepository:
        """Local accounts (``AccountRepository``), plus the address index and ``iter_accounts()``."""
        from mailsync.storage.accounts import TableAccountRepository

        return TableAccountRepository(self._linking_table("accounts"), self.token_store)

    @cached_property
    def account_access(self) -> AccountAccess:
        """``authenticate(account_id, bearer)``: 401 for a bad token, 404 for another account's."""
        from mailsync.linking.access import AccountAccess

        return AccountAccess(self.accounts)

    @cached_property
    def msal_app(self) -> MsalApp:
        from mailsync.auth.msal_app import MsalApp

        return MsalApp.from_settings(self.settings)

    @cached_property
    def token_provider(self) -> MsalTokenProvider:
        """Graph access tokens per account (``TokenProvider``); marks ``reauth_required`` when refused."""
        from mailsync.auth.token_provider import MsalTokenProvider

        return MsalTokenProvider(self.msal_app, self.token_store, self.accounts)

    @cached_property
    def _linking_job_queue(self) -> AzureJobQueue:
        # The same queue as job_queue, with few quick retries: the OAuth callback
        # waits on it, and a failure there is reported to the page (not retried for a minute).
        from mailsync.storage.connection import job_queue_client
        from mailsync.storage.job_queue import AzureJobQueue

        # (Storage queues' default retry waits 15 s, then 18 s: ~40 s before a failure is known.)
        client = job_queue_client(self.settings, self.settings.sync_queue_name, retry_total=2, initial_backoff=0,
                                  increment_base=1, random_jitter_range=1)
        return AzureJobQueue(self.settings, client=client)

    @cached_property
    def browser_binding(self) -> BrowserBinding:
        """The sign-in cookie: Secure when PUBLIC_BASE_URL is https, as long-lived as a pending sign-in."""
        from mailsync.linking.browser_binding import BrowserBinding
        from mailsync.linking.service import FLOW_TTL

        return BrowserBinding.for_base_url(self.settings.public_base_url, FLOW_TTL)

    @cached_property
    def linking(self) -> LinkingService:
        """Create / link / show / unlink accounts: POST /api/accounts, the OAuth callback, /api/accounts/{id}."""
        from mailsync.linking.imap import ImapLinker
        from mailsync.linking.limits import LinkingLimits
        from mailsync.linking.outlook import OutlookLinker
        from mailsync.linking.return_urls import ReturnUrlPolicy
        from mailsync.linking.service import LinkingService
        from mailsync.models import Provider
        from mailsync.storage.auth_flows import TableAuthFlowStore

        settings = self.settings
        redirect_uri = f"{settings.public_base_url}/api/oauth/callback"
        return LinkingService(
            accounts=self.accounts,
            tokens=self.token_store,
            flows=TableAuthFlowStore(self._linking_table("authflows"), self.token_cipher),
            access=self.account_access,
            jobs=self._linking_job_queue,
            return_urls=ReturnUrlPolicy.from_base(settings.return_url_allowlist, settings.public_base_url),
            linkers={Provider.OUTLOOK: OutlookLinker(self.msal_app, redirect_uri), Provider.IMAP: ImapLinker(settings)},
            store=(lambda: self.store) if settings.elasticsearch_url else None,
            sync_status=self.sync_status,
            # Built on the first unlink, not with the service: the subscription manager loads the
            # notification certificates (in sandbox mode it first makes an RSA key, 0.1-0.5 s of CPU),
            # which linking never needs; POST /api/accounts paid it before a new account's first job.
            subscriptions=lambda: self.subscription_registry,
            cleanups=(self.sync_state.delete_account,),  # the account's cursors and leases
            limits=LinkingLimits.from_settings(settings, self.rate_limiter),
        )

    @cached_property
    def rate_limiter(self) -> TableRateLimiter:
        """Per-client token buckets shared by every instance (table TABLE_PREFIX + "limits")."""
        from mailsync.storage.rate_limits import TableRateLimiter

        return TableRateLimiter(self._linking_table("limits"))

    # -- sync engine (docs/sync-engine.md) ----------------------------------------

    @cached_property
    def sync_state(self) -> SyncStateTable:
        """Folder cursors, leases, dirty flags and mailbox request slots (table TABLE_PREFIX + "sync")."""
        from mailsync.storage.connection import table_client
        from mailsync.storage.sync_table import SyncStateTable

        settings = self.settings
        state = SyncStateTable(table_client(settings, "sync"), lease_s=settings.folder_lease_s,
                               slot_ttl_s=2 * settings.sync_time_budget_s + 60.0)
        state.ensure_table()
        return state

    @cached_property
    def imap_providers(self) -> ImapProviderFactory:
        """IMAP sessions per account, from the sealed settings linking stored (docs/imap.md)."""
        from mailsync.linking.imap import SealedCredentials
        from mailsync.providers.imap import ImapProviderFactory

        return ImapProviderFactory(self.settings, SealedCredentials(self.token_store))

    @cached_property
    def sync_engine(self) -> SyncEngine:
        from mailsync.models import Provider
        from mailsync.providers.graph import GraphProviderFactory
        from mailsync.providers.router import ProviderRouter
        from mailsync.sync.engine import SyncEngine

        providers = ProviderRouter({Provider.OUTLOOK: GraphProviderFactory(self.settings, self.token_provider),
                                    Provider.IMAP: self.imap_providers})
        return SyncEngine(self.settings, accounts=self.accounts,
                          providers=providers,
                          store=self.store, state=self.sync_state, queue=self.job_queue,
                          recent=self.recent_accounts, lag=self.delta_lag)

    @cached_property
    def delta_lag(self) -> DeltaLag:
        """The delta lag this process's notified rounds met: the webhook delays NOTIFIED jobs past it."""
        from mailsync.monitoring.delta_lag import DeltaLag

        return DeltaLag()

    @cached_property
    def recent_accounts(self) -> RecentAccounts:
        """This process's recent account reads, shared by NOTIFIED jobs and their rounds' look-agains."""
        from mailsync.monitoring.recent_accounts import RecentAccounts

        return RecentAccounts(self.accounts)

    @cached_property
    def sync_worker(self) -> SyncWorker:
        """Job dispatch for functions/sync_worker: the engine's kinds, plus other parts' (one line each)."""
        from mailsync.sync.worker import SyncWorker

        worker = SyncWorker(self.sync_engine)
        from mailsync.monitoring.handler import MONITORING_KINDS

        engine = self.sync_engine
        # NOTIFIED runs small sets of folder rounds itself (no second queue hop), in this invocation.
        from mailsync.jobs import JobKind

        worker.register([JobKind.ACTION], lambda job, invocation: self.message_actions.run_job(job, invocation.events))
        worker.register([JobKind.WAKE], lambda job, invocation: None)   # its arrival was the point (WakingJobQueue)
        worker.register(MONITORING_KINDS, lambda job, invocation: self.monitoring_jobs.run(
            job, direct=lambda sync_job, account, rows: engine.run_in_place(
                sync_job, invocation.delivery, invocation.events, account=account, rows=rows),
            redelivered=invocation.delivery.dequeue_count > 1))
        return worker

    @cached_property
    def sync_status(self) -> SyncStatus:
        """``SyncStatusReader`` for GET /api/accounts/{id}."""
        from mailsync.sync.status import SyncStatus

        # The store's generation tells rows of a lost store from current ones (never "synced" over nothing).
        return SyncStatus(self.sync_state, lambda: self.store.generation())


    # -- change monitoring (docs/change-monitoring.md) -------------------------------

    @cached_property
    def _monitoring_table(self) -> Any:
        from mailsync.storage.connection import table_client
        from mailsync.storage.table_errors import ensure_table

        # Few, quick retries: the webhook must answer Graph within 3 s (503 makes Graph retry).
        table = table_client(self.settings, "subscriptions", retry_total=2, retry_backoff_factor=0.3)
        ensure_table(table)
        return table

    @cached_property
    def subscription_store(self) -> TableSubscriptionStore:
        from mailsync.storage.subscriptions import TableSubscriptionStore

        return TableSubscriptionStore(self._monitoring_table)

    @cached_property
    def pending_notifications(self) -> TablePendingStore:
        """Notifications awaiting their NOTIFIED job, in the account's sync partition (docs/change-monitoring.md)."""
        from mailsync.storage.connection import table_client
        from mailsync.storage.subscriptions import TablePendingStore
        from mailsync.storage.table_errors import ensure_table

        # Few, quick retries, like the subscription table's: the webhook must answer Graph within 3 s.
        table = table_client(self.settings, "sync", retry_total=2, retry_backoff_factor=0.3)
        ensure_table(table)
        return TablePendingStore(table, max_ids=self.settings.notify_max_ids)

    @cached_property
    def subscription_manager(self) -> SubscriptionManager:
        """One Graph subscription per account: create, renew, recreate, delete."""
        from mailsync.monitoring.graph_api import AccountGraphClients, GraphSubscriptionApi
        from mailsync.monitoring.subscriptions import SubscriptionManager

        api = GraphSubscriptionApi(AccountGraphClients(self.settings, self.token_provider))
        return SubscriptionManager(self.settings, self.subscription_store, api, self.accounts, self.job_queue,
                                   client_states=self.client_states, keys=self.notification_keys)

    @cached_property
    def subscription_registry(self) -> SubscriptionManager:
        """``SubscriptionRegistry`` for unlinking (the linking service looks it up by this name)."""
        return self.subscription_manager

    @cached_property
    def notification_receiver(self) -> NotificationReceiver:
        """POST /api/graph/webhook: authenticate items, coalesce per account, enqueue NOTIFIED."""
        from mailsync.monitoring.notifications import NotificationReceiver
        from mailsync.monitoring.notified_states import NotifiedStates

        # With resource data, the message states notifications carry go to the store and the page at once.
        states = NotifiedStates(lambda: self.store, lambda: self.live_sender) \
            if self.notification_keys is not None and self.validation_tokens is not None else None
        return NotificationReceiver(self.settings, self.subscription_store, self.accounts,
                                    self.pending_notifications, self.job_queue, client_states=self.client_states,
                                    lag=self.delta_lag, keys=self.notification_keys,
                                    tokens=self.validation_tokens, states=states)

    @cached_property
    def notification_keys(self) -> NotificationKeys | None:
        """Our certificates for rich notifications (the folder of new mail without a lookup), or None."""
        from mailsync.monitoring.resource_data import load_notification_keys

        return load_notification_keys(self.settings)

    @cached_property
    def validation_tokens(self) -> ValidationTokens | None:
        """Checks the validation tokens of POSTs with resource data (Microsoft's published keys)."""
        from mailsync.auth.published_keys import SigningKeys, http_keys_fetcher
        from mailsync.monitoring.validation_tokens import ValidationTokens

        if self.notification_keys is None or not self.settings.ms_client_id:
            return None
        return ValidationTokens(self.settings.ms_client_id, SigningKeys(http_keys_fetcher(self.settings)))

    @cached_property
    def client_states(self) -> ClientStates:
        """Signs subscriptions' clientStates, so the webhook authenticates without a table read."""
        from mailsync.monitoring.client_state import ClientStates
        from mailsync.security.crypto import secret_keys

        return ClientStates(secret_keys(self.settings))

    @cached_property
    def lifecycle_receiver(self) -> LifecycleReceiver:
        from mailsync.monitoring.lifecycle import LifecycleReceiver

        return LifecycleReceiver(self.subscription_store, self.accounts, self.job_queue)

    @cached_property
    def monitoring_jobs(self) -> MonitoringJobs:
        """NOTIFIED / SYNC_ACCOUNT / SUBSCRIPTION jobs (registered on the sync worker)."""
        from mailsync.monitoring.graph_api import AccountGraphClients, GraphMessageLocator
        from mailsync.monitoring.handler import MonitoringJobs

        locator = GraphMessageLocator(AccountGraphClients(self.settings, self.token_provider))
        return MonitoringJobs(self.pending_notifications, self.accounts, self.store, locator,
                              self.subscription_manager, self.job_queue, rows=self.sync_state.load,
                              recent=self.recent_accounts, lag=self.delta_lag.delay_s)

    @cached_property
    def imap_poller(self) -> ImapStatusPoller:
        """STATUS polling of IMAP accounts on the poll timer (mailsync.monitoring.imap_poll)."""
        from mailsync.monitoring.imap_poll import ImapStatusPoller

        return ImapStatusPoller(self.accounts, self.sync_state, self.imap_providers.connect, self.job_queue,
                                concurrency=self.settings.imap_poll_concurrency)

    @cached_property
    def poll_scheduler(self) -> PollScheduler:
        from mailsync.monitoring.polling import PollScheduler
        from mailsync.monitoring.store_watch import StoreWatch
        from mailsync.storage.connection import table_client
        from mailsync.storage.store_generation import TableGenerationLedger
        from mailsync.storage.table_errors import ensure_table

        ledger_table = table_client(self.settings, "sync")
        ensure_table(ledger_table)
        watch = StoreWatch(lambda: self.store, TableGenerationLedger(ledger_table), self.accounts, self.job_queue,
                           per_s=self.settings.store_resync_per_s, purge=lambda: self.action_ledger.purge())
        return PollScheduler(self.settings, self.accounts, self.subscription_store, self.job_queue,
                             store_watch=watch)

    # -- the web page: read API and live channel (docs/live-page.md) -------------------

    @cached_property
    def live_connections(self) -> LiveConnections:
        """Mints SignalR client connection info (AccessKey locally, managed identity in Azure)."""
        from mailsync.realtime.connection_info import connections_from_settings

        return connections_from_settings(self.settings)

    @cached_property
    def live_sender(self) -> LiveSender:
        """Sends SignalR messages from inside a function, through the service's REST API (the action functions:
        their optimistic rows reach the other pages before the function returns)."""
        from mailsync.realtime.live_sender import sender_from_settings

        return sender_from_settings(self.settings)

    @cached_property
    def live_channel(self) -> LiveChannel:
        """POST /api/negotiate: bearer token → connection info for that account's user id."""
        from mailsync.realtime.live_channel import LiveChannel

        return LiveChannel(self.account_access, self.live_connections)

    @cached_property
    def mail_reader(self) -> MailReader:
        """GET /api/accounts/{id}/mailboxes and /messages, through the store's read methods."""
        from mailsync.reading import MailReader

        return MailReader(self.account_access, lambda: self.store)

    # -- the client half: read a message, act on it (docs/live-page.md) ---------------------

    @cached_property
    def message_actions(self) -> MessageActionService:
        """GET/PATCH/DELETE /api/accounts/{id}/messages/{message_id}, bulk actions, and ACTION jobs."""
        from mailsync.actions.service import ActionsRouter, MessageActionService
        from mailsync.models import Provider
        from mailsync.providers.graph import GraphProviderFactory
        from mailsync.providers.graph_actions import GraphActionsFactory
        from mailsync.providers.imap_actions import ImapActionsFactory

        router = ActionsRouter({
            Provider.OUTLOOK: GraphActionsFactory(GraphProviderFactory(self.settings, self.token_provider),
                                                  self.token_provider),
            Provider.IMAP: ImapActionsFactory(self.imap_providers),
        })
        return MessageActionService(self.account_access, self.accounts, lambda: self.store, router,
                                    lambda: self.job_queue, ledger=lambda: self.action_ledger,
                                    epochs=self.sync_state.epochs, slots=lambda: self.sync_state,
                                    max_slots=self.settings.graph_max_concurrency)

    @cached_property
    def action_ledger(self) -> SearchActionLedger:
        """Per message, the latest user action on each field, beside the store's indices (docs/actions.md)."""
        from mailsync.store.action_ledger import SearchActionLedger

        return SearchActionLedger.of(self.store)


@functools.cache
def runtime() -> Runtime:
    """The process's Runtime (settings read once from the environment)."""
    settings = Settings.from_env()
    configure_logging(settings.log_format)
    return Runtime(settings)
