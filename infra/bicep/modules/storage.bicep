// The storage account: Functions host storage, the sync queue and its poison
// queue, mailsync's tables, and the blob container the Flex Consumption plan
// deploys the app package from. Shared keys are off, so every caller
// authenticates with Entra ID; the Function App's identity gets one role per
// use below, each scoped to the service or container it serves.

@description('Storage account name (3-24 lowercase letters and digits, globally unique).')
@minLength(3)
@maxLength(24)
param name string

@description('Region of the account.')
param location string

@description('Tags for the account.')
param tags object

@description('Sync queue (SYNC_QUEUE_NAME). The host moves failed messages to `<name>-poison`.')
param syncQueueName string

@description('Tables mailsync keeps its state in (TABLE_PREFIX + accounts, tokens, ...).')
param tableNames array

@description('Object id of the Function App identity that is granted data access.')
param principalId string

// Flex Consumption reads the app package from this container; `azd deploy`
// (OneDeploy) writes it through the app, i.e. with the same identity.
var deploymentContainerName = 'app-package'
// The Functions host keeps its keys and its timer/singleton leases in these
// two containers. Created here so that the identity needs no account-wide
// blob role: the host only creates them when they are missing.
var hostLeasesContainerName = 'azure-webjobs-hosts'
var hostSecretsContainerName = 'azure-webjobs-secrets'

// Built-in role definition ids (https://learn.microsoft.com/azure/role-based-access-control/built-in-roles).
var roles = {
  storageBlobDataOwner: 'b7e6dc6d-f1e8-4753-8033-0f276bb0955b'
  storageBlobDataContributor: 'ba92f5b4-2d11-453d-a403-e96b0029c9fe'
  storageQueueDataContributor: '974c5e8b-45b9-4653-ba55-5f855dd0fb88'
  storageTableDataContributor: '0a9a7e1f-b9d0-4cc4-a60d-0319b160aaa3'
}

resource account 'Microsoft.Storage/storageAccounts@2024-01-01' = {
  name: name
  location: location
  tags: tags
  kind: 'StorageV2'
  sku: {
    name: 'Standard_LRS'
  }
  properties: {
    minimumTlsVersion: 'TLS1_2'
    supportsHttpsTrafficOnly: true
    allowBlobPublicAccess: false
    allowSharedKeyAccess: false
    defaultToOAuthAuthentication: true
    allowCrossTenantReplication: false
    publicNetworkAccess: 'Enabled'
    networkAcls: {
      defaultAction: 'Allow'
      bypass: 'AzureServices'
    }
  }
}

resource blobService 'Microsoft.Storage/storageAccounts/blobServices@2024-01-01' = {
  parent: account
  name: 'default'
}

resource deploymentContainer 'Microsoft.Storage/storageAccounts/blobServices/containers@2024-01-01' = {
  parent: blobService
  name: deploymentContainerName
  properties: {
    publicAccess: 'None'
  }
}

resource hostLeasesContainer 'Microsoft.Storage/storageAccounts/blobServices/containers@2024-01-01' = {
  parent: blobService
  name: hostLeasesContainerName
  properties: {
    publicAccess: 'None'
  }
}

resource hostSecretsContainer 'Microsoft.Storage/storageAccounts/blobServices/containers@2024-01-01' = {
  parent: blobService
  name: hostSecretsContainerName
  properties: {
    publicAccess: 'None'
  }
}

resource queueService 'Microsoft.Storage/storageAccounts/queueServices@2024-01-01' = {
  parent: account
  name: 'default'
}

resource syncQueue 'Microsoft.Storage/storageAccounts/queueServices/queues@2024-01-01' = {
  parent: queueService
  name: syncQueueName
}

resource poisonQueue 'Microsoft.Storage/storageAccounts/queueServices/queues@2024-01-01' = {
  parent: queueService
  name: '${syncQueueName}-poison'
}

resource tableService 'Microsoft.Storage/storageAccounts/tableServices@2024-01-01' = {
  parent: account
  name: 'default'
}

resource tables 'Microsoft.Storage/storageAccounts/tableServices/tables@2024-01-01' = [
  for tableName in tableNames: {
    parent: tableService
    name: tableName
  }
]

// Queue: the trigger peeks/deletes, the app enqueues continuations, the host
// creates and writes the poison queue. Scoped to the queue service, which
// holds exactly those two queues.
resource queueAccess 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(queueService.id, principalId, roles.storageQueueDataContributor)
  scope: queueService
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roles.storageQueueDataContributor)
    principalId: principalId
    principalType: 'ServicePrincipal'
    description: 'mailsync: sync queue and its poison queue'
  }
}

// Tables: entity reads and writes with ETag concurrency. Table names share a
// prefix, which RBAC cannot express, so the scope is the table service.
resource tableAccess 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(tableService.id, principalId, roles.storageTableDataContributor)
  scope: tableService
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roles.storageTableDataContributor)
    principalId: principalId
    principalType: 'ServicePrincipal'
    description: 'mailsync: account, token, cursor and subscription tables'
  }
}

resource deploymentAccess 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(deploymentContainer.id, principalId, roles.storageBlobDataContributor)
  scope: deploymentContainer
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roles.storageBlobDataContributor)
    principalId: principalId
    principalType: 'ServicePrincipal'
    description: 'Flex Consumption deployment package'
  }
}

// Storage Blob Data Owner is what Microsoft documents as the minimum for an
// identity-based AzureWebJobsStorage; here it covers one container each.
resource hostLeasesAccess 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(hostLeasesContainer.id, principalId, roles.storageBlobDataOwner)
  scope: hostLeasesContainer
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roles.storageBlobDataOwner)
    principalId: principalId
    principalType: 'ServicePrincipal'
    description: 'Functions host: timer and singleton leases'
  }
}

resource hostSecretsAccess 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(hostSecretsContainer.id, principalId, roles.storageBlobDataOwner)
  scope: hostSecretsContainer
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roles.storageBlobDataOwner)
    principalId: principalId
    principalType: 'ServicePrincipal'
    description: 'Functions host: host and function keys'
  }
}

@description('Storage account name (AzureWebJobsStorage__accountName).')
output name string = account.name

@description('Blob endpoint, ending with a slash.')
output blobEndpoint string = account.properties.primaryEndpoints.blob

@description('Container the Flex Consumption plan deploys from.')
output deploymentContainerName string = deploymentContainer.name
