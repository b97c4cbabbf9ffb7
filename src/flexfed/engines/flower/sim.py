"""``flexfed run --engine flower-sim``: the Flower ServerApp and ClientApp on Flower's simulation engine (Ray).

Each virtual SuperNode hosts the clients its ``partition-id``/``num-partitions`` give it (one
client per node by default, ``flower.num_supernodes`` to change that); Ray runs as many
ClientApp actors at once as ``flower.client_cpus``/``flower.client_gpus`` allow on this
machine, and each actor keeps its model between messages.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from flexfed.config import RunConfig

log = logging.getLogger(__name__)


def backend_config(config: RunConfig) -> dict:
    import torch

    f = config.flower
    gpus = torch.cuda.device_count()
    if f.client_gpus > 0 and gpus == 0:
        raise ValueError(f"flower.client_gpus={f.client_gpus} but this machine has no CUDA GPU")
    return {
        "client_resources": {"num_cpus": f.client_cpus, "num_gpus": f.client_gpus},
        "init_args": {"num_cpus": os.cpu_count() or 1, "num_gpus": gpus, "include_dashboard": False, "logging_level": "warning"},
    }


def run(config: RunConfig, resume: bool = False, overwrite: bool = False, show_progress: bool = True) -> Path:
    from flwr.app import Context
    from flwr.serverapp import Grid, ServerApp
    import torch
    from flwr.simulation import run_simulation

    from flexfed.engines.flower import clientapp
    from flexfed.engines.flower.serverapp import check_supported, run_on_grid
    from flexfed.build import Setup
    from flexfed.runner import check_run_dir

    check_supported(config)
    check_run_dir(config.run_dir, resume, overwrite)  # before Ray starts
    if config.federation.method == "split":  # a client's steps would reach whichever actor is free, and its session lives in one
        raise ValueError("federation.method=split keeps each client's round in its node's process between steps; Ray's ClientApp actors are "
                         "shared by all virtual nodes, so run it in-process (--engine simulation) or on SuperNodes (flexfed flower supernode)")
    num_clients = len(Setup(config).federation.clients)
    nodes = min(config.flower.num_supernodes or num_clients, num_clients)
    outcome: dict = {}
    server = ServerApp()

    threads = torch.get_num_threads()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        # Flower runs the ServerApp in a thread of its own, which starts with OpenMP's default
        # thread count, not the caller's: the server's own training (KD's distillation) would
        # then sum in another order than the same run in the simulator.
        torch.set_num_threads(threads)
        try:
            outcome["run_dir"] = run_on_grid(grid, config, resume=resume, overwrite=overwrite, show_progress=show_progress)
        except BaseException as err:  # noqa: BLE001 - re-raised in the caller's thread
            outcome["error"] = err

    log.info("Flower simulation: %d virtual SuperNodes for %d clients, %s per ClientApp", nodes, num_clients, backend_config(config)["client_resources"])
    run_simulation(server, clientapp.app, num_supernodes=nodes, backend_config=backend_config(config))
    if "error" in outcome:
        raise outcome["error"]
    if "run_dir" not in outcome:
        raise RuntimeError("the Flower simulation ended without running the ServerApp (see the log above)")
    return outcome["run_dir"]
