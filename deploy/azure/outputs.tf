output "servicebus_namespace_name" {
  description = "The KEDA trigger's `namespace` (deploy/aks overlay)."
  value       = azurerm_servicebus_namespace.this.name
}

output "servicebus_fqdn" {
  description = "servicebus.namespace in the daemon's config.toml (deploy/aks overlay)."
  value       = "${azurerm_servicebus_namespace.this.name}.servicebus.windows.net"
}

output "worker_identity_client_id" {
  description = "The ServiceAccount's azure.workload.identity/client-id annotation."
  value       = azurerm_user_assigned_identity.worker.client_id
}

output "keda_identity_client_id" {
  description = "The TriggerAuthentication's podIdentity.identityId."
  value       = azurerm_user_assigned_identity.keda.client_id
}

output "tenant_id" {
  description = "The identities' tenant."
  value       = azurerm_user_assigned_identity.worker.tenant_id
}

output "key_vault_name" {
  description = "The SecretProviderClass's keyvaultName (deploy/aks overlay): the jobs' secrets."
  value       = azurerm_key_vault.secrets.name
}
