"""The Flower engines: the same rounds as the simulator, with clients trained by Flower ClientApps.

- ``serverapp``: the ServerApp (``FlowerEngine``: the simulator's round with ``execute`` sending
  one Message per sampled client and collecting replies until the round's deadline).
- ``clientapp``: the ClientApp (a SuperNode trains the clients its node config names).
- ``wire``: adapters to and from ``ArrayRecord``s, and their size as Flower serialises them.
- ``sim``: ``flexfed run --engine flower-sim`` on Flower's simulation engine (Ray).
- ``project``, ``deploy``: the Flower App for ``flwr run``, certificates, SuperLink/SuperNode
  commands (see docs/flower.md).

Importing this package turns Flower's telemetry and update check off unless the environment
already says otherwise (``FLWR_TELEMETRY_ENABLED``, ``FLWR_DISABLE_UPDATE_CHECK``).
"""

import os

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
