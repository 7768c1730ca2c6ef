terraform {
  required_version = ">= 1.6"
  required_providers {
    azurerm = {
      source = "hashicorp/azurerm"
      # Argument names below are azurerm 4.x's (e.g. the federated credential's parent_id).
      # .terraform.lock.hcl beside this file pins the exact release and its checksums.
      version = "~> 4.0"
    }
  }
  # State: local by default. For a team, copy backend.tf.example to backend.tf (an Azure
  # Storage container, Entra ID auth, state locking by blob lease) before `terraform init`.
}

provider "azurerm" {
  features {}
  # azurerm 4.x refuses to plan without a subscription: set subscription_id, or leave it null
  # and export ARM_SUBSCRIPTION_ID.
  subscription_id = var.subscription_id
}
