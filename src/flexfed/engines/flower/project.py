"""The Flower App that ``flwr run`` submits: a ``pyproject.toml`` naming flexfed's apps.

The app holds no code: its components are ``flexfed.engines.flower.serverapp:app`` and
``flexfed.engines.flower.clientapp:app``, so the SuperLink's and the SuperNodes' machines need
flexfed installed (Flower's runtime dependency installation stays off). The run's resolved
flexfed config is embedded as YAML in the app's run config (``flexfed-config``), so the FAB
carries everything a run needs and ``flwr run --run-config`` can still override it.
"""

from __future__ import annotations

import json
from pathlib import Path

from flexfed import config as config_lib
from flexfed.config import RunConfig

SERVERAPP = "flexfed.engines.flower.serverapp:app"
CLIENTAPP = "flexfed.engines.flower.clientapp:app"


def _toml_string(text: str) -> str:
    """``text`` as TOML: a readable multi-line literal string when it can be one, else a basic string."""
    if "'''" not in text and all(ch == "\n" or ch == "\t" or ch >= " " for ch in text) and "\x7f" not in text:
        return "'''\n" + text + "'''"
    return json.dumps(text, ensure_ascii=False)  # JSON escaping is valid in a TOML basic string


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("flexfed")
    except PackageNotFoundError:
        return "0.0.0"


def app_pyproject(config: RunConfig, resume: bool = False, overwrite: bool = False) -> str:
    name = "flexfed-" + "".join(ch if ch.isalnum() else "-" for ch in config.name.lower()).strip("-")
    return f"""# A Flower App for one flexfed run; written by `flexfed flower app`. Submit it with
#   flwr run <this directory> <superlink connection> --stream
[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "{name}"
version = "{_version()}"
description = "flexfed run {config.name}: federated LoRA fine-tuning ({config.federation.method})"
license = "Apache-2.0"
dependencies = []  # flexfed must be installed on every machine; nothing is installed at run time

[tool.flwr.app]
publisher = "flexfed"

[tool.flwr.app.components]
serverapp = "{SERVERAPP}"
clientapp = "{CLIENTAPP}"

[tool.flwr.app.config]
flexfed-config = {_toml_string(config_lib.dump(config))}
flexfed-set = ""
resume = {str(resume).lower()}
overwrite = {str(overwrite).lower()}
"""


def write_app(directory: str | Path, config: RunConfig, resume: bool = False, overwrite: bool = False) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "pyproject.toml").write_text(app_pyproject(config, resume=resume, overwrite=overwrite))
    return directory
