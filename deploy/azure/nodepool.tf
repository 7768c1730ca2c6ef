# The workers' node pool. Its kubelet sets podMaxPids: in the non-root pod jobs share the
# daemon's uid and no job cgroup exists (deploy/operator-guide.md, section 9), so the pod's PID
# limit is the only bound on a job that forks without end. The pool is tainted, so that only
# hybrid-worker pods (deploy/aks/base/deployment.yaml tolerates the taint and selects the label)
# land on it and the limit does not constrain anything else.
resource "azurerm_kubernetes_cluster_node_pool" "workers" {
  count                 = var.worker_node_pool_enabled ? 1 : 0
  name                  = var.worker_node_pool_name
  kubernetes_cluster_id = local.aks_cluster_id
  vm_size               = var.worker_node_vm_size
  mode                  = "User"
  auto_scaling_enabled  = true
  min_count             = var.worker_node_min_count
  max_count             = var.worker_node_max_count
  node_labels           = { "hybrid-worker.io/pool" = "workers" }
  node_taints           = ["hybrid-worker.io/pool=workers:NoSchedule"]
  # kubelet_config changes re-create the nodes through a temporary pool of this name.
  temporary_name_for_rotation = "${substr(var.worker_node_pool_name, 0, 8)}tmp"
  tags                        = var.tags

  kubelet_config {
    # deploy/validate checks it covers engine.concurrency x the largest max_processes + the
    # daemon's own (deploy/validate/budgets.py).
    pod_max_pid = var.worker_pod_max_pid
    # Container logs count against the pod's ephemeral storage: at most 5 x 50 MB per
    # container, within the 256Mi the Deployment's ephemeral-storage limit leaves for them.
    container_log_max_size_mb = 50
    container_log_max_files   = 5
  }
}
