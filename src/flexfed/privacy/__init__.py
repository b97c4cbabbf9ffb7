"""Client-level differential privacy (DP-FedAvg, McMahan et al. 2018), as pure functions.

``clip``: each client's update is clipped to ``clip_norm`` in the space its method aggregates
(``flexfed.aggregation.space``). ``add_noise`` / ``noisy_product``: Gaussian noise of standard
deviation σ · S · max_i p_i on the aggregate, where p_i are the normalized aggregation weights
of the round (one client moves the weighted mean by at most p_i S). ``epsilon``: ε(δ) after a
number of rounds from Opacus's accountant (RDP or PRV), with sampling rate q = clients sampled
per round / clients registered. See docs/privacy.md for what this guarantees and what it does not.
"""

from flexfed.privacy.accountant import epsilon
from flexfed.privacy.dp import add_noise, clip, noise_std, noisy_product

__all__ = ["add_noise", "clip", "epsilon", "noise_std", "noisy_product"]
