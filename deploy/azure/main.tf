# hybrid-worker's Azure side: the Service Bus namespace, the jobs and results queues, the
# daemon's workload identity (Data Receiver + Data Sender), and KEDA's (Data Owner on the jobs
# queue, to read its message count). nodepool.tf adds the workers' node pool, monitoring.tf
# the diagnostic settings and alerts. README.md beside this file, and ../operator-guide.md
# (section 2), explain each choice.

data "azurerm_resource_group" "this" {
  name = var.resource_group_name
}

# The subscription and tenant Terraform runs in (no credentials are read or stored).
data "azurerm_client_config" "current" {}

# The AKS cluster is not read: azurerm's only data source for it (azurerm_kubernetes_cluster)
# stores the cluster's admin kubeconfig in the state. Its id is composed, and its OIDC issuer
# URL is a variable (deploy/azure/README.md prints both with one `az aks show`).
locals {
  location       = coalesce(var.location, data.azurerm_resource_group.this.location)
  aks_cluster_id = "/subscriptions/${data.azurerm_client_config.current.subscription_id}/resourceGroups/${var.aks_resource_group_name}/providers/Microsoft.ContainerService/managedClusters/${var.aks_cluster_name}"
}

resource "azurerm_servicebus_namespace" "this" {
  name                = var.servicebus_namespace_name
  location            = local.location
  resource_group_name = data.azurerm_resource_group.this.name
  sku                 = var.servicebus_sku
  capacity            = var.servicebus_sku == "Premium" ? var.premium_capacity : 0
  # Premium needs at least one partition; Standard takes 0 only.
  premium_messaging_partitions = var.servicebus_sku == "Premium" ? 1 : 0
  # Entra ID only: no SAS keys exist that could leak. The daemon uses workload identity,
  # operators `az login` (servicebus.credential = developer).
  local_auth_enabled  = false
  minimum_tls_version = "1.2"
  tags                = var.tags
}

resource "azurerm_servicebus_queue" "jobs" {
  name         = var.jobs_queue_name
  namespace_id = azurerm_servicebus_namespace.this.id

  lock_duration                        = var.jobs_lock_duration
  max_delivery_count                   = var.jobs_max_delivery_count
  default_message_ttl                  = var.jobs_message_ttl
  dead_lettering_on_message_expiration = true
  # A flow's connector that resends the same job (same MessageId) within 10 minutes is
  # answered once. The daemon's retries and replays carry MessageIds of their own.
  requires_duplicate_detection            = true
  duplicate_detection_history_time_window = "PT10M"
  requires_session                        = false
  max_size_in_megabytes                   = 1024
}

resource "azurerm_servicebus_queue" "results" {
  name         = var.results_queue_name
  namespace_id = azurerm_servicebus_namespace.this.id

  # Each flow waits on its own session (the job's ReplyToSessionId).
  requires_session = true
  # A reply resent after a crash (MessageId <job id>:result) is dropped here.
  requires_duplicate_detection            = true
  duplicate_detection_history_time_window = "PT10M"
  lock_duration                           = "PT1M"
  max_delivery_count                      = 10
  default_message_ttl                     = var.results_message_ttl
  # A reply nobody collected is of no use to anyone: it expires without a dead letter.
  dead_lettering_on_message_expiration = false
  max_size_in_megabytes                = 1024
}

# The daemon's identity, federated with its ServiceAccount.
resource "azurerm_user_assigned_identity" "worker" {
  name                = "${var.servicebus_namespace_name}-worker"
  location            = local.location
  resource_group_name = data.azurerm_resource_group.this.name
  tags                = var.tags
}

resource "azurerm_federated_identity_credential" "worker" {
  name                = "aks-${var.k8s_namespace}-${var.k8s_service_account}"
  resource_group_name = data.azurerm_resource_group.this.name
  parent_id           = azurerm_user_assigned_identity.worker.id
  audience            = ["api://AzureADTokenExchange"]
  issuer              = var.aks_oidc_issuer_url
  subject             = "system:serviceaccount:${var.k8s_namespace}:${var.k8s_service_account}"
}

# Receive and settle jobs (and dead letters: `dlq` runs in the pod too); send replies to any
# ReplyTo queue, and retries (scheduled copies) and replays to the jobs queue.
resource "azurerm_role_assignment" "worker_receiver" {
  scope                = azurerm_servicebus_namespace.this.id
  role_definition_name = "Azure Service Bus Data Receiver"
  principal_id         = azurerm_user_assigned_identity.worker.principal_id
  principal_type       = "ServicePrincipal"
}

resource "azurerm_role_assignment" "worker_sender" {
  scope                = azurerm_servicebus_namespace.this.id
  role_definition_name = "Azure Service Bus Data Sender"
  principal_id         = azurerm_user_assigned_identity.worker.principal_id
  principal_type       = "ServicePrincipal"
}

# KEDA's identity: reading a queue's message count needs the Manage right, which only Data
# Owner grants, so it gets its own identity scoped to the jobs queue alone.
resource "azurerm_user_assigned_identity" "keda" {
  name                = "${var.servicebus_namespace_name}-keda"
  location            = local.location
  resource_group_name = data.azurerm_resource_group.this.name
  tags                = var.tags
}

resource "azurerm_federated_identity_credential" "keda" {
  name                = "aks-${var.keda_namespace}-${var.keda_service_account}"
  resource_group_name = data.azurerm_resource_group.this.name
  parent_id           = azurerm_user_assigned_identity.keda.id
  audience            = ["api://AzureADTokenExchange"]
  issuer              = var.aks_oidc_issuer_url
  subject             = "system:serviceaccount:${var.keda_namespace}:${var.keda_service_account}"
}

resource "azurerm_role_assignment" "keda_owner" {
  scope                = azurerm_servicebus_queue.jobs.id
  role_definition_name = "Azure Service Bus Data Owner"
  principal_id         = azurerm_user_assigned_identity.keda.principal_id
  principal_type       = "ServicePrincipal"
}

# People (or groups) who operate dead letters and submit test jobs from their machines.
resource "azurerm_role_assignment" "operator_receiver" {
  for_each             = toset(var.operator_principal_ids)
  scope                = azurerm_servicebus_namespace.this.id
  role_definition_name = "Azure Service Bus Data Receiver"
  principal_id         = each.value
}

resource "azurerm_role_assignment" "operator_sender" {
  for_each             = toset(var.operator_principal_ids)
  scope                = azurerm_servicebus_namespace.this.id
  role_definition_name = "Azure Service Bus Data Sender"
  principal_id         = each.value
}

# The jobs' secrets (docs/secrets.md): one Key Vault secret per name a worker declares, mounted
# into the pod by the Secrets Store CSI driver (deploy/aks/base/secretproviderclass.yaml), which
# reads them with the daemon's identity. RBAC, not access policies (rbac_authorization_enabled:
# azurerm 4.42 or later; the lock file pins 4.81). The daemon's identity may read secret values
# and nothing else; operators may write them.
resource "azurerm_key_vault" "secrets" {
  name                       = var.key_vault_name
  location                   = local.location
  resource_group_name        = data.azurerm_resource_group.this.name
  tenant_id                  = data.azurerm_client_config.current.tenant_id
  sku_name                   = "standard"
  rbac_authorization_enabled = true
  purge_protection_enabled   = true
  soft_delete_retention_days = 90
  tags                       = var.tags
}

resource "azurerm_role_assignment" "worker_secrets" {
  scope                = azurerm_key_vault.secrets.id
  role_definition_name = "Key Vault Secrets User"
  principal_id         = azurerm_user_assigned_identity.worker.principal_id
  principal_type       = "ServicePrincipal"
}

resource "azurerm_role_assignment" "operator_secrets" {
  for_each             = toset(var.operator_principal_ids)
  scope                = azurerm_key_vault.secrets.id
  role_definition_name = "Key Vault Secrets Officer"
  principal_id         = each.value
}
