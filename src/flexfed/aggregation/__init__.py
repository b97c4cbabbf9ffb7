"""Federated LoRA aggregation methods, one module each, registered by name."""

from flexfed.aggregation.base import Aggregator, get_aggregator
from flexfed.aggregation.fed_sb import FedSB
from flexfed.aggregation.fedit import FedIT
from flexfed.aggregation.ffa_lora import FFALoRA
from flexfed.aggregation.flexlora import FlexLoRA
from flexfed.aggregation.flora import FLoRA
from flexfed.aggregation.hetlora import HetLoRA
from flexfed.aggregation.lora_fair import LoRAFAIR

__all__ = ["Aggregator", "FFALoRA", "FLoRA", "FedIT", "FedSB", "FlexLoRA", "HetLoRA", "LoRAFAIR", "get_aggregator"]
