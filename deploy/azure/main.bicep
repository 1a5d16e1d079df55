// leadsync as an Azure Container Apps job: `leadsync run --once` on a schedule.
//
// Deploys, into the resource group of the deployment:
//   - a user-assigned managed identity for the job;
//   - role assignments for it: "Storage Table Data Contributor" on the storage
//     account (the lead table is read, the state table written) and "Key Vault
//     Secrets User" on the Key Vault (secret references);
//   - the scheduled Container Apps job, configured entirely by LEADSYNC__ environment
//     variables (no config file: `--config /dev/null`), secrets as Key Vault references.
//
// Expects, already existing: a Container Apps environment (any resource group), the
// storage account the marketplace writes leads to and a Key Vault using the Azure
// RBAC permission model, both in this resource group.
//
// The job keeps its state in a table of the storage account (state.backend = "table"):
// a job has no durable disk. An execution stopped part-way (replicaTimeout, a lost
// replica) costs the next one re-delivering what it had not recorded, as upserts of
// the same CRM records; no row's outcome is lost (docs/state.md, "State in an Azure table").
//
// Deploy: docs/deployment.md, "Azure Container Apps job".
//   az deployment group create -g <rg> -f deploy/azure/main.bicep -p @main.parameters.json

targetScope = 'resourceGroup'

// ---------------------------------------------------------------- parameters

@description('Name of the Container Apps job (lowercase letters, digits and hyphens).')
@minLength(2)
@maxLength(32)
param jobName string = 'leadsync'

@description('Region of the job and its identity; the Container Apps environment must be in the same region.')
param location string = resourceGroup().location

@description('Resource id of the existing Container Apps environment (Microsoft.App/managedEnvironments).')
param containerAppsEnvironmentId string

@description('leadsync image built from deploy/container/Dockerfile, e.g. myregistry.azurecr.io/leadsync:0.1.0.')
param image string

@description('Login server of a private registry to pull the image with the job identity (e.g. myregistry.azurecr.io; the identity needs AcrPull on it). Empty for a public image.')
param registryServer string = ''

@description('When an execution starts: cron expression, in UTC.')
param cronExpression string = '*/5 * * * *'

@description('Maximum seconds one execution may run before it is stopped.')
param replicaTimeout int = 1800

@description('Retries of a failed execution (exit code other than 0). leadsync exits 2 when leads are still pending at the CRM, 3 when the poll failed (or lost the processing lease), and 4 when another execution holds the processing lease and this one did nothing (not a failure of the work; judged by the storage account clock): a retry is safe in every case.')
param replicaRetryLimit int = 1

@description('vCPU of the container (string, e.g. "0.25").')
param cpu string = '0.25'

@description('Memory of the container; must pair with cpu (0.25 vCPU / 0.5Gi, 0.5 / 1Gi, ...).')
param memory string = '0.5Gi'

@description('Name of the storage account (in this resource group) the marketplace writes leads to.')
param storageAccountName string

@description('The lead table (source.table).')
param leadTable string = 'MarketplaceLeads'

@description('The table leadsync keeps its state in (state.table), in the same storage account; created on first use.')
param stateTable string = 'LeadsyncState'

@description('''How leadsync authenticates to the storage account.
managedIdentity: the job identity (Storage Table Data Contributor), source.identity = "managed_identity".
connectionString | accountKey | sasToken: the Key Vault secret named by storageSecretName holds a connection string, the account key, or a SAS (query string).''')
@allowed([
  'managedIdentity'
  'connectionString'
  'accountKey'
  'sasToken'
])
param storageAuth string = 'accountKey'

@description('Name of the Key Vault (in this resource group, RBAC permission model) holding the secrets.')
param keyVaultName string

@description('Key Vault secret holding the storage connection string, account key or SAS (not used with storageAuth = managedIdentity).')
param storageSecretName string = 'leadsync-storage'

@description('Further leadsync settings as environment variables, names LEADSYNC__SECTION__KEY, values strings; e.g. { "LEADSYNC__SINK__KIND": "salesforce", "LEADSYNC__SINK__SALESFORCE__LOGIN_URL": "https://acme.my.salesforce.com" }. No secrets here: use crmSecrets.')
param settings object = {}

@description('A secret leadsync reads: a Key Vault secret, the environment variable it is exposed as, and the leadsync key that names that variable.')
type secretSetting = {
  @description('Name of the secret in the Key Vault, e.g. "salesforce-client-secret".')
  keyVaultSecret: string
  @description('Environment variable the secret is exposed as, e.g. "LEADSYNC_SALESFORCE_CLIENT_SECRET".')
  env: string
  @description('leadsync config key set to { env = "<env>" }, e.g. "sink.salesforce.client_secret".')
  configKey: string
}

@description('CRM secrets, as Key Vault references (the latest version of each secret is used).')
param crmSecrets secretSetting[] = []

@description('Tags on the identity and the job.')
param tags object = {}

// ---------------------------------------------------------------- names and ids

var roleStorageTableDataContributor = '0a9a7e1f-b9d0-4cc4-a60d-0319b160aaa3'
var roleKeyVaultSecretsUser = '4633458b-17de-408a-b874-0445c86b69e6'

// Container Apps secret names: lowercase letters, digits, '-' and '.'.
var storageSecretRef = 'storage-credential'

// https://<vault>.vault.azure.net/ (or the sovereign cloud's suffix). Built from
// deploy-time values, not vault.properties.vaultUri: a variable loop's body must be
// known when the deployment starts.
var vaultUri = 'https://${keyVaultName}${environment().suffixes.keyvaultDns}/'

// How each storage auth mode reaches leadsync: the source key that names the
// variable, and the variable.
var storageKeyed = {
  managedIdentity: {
    configEnv: ''
    env: ''
  }
  connectionString: {
    configEnv: 'LEADSYNC__SOURCE__CONNECTION_STRING__ENV'
    env: 'LEADSYNC_STORAGE_CONNECTION_STRING'
  }
  accountKey: {
    configEnv: 'LEADSYNC__SOURCE__ACCOUNT_KEY__ENV'
    env: 'LEADSYNC_STORAGE_ACCOUNT_KEY'
  }
  sasToken: {
    configEnv: 'LEADSYNC__SOURCE__SAS_TOKEN__ENV'
    env: 'LEADSYNC_STORAGE_SAS'
  }
}
var useManagedIdentity = storageAuth == 'managedIdentity'

// ---------------------------------------------------------------- existing resources

resource storage 'Microsoft.Storage/storageAccounts@2023-05-01' existing = {
  name: storageAccountName
}

resource vault 'Microsoft.KeyVault/vaults@2023-07-01' existing = {
  name: keyVaultName
}

// ---------------------------------------------------------------- identity and roles

resource identity 'Microsoft.ManagedIdentity/userAssignedIdentities@2023-01-31' = {
  name: '${jobName}-id'
  location: location
  tags: tags
}

resource storageRole 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(storage.id, identity.id, roleStorageTableDataContributor)
  scope: storage
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roleStorageTableDataContributor)
    principalId: identity.properties.principalId
    principalType: 'ServicePrincipal'
  }
}

resource vaultRole 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(vault.id, identity.id, roleKeyVaultSecretsUser)
  scope: vault
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roleKeyVaultSecretsUser)
    principalId: identity.properties.principalId
    principalType: 'ServicePrincipal'
  }
}

// ---------------------------------------------------------------- secrets and environment

var storageSecrets = useManagedIdentity ? [] : [
  {
    name: storageSecretRef
    keyVaultUrl: '${vaultUri}secrets/${storageSecretName}'
    identity: identity.id
  }
]

var crmSecretEntries = [for s in crmSecrets: {
  name: toLower(s.keyVaultSecret)
  keyVaultUrl: '${vaultUri}secrets/${s.keyVaultSecret}'
  identity: identity.id
}]

var baseEnv = [
  {
    name: 'LEADSYNC__SOURCE__TABLE'
    value: leadTable
  }
  {
    name: 'LEADSYNC__STATE__BACKEND'
    value: 'table'
  }
  {
    name: 'LEADSYNC__STATE__TABLE'
    value: stateTable
  }
  {
    name: 'LEADSYNC__LOG__FORMAT'
    value: 'json'
  }
]

// The account name is needed by every mode but a connection string (which carries it).
var accountEnv = storageAuth == 'connectionString' ? [] : [
  {
    name: 'LEADSYNC__SOURCE__ACCOUNT'
    value: storageAccountName
  }
]

var managedIdentityEnv = [
  {
    name: 'LEADSYNC__SOURCE__IDENTITY'
    value: 'managed_identity'
  }
  // Which user-assigned identity to take tokens for.
  {
    name: 'LEADSYNC__SOURCE__IDENTITY_CLIENT_ID'
    value: identity.properties.clientId
  }
]

var storageSecretEnv = [
  {
    name: storageKeyed[storageAuth].configEnv
    value: storageKeyed[storageAuth].env
  }
  {
    name: storageKeyed[storageAuth].env
    secretRef: storageSecretRef
  }
]

var storageEnv = useManagedIdentity ? managedIdentityEnv : storageSecretEnv

var settingsEnv = [for s in items(settings): {
  name: s.key
  value: string(s.value)
}]

var crmSecretEnv = [for s in crmSecrets: {
  name: s.env
  secretRef: toLower(s.keyVaultSecret)
}]

// sink.salesforce.client_secret -> LEADSYNC__SINK__SALESFORCE__CLIENT_SECRET__ENV
var crmSecretConfigEnv = [for s in crmSecrets: {
  name: 'LEADSYNC__${toUpper(replace(s.configKey, '.', '__'))}__ENV'
  value: s.env
}]

// ---------------------------------------------------------------- the job

resource job 'Microsoft.App/jobs@2024-03-01' = {
  name: jobName
  location: location
  tags: tags
  identity: {
    type: 'UserAssigned'
    userAssignedIdentities: {
      '${identity.id}': {}
    }
  }
  properties: {
    environmentId: containerAppsEnvironmentId
    configuration: {
      triggerType: 'Schedule'
      scheduleTriggerConfig: {
        cronExpression: cronExpression
        parallelism: 1
        replicaCompletionCount: 1
      }
      replicaTimeout: replicaTimeout
      replicaRetryLimit: replicaRetryLimit
      secrets: concat(storageSecrets, crmSecretEntries)
      registries: empty(registryServer) ? [] : [
        {
          server: registryServer
          identity: identity.id
        }
      ]
    }
    template: {
      containers: [
        {
          name: 'leadsync'
          image: image
          // ENTRYPOINT is /leadsync; these replace the image's CMD.
          args: [
            '--config'
            '/dev/null'
            'run'
            '--once'
          ]
          env: concat(baseEnv, accountEnv, storageEnv, settingsEnv, crmSecretEnv, crmSecretConfigEnv)
          resources: {
            cpu: json(cpu)
            memory: memory
          }
        }
      ]
    }
  }
  // Key Vault references are resolved with the identity when the job is created.
  dependsOn: [
    vaultRole
    storageRole
  ]
}

// ---------------------------------------------------------------- outputs

output jobName string = job.name
output identityId string = identity.id
output identityPrincipalId string = identity.properties.principalId
output identityClientId string = identity.properties.clientId
