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
    if s.client_adapter == "prompt":
        if s.prompt_tokens < 1:
            raise ValueError("split.prompt_tokens must be at least 1 with split.client_adapter=prompt (the number of virtual tokens)")
        if s.client_method != "fedit" or s.client_method_options:
            raise ValueError(
                f"split.client_method {s.client_method!r} {s.client_method_options or ''} aggregates client LoRA; with split.client_adapter=prompt "
                "the client part is a soft prompt, averaged with the data-size weights (leave client_method at fedit, no options)"
            )
        if config.resources.distribution != "homogeneous":
            raise ValueError(
                f"resources.distribution={config.resources.distribution!r} sets the client parts' LoRA ranks; with split.client_adapter=prompt "
                "the clients train no LoRA (the server part's rank is split.server_rank)"
            )
    elif s.prompt_tokens:
        raise ValueError(f"split.prompt_tokens={s.prompt_tokens} applies to split.client_adapter=prompt only, not {s.client_adapter!r}")
    if s.prune_fraction:
        if not s.tail_layers:
            raise ValueError(
                f"split.prune_fraction={s.prune_fraction} needs split.tail_layers > 0: a client scores its examples through its own "
                "head and tail blocks and the LM head (SFPrompt's local path), which it holds only in a U-shape"
            )
        if config.training.local_steps is not None:
            raise ValueError(
                f"split.prune_fraction={s.prune_fraction} needs training.local_epochs (and training.local_steps=null): a fixed "
                "training.local_steps keeps the step count, so pruning would save no step and no byte"
            )
    named = weights_only_settings(config) + (["resources.distribution=memory"] if config.resources.distribution == "memory" else [])
    if named:
        raise ValueError(f"federation.method=split does not support {', '.join(named)} yet")
