variable "subscription_id" {
  description = "The subscription to deploy into. null: the provider takes ARM_SUBSCRIPTION_ID (azurerm 4.x needs one or the other)."
  type        = string
  default     = null
  validation {
    condition     = var.subscription_id == null || can(regex("^[0-9a-fA-F]{8}(-[0-9a-fA-F]{4}){3}-[0-9a-fA-F]{12}$", var.subscription_id))
    error_message = "A subscription id (a UUID), or null to use ARM_SUBSCRIPTION_ID."
  }
}

variable "resource_group_name" {
  description = "An existing resource group for the Service Bus namespace and the identities."
  type        = string
}

variable "location" {
  description = "Azure region; defaults to the resource group's."
  type        = string
  default     = null
}

variable "servicebus_namespace_name" {
  description = "Globally unique Service Bus namespace name (6-50 letters, digits, hyphens). Its FQDN, <name>.servicebus.windows.net, is servicebus.namespace in the daemon's config; the name alone is the KEDA trigger's namespace."
  type        = string
  validation {
    condition     = can(regex("^[a-zA-Z][a-zA-Z0-9-]{4,48}[a-zA-Z0-9]$", var.servicebus_namespace_name))
    error_message = "6-50 characters: letters, digits and hyphens, starting with a letter and ending with a letter or digit."
  }
}

variable "servicebus_sku" {
  description = "Standard or Premium: sessions (the results queue) and duplicate detection need at least Standard."
  type        = string
  default     = "Standard"
  validation {
    condition     = contains(["Standard", "Premium"], var.servicebus_sku)
    error_message = "Standard or Premium (Basic has no sessions and no duplicate detection)."
  }
}

variable "premium_capacity" {
  description = "Messaging units when servicebus_sku is Premium (1, 2, 4, 8 or 16); ignored for Standard."
  type        = number
  default     = 1
}

variable "aks_cluster_name" {
  description = "The AKS cluster the daemon runs on (in this subscription); it must have the OIDC issuer and workload identity enabled."
  type        = string
}

variable "aks_oidc_issuer_url" {
  description = "The cluster's OIDC issuer URL: az aks show -g <rg> -n <cluster> --query oidcIssuerProfile.issuerUrl -o tsv. Empty output means the OIDC issuer is off: enable it (and workload identity) first."
  type        = string
  validation {
    condition     = can(regex("^https://[^/]+/.+/$", var.aks_oidc_issuer_url))
    error_message = "An https URL ending in '/', as az aks show prints it (https://<region>.oic.prod-aks.azure.com/<tenant>/<id>/). Empty means the cluster's OIDC issuer is not enabled."
  }
}

variable "aks_resource_group_name" {
  description = "The AKS cluster's resource group."
  type        = string
}

variable "k8s_namespace" {
  description = "Kubernetes namespace of the daemon (the overlay's `namespace`)."
  type        = string
  default     = "hybrid-worker"
}

variable "k8s_service_account" {
  description = "The daemon's ServiceAccount (deploy/aks/base/serviceaccount.yaml)."
  type        = string
  default     = "hybrid-worker"
}

variable "keda_namespace" {
  description = "Namespace of the KEDA operator: kube-system for the AKS KEDA add-on, keda for the Helm chart's default."
  type        = string
  default     = "kube-system"
}

variable "keda_service_account" {
  description = "The KEDA operator's ServiceAccount."
  type        = string
  default     = "keda-operator"
}

variable "jobs_queue_name" {
  description = "The jobs queue (queues.jobs)."
  type        = string
  default     = "jobs"
}

variable "results_queue_name" {
  description = "The session-enabled results queue (queues.results)."
  type        = string
  default     = "results"
}

variable "jobs_lock_duration" {
  description = "Peek-lock duration of a job (ISO 8601, at most PT5M). The daemon renews the lock of a running job, so this only bounds how soon a crashed pod's jobs are redelivered."
  type        = string
  default     = "PT1M"
}

variable "jobs_max_delivery_count" {
  description = "Deliveries of one message before Service Bus dead-letters it (MaxDeliveryCountExceeded). The daemon's own retries are new scheduled messages and do not count; this guards against a job that crashes the pod every time."
  type        = number
  default     = 5
}

variable "jobs_message_ttl" {
  description = "Default time to live of a job (ISO 8601); a flow may set a shorter one. An expired job is dead-lettered (TTLExpiredException)."
  type        = string
  default     = "P7D"
}

variable "results_message_ttl" {
  description = "Default time to live of a reply (ISO 8601). A reply that no flow collects expires and is dropped."
  type        = string
  default     = "P1D"
}

variable "operator_principal_ids" {
  description = "Object ids of Entra ID users or groups who run `hybrid-worker dlq` and `submit` against the namespace (Data Receiver + Data Sender)."
  type        = list(string)
  default     = []
}

variable "key_vault_name" {
  description = "The Key Vault holding the jobs' secrets (3-24 letters, digits and hyphens, globally unique); the SecretProviderClass's keyvaultName (deploy/aks overlay)."
  type        = string

  validation {
    condition     = can(regex("^[A-Za-z][A-Za-z0-9-]{1,22}[A-Za-z0-9]$", var.key_vault_name))
    error_message = "key_vault_name must be 3-24 letters, digits and hyphens, starting with a letter and ending with a letter or digit."
  }
}

variable "tags" {
  description = "Tags for every resource."
  type        = map(string)
  default     = {}
}

variable "worker_node_pool_enabled" {
  description = "Create the workers' node pool (tainted, labelled hybrid-worker.io/pool=workers, with the pod PID limit). With false, remove the Deployment's nodeSelector and toleration in the overlay and set podMaxPids on the pool the pods run on yourself."
  type        = bool
  default     = true
}

variable "worker_node_pool_name" {
  description = "The workers' node pool (AKS: 1-12 lowercase letters and digits, starting with a letter)."
  type        = string
  default     = "hybridwk"
  validation {
    condition     = can(regex("^[a-z][a-z0-9]{0,11}$", var.worker_node_pool_name))
    error_message = "1-12 lowercase letters and digits, starting with a letter."
  }
}

variable "worker_node_vm_size" {
  description = "VM size of the workers' nodes. Each pod reserves the Deployment's requests: 500m CPU, 2304Mi memory and 4608Mi ephemeral storage with engine.concurrency 4."
  type        = string
  default     = "Standard_D4ds_v5"
}

variable "worker_node_min_count" {
  description = "Fewest nodes of the workers' pool (the cluster autoscaler adds nodes for the pods KEDA adds)."
  type        = number
  default     = 1
}

variable "worker_node_max_count" {
  description = "Most nodes of the workers' pool."
  type        = number
  default     = 5
}

variable "worker_pod_max_pid" {
  description = "The kubelet's podMaxPids on the workers' pool: processes and threads per pod. deploy/validate.sh requires >= engine.concurrency x the largest worker max_processes + 512 for the daemon."
  type        = number
  default     = 1024
}

variable "log_analytics_workspace_id" {
  description = "An existing Log Analytics workspace for Service Bus' logs and metrics (e.g. the cluster's Container Insights one); null creates one."
  type        = string
  default     = null
}

variable "azure_monitor_workspace_id" {
  description = "The Azure Monitor workspace of the cluster's managed Prometheus; the daemon's alert rules are created there. null: no Prometheus rule group (load ../monitoring/prometheus-rules.yaml into your own Prometheus)."
  type        = string
  default     = null
}

variable "alert_email_addresses" {
  description = "Who the alerts mail (the action group's email receivers)."
  type        = list(string)
  default     = []
}

variable "alert_dead_letter_threshold" {
  description = "Alert when the jobs queue holds more dead letters than this."
  type        = number
  default     = 0
}

variable "alert_backlog_threshold" {
  description = "Alert when the jobs queue's active messages stay above this for an hour."
  type        = number
  default     = 100
}
