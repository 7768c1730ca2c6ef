terraform {
  required_version = ">= 1.6"
  required_providers {
    azurerm = {
      source = "hashicorp/azurerm"
      # Argument names below are azurerm 4.x's (e.g. the federated credential's parent_id).
      version = "~> 4.0"
    }
  }
}

provider "azurerm" {
  features {}
}
