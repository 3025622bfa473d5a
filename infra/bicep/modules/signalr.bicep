// Azure SignalR Service in Serverless mode: no hub server of our own.
// POST /api/negotiate hands browsers a service URL and a client token that
// the app asks the service for (REST generateToken), and the sync worker's
// output binding pushes syncProgress / messagesChanged through the REST API.
// Both authenticate with the Function App identity, so access keys are off.

@description('SignalR Service name (globally unique).')
param name string

@description('Region of the service.')
param location string

@description('Tags for the service.')
param tags object

@description('Free_F1 for trials (20 connections, 20k messages/day); Standard_S1 for production.')
@allowed([
  'Free_F1'
  'Standard_S1'
])
param sku string

@description('Origins allowed to open connections from a browser (the Static Web App).')
param allowedOrigins array

@description('Object id of the Function App identity the bindings use.')
param principalId string

// Microsoft documents "SignalR Service Owner" as the role the Functions
// SignalR extension needs for identity-based connections; it also covers
// the generateToken call negotiate makes.
var signalRServiceOwnerRole = '7e4f1700-ea5a-4f59-8f37-079cfe29dce3'

resource signalR 'Microsoft.SignalRService/signalR@2024-03-01' = {
  name: name
  location: location
  tags: tags
  kind: 'SignalR'
  sku: {
    name: sku
    tier: sku == 'Free_F1' ? 'Free' : 'Standard'
    capacity: 1
  }
  properties: {
    features: [
      {
        flag: 'ServiceMode'
        value: 'Serverless'
      }
      {
        flag: 'EnableConnectivityLogs'
        value: 'True'
      }
    ]
    cors: {
      allowedOrigins: allowedOrigins
    }
    disableLocalAuth: true
    publicNetworkAccess: 'Enabled'
  }
}

resource bindingsAccess 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(signalR.id, principalId, signalRServiceOwnerRole)
  scope: signalR
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', signalRServiceOwnerRole)
    principalId: principalId
    principalType: 'ServicePrincipal'
    description: 'mailsync: negotiate (client tokens) and the output binding'
  }
}

@description('Service host name, for AzureSignalRConnectionString__serviceUri.')
output hostName string = signalR.properties.hostName
