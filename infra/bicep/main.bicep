// mailsync on Azure: a Function App (Flex Consumption, Python 3.11) behind a
// Static Web App, with Storage (host, sync queue, tables), SignalR Service
// (Serverless), Key Vault, Log Analytics + Application Insights, and one
// user-assigned identity for every data-plane call. Elasticsearch is not
// created here: point elasticsearchUrl at Elastic Cloud on Azure or a cluster
// of your own. See docs/deploy.md.
//
//   azd up
//   az deployment group create -g <rg> -f infra/bicep/main.bicep -p environmentName=<name> ...
//
// The app settings assembled below are exactly the settings mailsync reads
// (mailsync/settings.py, plus the binding expressions under functions/);
// tests/infra checks the names and that every default here equals the code's.

targetScope = 'resourceGroup'

// --- Placement -------------------------------------------------------------

@minLength(1)
@maxLength(64)
@description('Environment name (azd: AZURE_ENV_NAME). Seeds the resource names and the azd-env-name tag.')
param environmentName string

@description('Region of everything but the Static Web App; it must offer the Flex Consumption plan.')
param location string = resourceGroup().location

@description('Region of the Static Web App (only a few regions host them).')
@allowed([
  'westus2'
  'centralus'
  'eastus2'
  'westeurope'
  'eastasia'
])
param staticWebAppLocation string = 'westeurope'

// --- Microsoft identity platform (see docs/deploy.md for the app registration)

@minLength(1)
@description('Application (client) id of the Entra ID app registration.')
param msClientId string

@secure()
@minLength(1)
@description('Client secret of that registration. Stored in Key Vault only.')
param msClientSecret string

@description('Sign-in audience: common, organizations, consumers or a tenant id.')
param msTenant string = 'common'

// --- Elasticsearch (not created here) ---------------------------------------

@minLength(1)
@description('HTTPS URL of the Elasticsearch cluster, e.g. https://<deployment>.es.<region>.azure.elastic-cloud.com')
param elasticsearchUrl string

@secure()
@minLength(1)
@description('Elasticsearch API key (the base64 "encoded" form). Stored in Key Vault only.')
param elasticsearchApiKey string

@description('Prefix of the index and alias names.')
param elasticsearchIndexPrefix string = 'mailsync'

@allowed([
  'auto'
  'opensearch'
  'elasticsearch'
])
@description('SEARCH_ENGINE: which client the store uses (opensearch-py or elasticsearch); auto asks the cluster (GET /).')
param searchEngine string = 'auto'

@description('Elasticsearch only: send application/json instead of the versioned Elasticsearch media type (harmless).')
param elasticsearchPlainJson bool = true

@minValue(1)
@description('ELASTICSEARCH_BULK_DOCS: most documents per bulk request.')
param elasticsearchBulkDocs int = 1000

@minValue(65536)
@description('ELASTICSEARCH_BULK_BYTES: most bytes per bulk request.')
param elasticsearchBulkBytes int = 8388608

@minValue(1)
@description('ELASTICSEARCH_SHARDS: primary shards of a newly created index (accounts spread by routing).')
param elasticsearchShards int = 1

@minValue(1)
@maxValue(16)
@description('ELASTICSEARCH_BULK_WRITERS: bulk requests of one write in flight at once.')
param elasticsearchBulkWriters int = 2

@description('ELASTICSEARCH_REPLICAS: number_of_replicas of newly created indices; empty keeps the cluster default.')
param elasticsearchReplicas string = ''

// --- Secrets at rest ----------------------------------------------------------

@secure()
@minLength(1)
@description('TOKEN_ENCRYPTION_KEYS: kid:base64key[,kid:base64key...], 128/192/256-bit keys; the first encrypts. Generate one with: echo "k1:$(openssl rand -base64 32)"')
param tokenEncryptionKeys string

@secure()
@minLength(1)
@description('NOTIFICATION_CERTIFICATES: RSA private keys (2048-4096 bits) and their certificates, PEM or base64 of the PEM, for Graph change notifications with resource data (the folder of new mail without a Graph lookup per message); the first certificate is current, keep an old one listed for a day after a rotation. Generate one with: python -m mailsync.monitoring.resource_data')
param notificationCertificates string

@description('Key Vault purge protection. Recommended in production; it cannot be turned off again.')
param keyVaultPurgeProtection bool = true

// --- Scale and tiers ----------------------------------------------------------

@minValue(40)
@maxValue(1000)
@description('Flex Consumption: most instances the app scales out to.')
param maximumInstanceCount int = 100

@allowed([
  512
  2048
  4096
])
@description('Flex Consumption: memory per instance (MB).')
param instanceMemoryMB int = 2048

@allowed([
  'Free_F1'
  'Standard_S1'
])
@description('SignalR Service tier: Free_F1 for trials, Standard_S1 for production.')
param signalRSku string = 'Free_F1'

@minValue(30)
@maxValue(730)
@description('Days Log Analytics keeps logs and traces.')
param logRetentionDays int = 30

// --- mailsync behaviour: defaults equal mailsync.settings' defaults -----------

@description('SYNC_QUEUE_NAME: the sync job queue (the host adds <name>-poison).')
param syncQueueName string = 'mailsync-sync'

@description('TABLE_PREFIX: prefix of every table name.')
param tablePrefix string = 'mailsync'

@description('SIGNALR_HUB: hub the live page connects to.')
param signalRHub string = 'mailsync'

@description('STORE_BODY_TEXT: keep a plain-text body excerpt in the store.')
param storeBodyText bool = true

@description('BODY_TEXT_MAX_CHARS: length of that excerpt.')
param bodyTextMaxChars int = 32000

@description('SYNC_TIME_BUDGET_S: seconds a worker pages before re-enqueueing a continuation.')
param syncTimeBudgetS int = 20

@minValue(1)
@maxValue(1000)
@description('GRAPH_PAGE_SIZE: messages per Graph delta page.')
param graphPageSize int = 500

@minValue(2)
@maxValue(100)
@description('DELTA_LINKS_KEPT: how many of a folder\'s newest delta links Outlook keeps (the engine reads ahead one fewer).')
param deltaLinksKept int = 3

@minValue(1)
@maxValue(4)
@description('GRAPH_MAX_CONCURRENCY: Graph requests in flight per mailbox (Graph allows 4).')
param graphMaxConcurrency int = 4

@description('FOLDER_LEASE_S: seconds a worker holds a folder lease.')
param folderLeaseS int = 300

@description('FIRST_SCREEN_MESSAGES: newest messages synced first so the list fills at once.')
param firstScreenMessages int = 50

@description('POLL_INTERVAL_S: polling fallback interval per account without a working webhook.')
param pollIntervalS int = 900

@description('POLL_TICK_S: period of the poll scheduler timer.')
param pollTickS int = 60

@description('POLL_INTERVAL_SUBSCRIBED_S: safety sweep of accounts with a healthy webhook (0 = off).')
param pollIntervalSubscribedS int = 21600

@minValue(1)
@description('STORE_RESYNC_PER_S: accounts whose resync starts per second after the search store was lost or restored.')
param storeResyncPerS int = 10

@minValue(60)
@maxValue(253800)
@description('SUBSCRIPTION_LIFETIME_S: Graph subscription lifetime (253800 s is the Outlook maximum).')
param subscriptionLifetimeS int = 253800

@description('SUBSCRIPTION_RENEW_BEFORE_S: renew subscriptions this long before they expire.')
param subscriptionRenewBeforeS int = 21600

@minValue(0)
@maxValue(60)
@description('NOTIFY_COALESCE_S: extra queue delay for notification jobs (0 measured best; the pending row coalesces).')
param notifyCoalesceS int = 0

@minValue(0)
@maxValue(300)
@description('NOTIFY_CONFIRM_S: how long a notification job waits that only confirms states the store already holds (the page was told at once).')
param notifyConfirmS int = 10

@minValue(1)
@description('NOTIFY_MAX_IDS: message ids kept per account before syncing all folders instead.')
param notifyMaxIds int = 100

@minValue(1)
@maxValue(10000)
@description('IMAP_PAGE_SIZE: messages per UID FETCH page for IMAP accounts.')
param imapPageSize int = 1000

@minValue(1)
@description('IMAP_TIMEOUT_S: IMAP connect and read timeout (seconds).')
param imapTimeoutS int = 20

@minValue(1)
@description('IMAP_POLL_CONCURRENCY: IMAP accounts polled at once per timer tick.')
param imapPollConcurrency int = 8

@minValue(1)
@maxValue(64)
@description('IMAP_VERIFY_CONCURRENCY: IMAP login checks of POST /api/accounts in flight per instance (more: 503).')
param imapVerifyConcurrency int = 4

@minValue(1)
@maxValue(60)
@description('IMAP_VERIFY_TIMEOUT_S: connect and greeting timeout of an IMAP login check (seconds; later reads use IMAP_TIMEOUT_S).')
param imapVerifyTimeoutS int = 5

@description('MAX_BODY_BYTES: largest HTTP request body accepted.')
param maxBodyBytes int = 1000000

@minValue(1)
@description('TRUSTED_PROXY_HOPS: proxies of ours that append to X-Forwarded-For; main.parameters.json sets 2: the Static Web App (which forwards /api/*) and the Functions front end. Per-client limits count the entry left of them (docs/security.md). No default: the app alone (1) would be wrong here.')
param trustedProxyHops int

@minValue(0)
@description('RATE_LIMIT_NEW_ACCOUNTS: new accounts per client IP (IPv6: /64) per RATE_LIMIT_NEW_ACCOUNTS_PERIOD_S; 0 = off.')
param rateLimitNewAccounts int = 10

@minValue(1)
@description('RATE_LIMIT_NEW_ACCOUNTS_PERIOD_S: the period of RATE_LIMIT_NEW_ACCOUNTS (seconds).')
param rateLimitNewAccountsPeriodS int = 3600

@minValue(0)
@description('RATE_LIMIT_IMAP_ATTEMPTS: IMAP logins tried while linking, per client IP per RATE_LIMIT_IMAP_ATTEMPTS_PERIOD_S; 0 = off.')
param rateLimitImapAttempts int = 10

@minValue(1)
@description('RATE_LIMIT_IMAP_ATTEMPTS_PERIOD_S: the period of RATE_LIMIT_IMAP_ATTEMPTS (seconds).')
param rateLimitImapAttemptsPeriodS int = 600

@minValue(0)
@description('LINKED_ACCOUNTS_PER_CLIENT_PER_DAY: accounts linked per client IP per day; 0 = off.')
param linkedAccountsPerClientPerDay int = 10

@minValue(600)
@description('STALE_LINKING_S: never-linked accounts idle this long are deleted by the hourly maintenance timer.')
param staleLinkingS int = 3600

@allowed([
  'json'
  'text'
])
@description('LOG_FORMAT: json (one object per line) or text.')
param logFormat string = 'json'

// --- Names --------------------------------------------------------------------

var resourceToken = toLower(uniqueString(subscription().id, resourceGroup().id, environmentName))
var tags = {
  'azd-env-name': environmentName
}
// The tables mailsync keeps its state in (mailsync/storage), all named
// TABLE_PREFIX + suffix. The app also creates them when missing; creating
// them here makes the deployment show what it stores.
var tableSuffixes = [
  'accounts' // accounts, their tokens, address claims
  'authflows' // pending OAuth flows, keyed by state
  'sync' // per-folder cursors, leases and Graph request slots
  'subscriptions' // Graph subscriptions and pending notifications
  'limits' // per-client rate-limit buckets (anonymous account creation, IMAP attempts)
]

// --- Resources ----------------------------------------------------------------

module identity 'modules/identity.bicep' = {
  name: 'identity'
  params: {
    name: 'id-${resourceToken}'
    location: location
    tags: tags
  }
}

module monitoring 'modules/monitoring.bicep' = {
  name: 'monitoring'
  params: {
    workspaceName: 'log-${resourceToken}'
    appInsightsName: 'appi-${resourceToken}'
    location: location
    tags: tags
    retentionInDays: logRetentionDays
  }
}

module storage 'modules/storage.bicep' = {
  name: 'storage'
  params: {
    name: 'st${resourceToken}'
    location: location
    tags: tags
    syncQueueName: syncQueueName
    tableNames: [for suffix in tableSuffixes: '${tablePrefix}${suffix}']
    principalId: identity.outputs.principalId
  }
}

module keyVault 'modules/keyvault.bicep' = {
  name: 'keyvault'
  params: {
    name: 'kv-${resourceToken}'
    location: location
    tags: tags
    principalId: identity.outputs.principalId
    enablePurgeProtection: keyVaultPurgeProtection
    softDeleteRetentionInDays: 90
    msClientSecret: msClientSecret
    elasticsearchApiKey: elasticsearchApiKey
    tokenEncryptionKeys: tokenEncryptionKeys
    notificationCertificates: notificationCertificates
  }
}

module staticWeb 'modules/staticweb.bicep' = {
  name: 'staticweb'
  params: {
    name: 'stapp-${resourceToken}'
    location: staticWebAppLocation
    tags: tags
  }
}

// The pages, the OAuth callback and the Graph webhook all live on the Static
// Web App's origin; /api/* is proxied to the Function App.
var publicBaseUrl = 'https://${staticWeb.outputs.defaultHostname}'

module signalR 'modules/signalr.bicep' = {
  name: 'signalr'
  params: {
    name: 'sigr-${resourceToken}'
    location: location
    tags: tags
    sku: signalRSku
    allowedOrigins: [
      publicBaseUrl
    ]
    principalId: identity.outputs.principalId
  }
}

var vaultName = keyVault.outputs.name
var secretNames = keyVault.outputs.secretNames

// mailsync's settings; the platform's own (host storage, SignalR connection,
// Application Insights) are added by the functionapp module.
var appSettings = {
  SYNC_QUEUE_NAME: syncQueueName
  TABLE_PREFIX: tablePrefix
  ELASTICSEARCH_URL: elasticsearchUrl
  ELASTICSEARCH_API_KEY: '@Microsoft.KeyVault(VaultName=${vaultName};SecretName=${secretNames.elasticsearchApiKey})'
  SEARCH_ENGINE: searchEngine
  ELASTICSEARCH_PLAIN_JSON: elasticsearchPlainJson ? 'true' : 'false'
  ELASTICSEARCH_INDEX_PREFIX: elasticsearchIndexPrefix
  ELASTICSEARCH_BULK_DOCS: string(elasticsearchBulkDocs)
  ELASTICSEARCH_BULK_BYTES: string(elasticsearchBulkBytes)
  ELASTICSEARCH_SHARDS: string(elasticsearchShards)
  ELASTICSEARCH_BULK_WRITERS: string(elasticsearchBulkWriters)
  ELASTICSEARCH_REPLICAS: elasticsearchReplicas
  STORE_BODY_TEXT: storeBodyText ? 'true' : 'false'
  BODY_TEXT_MAX_CHARS: string(bodyTextMaxChars)
  MS_CLIENT_ID: msClientId
  MS_CLIENT_SECRET: '@Microsoft.KeyVault(VaultName=${vaultName};SecretName=${secretNames.msClientSecret})'
  MS_TENANT: msTenant
  PUBLIC_BASE_URL: publicBaseUrl
  RETURN_URL_ALLOWLIST: publicBaseUrl
  TOKEN_ENCRYPTION_KEYS: '@Microsoft.KeyVault(VaultName=${vaultName};SecretName=${secretNames.tokenEncryptionKeys})'
  NOTIFICATION_CERTIFICATES: '@Microsoft.KeyVault(VaultName=${vaultName};SecretName=${secretNames.notificationCertificates})'
  SYNC_TIME_BUDGET_S: string(syncTimeBudgetS)
  GRAPH_PAGE_SIZE: string(graphPageSize)
  DELTA_LINKS_KEPT: string(deltaLinksKept)
  GRAPH_MAX_CONCURRENCY: string(graphMaxConcurrency)
  FOLDER_LEASE_S: string(folderLeaseS)
  FIRST_SCREEN_MESSAGES: string(firstScreenMessages)
  POLL_INTERVAL_S: string(pollIntervalS)
  POLL_TICK_S: string(pollTickS)
  POLL_INTERVAL_SUBSCRIBED_S: string(pollIntervalSubscribedS)
  STORE_RESYNC_PER_S: string(storeResyncPerS)
  SUBSCRIPTION_LIFETIME_S: string(subscriptionLifetimeS)
  SUBSCRIPTION_RENEW_BEFORE_S: string(subscriptionRenewBeforeS)
  NOTIFY_COALESCE_S: string(notifyCoalesceS)
  NOTIFY_CONFIRM_S: string(notifyConfirmS)
  NOTIFY_MAX_IDS: string(notifyMaxIds)
  IMAP_PAGE_SIZE: string(imapPageSize)
  IMAP_TIMEOUT_S: string(imapTimeoutS)
  IMAP_POLL_CONCURRENCY: string(imapPollConcurrency)
  IMAP_VERIFY_CONCURRENCY: string(imapVerifyConcurrency)
  IMAP_VERIFY_TIMEOUT_S: string(imapVerifyTimeoutS)
  SIGNALR_HUB: signalRHub
  MAX_BODY_BYTES: string(maxBodyBytes)
  TRUSTED_PROXY_HOPS: string(trustedProxyHops)
  RATE_LIMIT_NEW_ACCOUNTS: string(rateLimitNewAccounts)
  RATE_LIMIT_NEW_ACCOUNTS_PERIOD_S: string(rateLimitNewAccountsPeriodS)
  RATE_LIMIT_IMAP_ATTEMPTS: string(rateLimitImapAttempts)
  RATE_LIMIT_IMAP_ATTEMPTS_PERIOD_S: string(rateLimitImapAttemptsPeriodS)
  LINKED_ACCOUNTS_PER_CLIENT_PER_DAY: string(linkedAccountsPerClientPerDay)
  STALE_LINKING_S: string(staleLinkingS)
  LOG_FORMAT: logFormat
}

module functionApp 'modules/functionapp.bicep' = {
  name: 'functionapp'
  params: {
    name: 'func-${resourceToken}'
    planName: 'plan-${resourceToken}'
    location: location
    tags: tags
    identityId: identity.outputs.id
    identityClientId: identity.outputs.clientId
    storageAccountName: storage.outputs.name
    blobEndpoint: storage.outputs.blobEndpoint
    deploymentContainerName: storage.outputs.deploymentContainerName
    appInsightsConnectionString: monitoring.outputs.connectionString
    signalRHostName: signalR.outputs.hostName
    maximumInstanceCount: maximumInstanceCount
    instanceMemoryMB: instanceMemoryMB
    appSettings: appSettings
  }
}

module staticWebApi 'modules/staticweb-api.bicep' = {
  name: 'staticweb-api'
  params: {
    staticWebAppName: staticWeb.outputs.name
    functionAppId: functionApp.outputs.id
    functionAppLocation: location
  }
}

// --- Outputs (azd stores them in the environment) ------------------------------

@description('The Function App itself (its /api is also reachable through the Static Web App).')
output FUNCTION_APP_URL string = functionApp.outputs.url

@description('The pages, and the PUBLIC_BASE_URL the app is configured with.')
output PUBLIC_BASE_URL string = publicBaseUrl

@description('Where Microsoft Graph delivers change notifications (PUBLIC_BASE_URL + /api/graph/webhook).')
output GRAPH_WEBHOOK_URL string = '${publicBaseUrl}/api/graph/webhook'

@description('Register this as a Web redirect URI of the Entra ID app (PUBLIC_BASE_URL + /api/oauth/callback).')
output ENTRA_REDIRECT_URI string = '${publicBaseUrl}/api/oauth/callback'

@description('Key Vault holding the client secret, the Elasticsearch API key and the token-encryption keys.')
output AZURE_KEY_VAULT_NAME string = vaultName

@description('Storage account (host, sync queue, tables).')
output AZURE_STORAGE_ACCOUNT_NAME string = storage.outputs.name
