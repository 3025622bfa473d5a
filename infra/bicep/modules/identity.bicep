// The one user-assigned managed identity the Function App uses for every
// data-plane call: host storage, the sync queue, the tables, the deployment
// package, SignalR and Key Vault references. A user-assigned identity (rather
// than the app's system identity) exists before the app does, so every role
// assignment can be made, and has propagated, by the time the app first starts.

@description('Name of the managed identity.')
param name string

@description('Region of the identity.')
param location string

@description('Tags for the identity.')
param tags object

resource identity 'Microsoft.ManagedIdentity/userAssignedIdentities@2024-11-30' = {
  name: name
  location: location
  tags: tags
}

@description('Resource id: what the Function App and Key Vault references name.')
output id string = identity.id

@description('Object id: what role assignments name.')
output principalId string = identity.properties.principalId

@description('Client id: what identity-based connections (`__clientId`) name.')
output clientId string = identity.properties.clientId
