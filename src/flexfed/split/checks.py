"""Settings Split-FedLLM cannot honour, refused when the config is read (before any work)."""

from __future__ import annotations


def client_method_config(config):
    """The run config as the client part's aggregation sees it: ``split.client_method`` as the
    federation's method (the weights-protocol ``Server`` and ``Link`` read it from there)."""
    s = config.split
    federation = config.federation.model_copy(update={"method": s.client_method, "method_options": dict(s.client_method_options)})
    return config.model_copy(update={"federation": federation})


def check_config(config) -> None:
    """``ValueError`` naming the field for what a split run cannot do."""
    from flexfed.aggregation import Aggregator
    from flexfed.aggregation.weights import trains_plain_lora, weights_only_settings
    from flexfed.protocol import FAMILIES

    s = config.split
    if s.client_method in FAMILIES or s.client_method not in Aggregator.registry:
        raise ValueError(f"split.client_method {s.client_method!r} is not a weights-protocol method: one of {sorted(Aggregator.registry)}")
    try:
        aggregator = Aggregator.registry[s.client_method](**s.client_method_options)
    except (TypeError, ValueError) as err:
        raise ValueError(f"split.client_method_options {s.client_method_options} for {s.client_method!r}: {err}") from None
    if not trains_plain_lora(aggregator):
        raise ValueError(
            f"split.client_method {s.client_method!r} freezes a factor or merges into the base weights; a split client part trains "
            "plain LoRA (both factors), so use fedit, flexlora, hetlora or another method that does"
        )
    named = weights_only_settings(config) + (["resources.distribution=memory"] if config.resources.distribution == "memory" else [])
    if named:
        raise ValueError(f"federation.method=split does not support {', '.join(named)} yet")
