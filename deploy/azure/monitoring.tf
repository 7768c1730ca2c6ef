# Service Bus' own logs and metrics to Log Analytics, metric alerts on the namespace, and the
# daemon's Prometheus alert rules (../monitoring/prometheus-rules.yaml) as an Azure Monitor
# managed Prometheus rule group. ../operator-guide.md (section 8) explains each alert.

resource "azurerm_log_analytics_workspace" "this" {
  count               = var.log_analytics_workspace_id == null ? 1 : 0
  name                = "${var.servicebus_namespace_name}-logs"
  location            = local.location
  resource_group_name = data.azurerm_resource_group.this.name
  sku                 = "PerGB2018"
  retention_in_days   = 30
  tags                = var.tags
}

locals {
  log_analytics_workspace_id = coalesce(var.log_analytics_workspace_id, try(azurerm_log_analytics_workspace.this[0].id, null))
  # Prometheus durations (15m, 1h) as ISO 8601 (PT15M, PT1H); severities as Azure's numbers.
  prometheus_rules = flatten([for group in yamldecode(file("${path.module}/../monitoring/prometheus-rules.yaml")).groups : group.rules])
  severity_number  = { critical = 1, warning = 2, info = 3 }
}

resource "azurerm_monitor_diagnostic_setting" "servicebus" {
  name                           = "hybrid-worker"
  target_resource_id             = azurerm_servicebus_namespace.this.id
  log_analytics_workspace_id     = local.log_analytics_workspace_id
  log_analytics_destination_type = "Dedicated"

  # Operational, VNet/IP filtering and runtime audit logs, whichever the SKU emits.
  enabled_log {
    category_group = "allLogs"
  }
  enabled_metric {
    category = "AllMetrics"
  }
}

resource "azurerm_monitor_action_group" "this" {
  name                = "${var.servicebus_namespace_name}-alerts"
  resource_group_name = data.azurerm_resource_group.this.name
  short_name          = "hybridwk"
  tags                = var.tags

  dynamic "email_receiver" {
    for_each = toset(var.alert_email_addresses)
    content {
      name                    = email_receiver.value
      email_address           = email_receiver.value
      use_common_alert_schema = true
    }
  }
}

# Each alert watches one Service Bus metric of the jobs queue (dimension EntityName).
locals {
  servicebus_alerts = {
    dead-letters = {
      description = "Dead-lettered messages on the jobs queue rose above ${var.alert_dead_letter_threshold}: jobs no flow will get an answer for (hybrid-worker dlq list)."
      metric      = "DeadletteredMessages"
      aggregation = "Maximum"
      threshold   = var.alert_dead_letter_threshold
      window      = "PT15M"
      severity    = 2
    }
    backlog-not-draining = {
      description = "The jobs queue has held more than ${var.alert_backlog_threshold} active messages for an hour: the pods do not keep up or do not receive."
      metric      = "ActiveMessages"
      aggregation = "Minimum"
      threshold   = var.alert_backlog_threshold
      window      = "PT1H"
      severity    = 2
    }
    server-errors = {
      description = "Service Bus returned server errors on the jobs queue."
      metric      = "ServerErrors"
      aggregation = "Total"
      threshold   = 0
      window      = "PT15M"
      severity    = 2
    }
    throttling = {
      description = "Service Bus throttled requests on the jobs queue: the namespace is at its SKU's limits (Premium: add messaging units)."
      metric      = "ThrottledRequests"
      aggregation = "Total"
      threshold   = 0
      window      = "PT15M"
      severity    = 2
    }
  }
}

resource "azurerm_monitor_metric_alert" "servicebus" {
  for_each            = local.servicebus_alerts
  name                = "${var.servicebus_namespace_name}-${each.key}"
  resource_group_name = data.azurerm_resource_group.this.name
  scopes              = [azurerm_servicebus_namespace.this.id]
  description         = each.value.description
  severity            = each.value.severity
  frequency           = "PT5M"
  window_size         = each.value.window
  tags                = var.tags

  criteria {
    metric_namespace = "Microsoft.ServiceBus/namespaces"
    metric_name      = each.value.metric
    aggregation      = each.value.aggregation
    operator         = "GreaterThan"
    threshold        = each.value.threshold
    dimension {
      name     = "EntityName"
      operator = "Include"
      values   = [var.jobs_queue_name]
    }
  }

  action {
    action_group_id = azurerm_monitor_action_group.this.id
  }
}

# The daemon's alerts, evaluated by Azure Monitor managed Prometheus on the metrics it scrapes
# from the pods (pod-annotation scraping, ../operator-guide.md section 8).
resource "azurerm_monitor_alert_prometheus_rule_group" "daemon" {
  count               = var.azure_monitor_workspace_id == null ? 0 : 1
  name                = "${var.servicebus_namespace_name}-daemon"
  location            = local.location
  resource_group_name = data.azurerm_resource_group.this.name
  cluster_name        = var.aks_cluster_name
  scopes              = [var.azure_monitor_workspace_id]
  description         = "hybrid-worker daemon alerts (deploy/monitoring/prometheus-rules.yaml)"
  rule_group_enabled  = true
  interval            = "PT1M"
  tags                = var.tags

  dynamic "rule" {
    for_each = local.prometheus_rules
    content {
      alert       = rule.value.alert
      expression  = rule.value.expr
      for         = "PT${upper(rule.value.for)}"
      severity    = local.severity_number[rule.value.labels.severity]
      labels      = rule.value.labels
      annotations = rule.value.annotations
      enabled     = true
      action {
        action_group_id = azurerm_monitor_action_group.this.id
      }
      alert_resolution {
        auto_resolved   = true
        time_to_resolve = "PT10M"
      }
    }
  }
}
