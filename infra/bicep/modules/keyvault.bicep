// Key Vault for the three secrets mailsync needs. Authorisation is Azure RBAC
// (no access policies); the Function App reads the secrets through Key Vault
// references in its app settings, resolved with its user-assigned identity,
// which holds "Key Vault Secrets User" on this vault and nothing more.

@description('Key Vault name (3-24 characters, globally unique).')
@minLength(3)
@maxLength(24)
param name string

@description('Region of the vault.')
param location string

@description('Tags for the vault.')
param tags object

@description('Object id of the Function App identity that reads the secrets.')
param principalId string

@description('Purge protection: deleted secrets cannot be purged during the retention period. Cannot be turned off once on.')
param enablePurgeProtection bool

@description('Days a deleted vault or secret stays recoverable.')
@minValue(7)
@maxValue(90)
param softDeleteRetentionInDays int

@secure()
@description('Client secret of the Entra ID app registration (MS_CLIENT_SECRET).')
param msClientSecret string

@secure()
@description('Elasticsearch API key (ELASTICSEARCH_API_KEY).')
param elasticsearchApiKey string

@secure()
@description('Token-encryption keys, kid:base64key[,...] (TOKEN_ENCRYPTION_KEYS).')
param tokenEncryptionKeys string

@secure()
@description('Keys and certificates for change notifications with resource data, PEM or base64 of it (NOTIFICATION_CERTIFICATES).')
param notificationCertificates string

var keyVaultSecretsUserRole = '4633458b-17de-408a-b874-0445c86b69e6'

resource vault 'Microsoft.KeyVault/vaults@2024-11-01' = {
  name: name
  location: location
  tags: tags
  properties: {
    tenantId: subscription().tenantId
    sku: {
      family: 'A'
      name: 'standard'
    }
    enableRbacAuthorization: true
    enableSoftDelete: true
    softDeleteRetentionInDays: softDeleteRetentionInDays
    // The API rejects an explicit false; leaving it out means "off".
    enablePurgeProtection: enablePurgeProtection ? true : null
    publicNetworkAccess: 'Enabled'
    networkAcls: {
      defaultAction: 'Allow'
      bypass: 'AzureServices'
    }
  }
}

resource msClientSecretEntry 'Microsoft.KeyVault/vaults/secrets@2024-11-01' = {
  parent: vault
  name: 'ms-client-secret'
  properties: {
    value: msClientSecret
    contentType: 'Entra ID app registration client secret'
  }
}

resource elasticsearchApiKeyEntry 'Microsoft.KeyVault/vaults/secrets@2024-11-01' = {
  parent: vault
  name: 'elasticsearch-api-key'
  properties: {
    value: elasticsearchApiKey
    contentType: 'Elasticsearch API key (base64 id:key)'
  }
}

resource tokenEncryptionKeysEntry 'Microsoft.KeyVault/vaults/secrets@2024-11-01' = {
  parent: vault
  name: 'token-encryption-keys'
  properties: {
    value: tokenEncryptionKeys
    contentType: 'kid:base64key[,kid:base64key...]; the first key encrypts'
  }
}

resource notificationCertificatesEntry 'Microsoft.KeyVault/vaults/secrets@2024-11-01' = {
  parent: vault
  name: 'notification-certificates'
  properties: {
    value: notificationCertificates
    contentType: 'RSA private keys and certificates (PEM, or base64 of it); the first certificate is current'
  }
}

resource secretsAccess 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(vault.id, principalId, keyVaultSecretsUserRole)
  scope: vault
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', keyVaultSecretsUserRole)
    principalId: principalId
    principalType: 'ServicePrincipal'
    description: 'mailsync: Key Vault references in app settings'
  }
}

@description('Vault name, for Key Vault references.')
output name string = vault.name

@description('Secret names, for Key Vault references.')
output secretNames object = {
  msClientSecret: msClientSecretEntry.name
  elasticsearchApiKey: elasticsearchApiKeyEntry.name
  tokenEncryptionKeys: tokenEncryptionKeysEntry.name
  notificationCertificates: notificationCertificatesEntry.name
}
