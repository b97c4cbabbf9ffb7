"""KD-FedLLM: clients share their distributions on a public proxy set, not their weights.

- ``distill``: the encodings of a distribution (full, top-k, labels), their data-size-weighted
  mixture and the distillation loss; pure functions over tensors.
- ``proxy``: the proxy set's prompts (a file, or unseen tasks no client owns) and the scored
  positions (the global model's answers).
- ``protocol``: ``KDProtocol``, the round (``federation.method=kd``; options in ``kd``).

See docs/kd.md.
"""
