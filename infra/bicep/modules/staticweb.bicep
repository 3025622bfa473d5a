// The Static Web App that serves static_web/ (the add-account and data
// pages). Standard SKU because only Standard can front a Function App as its
// /api backend (see staticweb-api.bicep): the pages then call /api/... on
// their own origin, with no CORS and no API address baked into the files.

@description('Static Web App name.')
param name string

@description('Region of the Static Web App (a handful of regions offer it).')
param location string

@description('Tags for the Static Web App; azd finds it by azd-service-name.')
param tags object

resource site 'Microsoft.Web/staticSites@2024-11-01' = {
  name: name
  location: location
  tags: union(tags, { 'azd-service-name': 'web' })
  sku: {
    name: 'Standard'
    tier: 'Standard'
  }
  properties: {
    allowConfigFileUpdates: true
    stagingEnvironmentPolicy: 'Disabled'
  }
}

@description('Static Web App name.')
output name string = site.name

@description('Default host name, e.g. happy-sea-0123.azurestaticapps.net.')
output defaultHostname string = site.properties.defaultHostname
