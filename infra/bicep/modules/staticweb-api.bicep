// Links the Function App to the Static Web App as its API ("bring your own
// functions"): https://<static web app>/api/* is proxied to the Function App.
// A separate module because the link needs the Function App, whose settings
// need the Static Web App's address (PUBLIC_BASE_URL).

@description('Name of the existing Static Web App.')
param staticWebAppName string

@description('Resource id of the Function App.')
param functionAppId string

@description('Region of the Function App.')
param functionAppLocation string

resource site 'Microsoft.Web/staticSites@2024-11-01' existing = {
  name: staticWebAppName
}

resource api 'Microsoft.Web/staticSites/userProvidedFunctionApps@2024-11-01' = {
  parent: site
  name: 'api'
  properties: {
    functionAppResourceId: functionAppId
    functionAppRegion: functionAppLocation
  }
}
