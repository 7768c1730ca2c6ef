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
  description = "The AKS cluster the daemon runs on; it must have the OIDC issuer and workload identity enabled."
  type        = string
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

variable "tags" {
  description = "Tags for every resource."
  type        = map(string)
  default     = {}
}
