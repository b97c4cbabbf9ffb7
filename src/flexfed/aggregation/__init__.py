"""Federated LoRA aggregation methods, one module each, registered by name."""

from flexfed.aggregation.base import Aggregator, get_aggregator
from flexfed.aggregation.fedit import FedIT

__all__ = ["Aggregator", "FedIT", "get_aggregator"]
