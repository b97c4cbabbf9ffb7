"""The in-process simulator: the runner (``flexfed.runner``) with its in-process executor.

Every sampled client trains in turn (or several per pass on an accelerator) on one shared base
model. Starts and updates go through the protocol's messages exactly as they would between
machines, so bytes are measured from what is sent and the Flower engine trains from and
aggregates the same tensors. A method that changes the base (FLoRA's merge, SLoRA's sparse
stage) has the shared base brought to the global model once before the round's clients train
(``Protocol.sync``) instead of once per client.
"""

from __future__ import annotations

from pathlib import Path

from flexfed.config import RunConfig
from flexfed.client import pick_device
from flexfed.runner import RunExists, Runner

Simulation = Runner  # a runner's executor is in-process unless it is given another

__all__ = ["RunExists", "Simulation", "pick_device", "run"]


def run(config: RunConfig, resume: bool = False, overwrite: bool = False, show_progress: bool = True, stop_after: int | None = None) -> Path:
    return Simulation(config).run(resume=resume, overwrite=overwrite, show_progress=show_progress, stop_after=stop_after)
