"""ε(δ) of the subsampled Gaussian mechanism over rounds, from Opacus's accountants (never by hand)."""

from __future__ import annotations

import math
from typing import Literal

Accountant = Literal["rdp", "prv"]


def epsilon(noise_multiplier: float, sample_rate: float, rounds: int, delta: float, accountant: Accountant = "rdp") -> float:
    """ε after ``rounds`` rounds of noise σ = ``noise_multiplier`` with clients sampled at rate q.

    Zero rounds release nothing (ε = 0); σ = 0 gives no guarantee (ε = inf). Opacus analyses
    Poisson sampling at rate q; flexfed samples exactly ceil(q N) clients a round, the usual
    approximation (as in McMahan et al. 2018 and Opacus's own fixed-size batches).
    """
    if rounds <= 0:
        return 0.0
    if noise_multiplier <= 0:
        return math.inf
    try:
        from opacus.accountants import PRVAccountant, RDPAccountant
    except ImportError:
        raise ImportError("privacy needs Opacus's accountant: pip install 'flexfed[privacy]' (or opacus)") from None
    acc = RDPAccountant() if accountant == "rdp" else PRVAccountant()
    acc.history = [(float(noise_multiplier), float(sample_rate), int(rounds))]
    return float(acc.get_epsilon(delta=delta))
