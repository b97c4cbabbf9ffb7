"""The run schema: one YAML file fully describes a run; ``--set key=value`` overrides any field.

Validation happens before any work starts: an unknown key, a wrong type or an impossible value
is reported with its dotted path.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(_Section):
    name: str = "smollm2-135m-instruct"  # a packaged name, a Hugging Face id or a local path
    dtype: Literal["float32", "bfloat16"] = "float32"


class DataColumns(_Section):
    """data.source=hf-datasets: which column holds each field (task, category: optional)."""

    prompt: str = "prompt"
    completion: str = "completion"  # a string, or a list of references whose first is the target
    task: str | None = None  # one task per value (by_task: one client per task); unset: one per category
    category: str | None = None  # held out by for unseen categories, skewed over by dirichlet; unset: "general"


class DataConfig(_Section):
    source: Literal["builtin", "natural-instructions", "instruction-jsonl", "prompt-completion", "hf-datasets"] = "builtin"
    path: str | None = None
    columns: DataColumns = Field(default_factory=DataColumns)  # hf-datasets only
    split: str | None = None  # hf-datasets: the split of a DatasetDict (default train, or its only one)
    examples_per_task: int = Field(64, ge=2)  # built-in suite only
    max_examples_per_task: int | None = Field(None, ge=2)
    unseen_fraction: float = Field(0.25, gt=0, lt=1)
    holdout_by: Literal["category", "task"] = "category"
    partition: Literal["by_task", "dirichlet", "iid"] = "by_task"
    num_clients: int | None = Field(None, ge=1)  # dirichlet / iid
    dirichlet_alpha: float = Field(0.5, gt=0)
    max_examples_per_client: int | None = Field(None, ge=1)  # by_task: cut large tasks into several clients
    max_tokens: int = Field(256, ge=16)
    max_response_tokens: int = Field(64, ge=1)

    @model_validator(mode="after")
    def _check(self):
        if self.source != "builtin" and not self.path:
            raise ValueError(f"data.path is required for data.source={self.source!r}")
        if self.source != "hf-datasets" and (self.split is not None or self.columns != DataColumns()):
            raise ValueError(f"data.columns and data.split apply to data.source='hf-datasets' only, not {self.source!r}")
        if self.partition in ("dirichlet", "iid") and self.num_clients is None:
            raise ValueError(f"data.num_clients is required for data.partition={self.partition!r}")
        if self.max_response_tokens >= self.max_tokens:
            raise ValueError("data.max_response_tokens must be smaller than data.max_tokens")
        return self


class LoraConfig(_Section):
    rank: int = Field(8, ge=1)
    alpha: float = Field(16.0, gt=0)
    rslora: bool = False  # scale alpha/sqrt(r) instead of alpha/r
    target_modules: list[str] = Field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"], min_length=1)


class RankType(_Section):
    attention: int = Field(ge=1)  # rank on q,k,v,o (and any other targeted non-MLP layer)
    mlp: int = Field(ge=1)  # rank on gate,up,down


class ResourcesConfig(_Section):
    """Per-client ranks. ``homogeneous`` gives every client ``lora.rank`` everywhere.

    ``memory`` gives clients memory budgets instead of types: ``budgets_gib`` names them
    (e.g. ``{phone: 4, laptop: 16}``), ``mix`` gives their shares of clients (default equal), and
    each client trains the largest type whose estimated training memory fits its budget.
    """

    distribution: Literal["homogeneous", "uniform", "heavy-tail-light", "heavy-tail-strong", "normal", "custom", "memory"] = "homogeneous"
    types: dict[str, RankType] = Field(default_factory=dict)  # overrides/extends T1..T4
    mix: dict[str, float] = Field(default_factory=dict)  # share of clients: type -> share (custom), budget -> share (memory)
    budgets_gib: dict[str, float] = Field(default_factory=dict)  # memory: budget name -> GiB for one client's training

    @model_validator(mode="after")
    def _check(self):
        if self.distribution == "custom" and not self.mix:
            raise ValueError("resources.mix is required for resources.distribution=custom")
        if self.distribution == "memory":
            if not self.budgets_gib:
                raise ValueError("resources.budgets_gib is required for resources.distribution=memory")
            if any(v <= 0 for v in self.budgets_gib.values()):
                raise ValueError("resources.budgets_gib values must be positive (GiB)")
            unknown = sorted(set(self.mix) - set(self.budgets_gib))
            if unknown:
                raise ValueError(f"resources.mix names budgets {unknown} that resources.budgets_gib does not define")
        if self.mix and (any(v < 0 for v in self.mix.values()) or sum(self.mix.values()) <= 0):
            raise ValueError("resources.mix shares must be non-negative and not all zero")
        return self


class TrainingConfig(_Section):
    optimizer: Literal["adamw", "sgd"] = "adamw"
    lr: float = Field(3e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    momentum: float = Field(0.0, ge=0, lt=1)  # sgd only
    batch_size: int = Field(4, ge=1)
    local_steps: int | None = Field(8, ge=1)
    local_epochs: float | None = Field(None, gt=0)
    max_grad_norm: float | None = Field(1.0, gt=0)
    # bf16: frozen base weights stored in bfloat16, LoRA factors, optimizer and loss in float32;
    # autocast: float32 weights under bf16 autocast; auto: bf16 where measured native (flexfed.precision)
    precision: Literal["auto", "fp32", "bf16", "autocast"] = "auto"
    # Sampled clients trained together in one forward/backward pass, each with its own adapter
    # and optimizer (same results as one at a time). auto: 1 on a CPU, where one client's batch
    # already fills the cores; 8 on a GPU, where it does not.
    clients_per_pass: int | Literal["auto"] = "auto"

    @model_validator(mode="after")
    def _one_budget(self):
        if (self.local_steps is None) == (self.local_epochs is None):
            raise ValueError("set exactly one of training.local_steps and training.local_epochs (the other to null)")
        if self.clients_per_pass != "auto" and self.clients_per_pass < 1:
            raise ValueError("training.clients_per_pass must be a positive integer or 'auto'")
        return self


class SparseStageConfig(_Section):
    """SLoRA's first stage: ``rounds`` rounds of sparse fine-tuning before LoRA (0: none)."""

    rounds: int = Field(0, ge=0)
    density: float = Field(0.01, gt=0, le=1)  # share of each adapted weight's entries trained


class FederationConfig(_Section):
    method: str = "fedit"
    method_options: dict[str, Any] = Field(default_factory=dict)
    rounds: int = Field(3, ge=1)
    sample_fraction: float = Field(0.1, gt=0, le=1)
    min_clients: int = Field(1, ge=1)  # a round with fewer successful clients keeps the old global adapter
    # A client update or aggregate whose s·B·A exceeds this many times ‖W0‖_F on any module is
    # refused (null: only non-finite ones). LoRA updates of a pretrained model stay far below 1.
    max_update_ratio: float | None = Field(10.0, gt=0)
    sparse_stage: SparseStageConfig = Field(default_factory=SparseStageConfig)
    # Where the server's aggregation math runs: cpu, or an accelerator (auto: the run's device).
    # FlexLoRA's SVDs are ~10 s a round on 2 CPU cores at SmolLM2's shapes, milliseconds on a GPU.
    server_device: str = "cpu"

    @property
    def writes_base(self) -> bool:
        """The method writes into the clients' base weights (FLoRA's merges, SLoRA's sparse stage,
        FedKSeed's perturbations), so they stay float32 (``flexfed.precision``)."""
        return self.method in ("flora", "fedkseed", "fedkseed-pro") or self.sparse_stage.rounds > 0

    @model_validator(mode="after")
    def _lora_rounds_left(self):
        if self.sparse_stage.rounds >= self.rounds:
            raise ValueError(f"federation.sparse_stage.rounds ({self.sparse_stage.rounds}) must leave LoRA rounds: it is not below federation.rounds ({self.rounds})")
        return self


class EvalConfig(_Section):
    every: int = Field(1, ge=1)  # round 0 and the last round are always evaluated
    seen_examples_per_task: int = Field(2, ge=1)  # held out from seen tasks, never trained on
    seen_examples: int = Field(64, ge=1)  # at most this many of the held-out seen examples
    unseen_examples: int = Field(64, ge=1)  # fixed seeded subset of the unseen tasks
    # Held-out instances of seen tasks, disjoint from the seen test set, on which the report
    # chooses the best round; 0: none. Kept small: every evaluated round generates for them too.
    validation_examples: int = Field(32, ge=0)
    max_new_tokens: int = Field(32, ge=1)
    batch_size: int = Field(16, ge=1)


class SecAggPlusConfig(_Section):
    """Flower's SecAgg+ parameters (``flower.secure_aggregation: secaggplus``; docs/flower.md).

    Each node clips every value it sends to ±clipping_range and rounds it stochastically to one of
    quantization_range levels, so the mean the server recovers is within about
    (number of nodes) x 2·clipping_range / quantization_range of the true weighted mean per value.
    """

    # Shares of each node's keys: an int >= 3 (that many neighbours), or a float in (0, 1], that
    # share of the round's nodes (1.0: every node of the round).
    num_shares: int | float = 1.0
    # Shares needed to rebuild a dropped node's mask: an int >= 2 below num_shares, or a float in
    # (0, 1], that share of num_shares. Higher: better privacy, fewer dropouts tolerated.
    reconstruction_threshold: int | float = 0.67
    clipping_range: float = Field(8.0, gt=0)  # |value| sent, after weighting; larger values are clipped
    quantization_range: int = Field(1 << 22, ge=2, lt=1 << 32)  # levels over [-clipping_range, clipping_range]
    # FlexLoRA only: each client sends its dense ΔW_i = s(r_i) B_i A_i (d·k values per matrix
    # instead of r_i·(d + k)), since FlexLoRA's SVD needs the sum of the products, not of the factors.
    dense: bool = False
    # Keep every array the ServerApp receives during secure aggregation, and the mean it recovers,
    # under RUN_DIR/secagg-audit/ (for audits and tests; sizes grow with the model).
    audit: bool = False

    @model_validator(mode="after")
    def _check(self):
        n, t = self.num_shares, self.reconstruction_threshold
        if isinstance(n, bool) or isinstance(t, bool):
            raise ValueError("num_shares and reconstruction_threshold are numbers, not booleans")
        if isinstance(n, int) and n < 3:
            raise ValueError(f"num_shares {n}: an integer number of shares must be at least 3 (or give a share of the round's nodes, e.g. 1.0)")
        if isinstance(n, float) and not 0 < n <= 1:
            raise ValueError(f"num_shares {n}: a share of the round's nodes must be in (0, 1]")
        if isinstance(t, int) and (t < 2 or (isinstance(n, int) and t >= n)):
            raise ValueError(f"reconstruction_threshold {t}: an integer threshold must be at least 2 and below num_shares ({n})")
        if isinstance(t, float) and not 0 < t <= 1:
            raise ValueError(f"reconstruction_threshold {t}: a share of num_shares must be in (0, 1]")
        return self


class FlowerConfig(_Section):
    """Flower engines only (``--engine flower-sim`` and deployment); the simulator ignores it."""

    round_timeout: float = Field(600.0, gt=0)  # seconds a round waits for replies; late clients are left out
    min_nodes: int = Field(1, ge=1)  # SuperNodes to wait for before the first round
    node_wait_timeout: float = Field(300.0, gt=0)  # seconds to wait for them
    node_concurrency: int = Field(1, ge=1)  # messages in flight per SuperNode (each trains in its own process)
    num_supernodes: int | None = Field(None, ge=1)  # flower-sim: virtual SuperNodes (default: one per client)
    client_cpus: float = Field(1.0, gt=0)  # flower-sim: Ray resources of one ClientApp
    client_gpus: float = Field(0.0, ge=0)
    # Secure aggregation on a Flower deployment (docs/flower.md#secure-aggregation): "secaggplus"
    # runs each round through Flower's SecAgg+ (``secaggplus_mod`` on the nodes, its workflow on the
    # ServerApp), so the server learns only the weighted mean of the round's updates.
    secure_aggregation: Literal["off", "secaggplus"] = "off"
    secaggplus: SecAggPlusConfig = Field(default_factory=SecAggPlusConfig)

    @field_validator("secure_aggregation", mode="before")
    @classmethod
    def _off(cls, value):
        return "off" if value is False or value is None else value  # YAML reads a bare `off` as false

    @model_validator(mode="after")
    def _check_secure(self):
        if self.secure_aggregation == "off" and self.secaggplus != SecAggPlusConfig():
            raise ValueError("flower.secaggplus applies with flower.secure_aggregation: secaggplus")
        return self


class TrackingConfig(_Section):
    tensorboard: bool = False  # also write every round's metrics to RUN_DIR/tensorboard (pip install flexfed[tracking])
    mlflow: bool = False  # also log the config and every round's metrics to MLflow (pip install flexfed[tracking])
    mlflow_uri: str | None = None  # MLflow tracking URI; default sqlite:///RUN_DIR/mlflow.db
    mlflow_experiment: str = "flexfed"

    @model_validator(mode="after")
    def _check(self):
        if not self.mlflow and (self.mlflow_uri is not None or self.mlflow_experiment != "flexfed"):
            raise ValueError("tracking.mlflow_uri and tracking.mlflow_experiment need tracking.mlflow: true")
        return self


class LocalDPConfig(_Section):
    """Example-level DP-SGD inside each client's training (Opacus; docs/privacy.md). Off while ``clip_norm`` is null."""

    clip_norm: float | None = Field(None, gt=0)  # C: each example's gradient is clipped to this norm
    noise_multiplier: float = Field(0.0, ge=0)  # σ: each step's summed clipped gradients get N(0, (σ C)²)

    @property
    def enabled(self) -> bool:
        return self.clip_norm is not None


class PrivacyConfig(_Section):
    """Client-level differential privacy (DP-FedAvg; docs/privacy.md). Off while ``clip_norm`` is null.
    ``local``: example-level DP-SGD on each client, on its own or beside it."""

    clip_norm: float | None = Field(None, gt=0)  # S: each client's update is clipped to this norm in its method's space
    noise_multiplier: float = Field(0.0, ge=0)  # σ: the aggregate gets N(0, (σ S max_i p_i)²) per coordinate
    delta: float = Field(1e-5, gt=0, lt=1)  # the δ that ε is reported for
    accountant: Literal["rdp", "prv"] = "rdp"  # Opacus's RDP or PRV accountant
    local: LocalDPConfig = Field(default_factory=LocalDPConfig)

    @property
    def enabled(self) -> bool:
        return self.clip_norm is not None


class RobustConfig(_Section):
    """Server-side defences against poisoned updates (docs/privacy.md)."""

    norm_bound: float | None = Field(None, ge=1)  # updates above this multiple of the round's median norm are ...
    norm_bound_action: Literal["reject", "clip"] = "reject"  # ... left out, or clipped to the bound
    aggregate: Literal["mean", "median", "trimmed_mean"] = "mean"  # coordinate-wise rules: fedit, ffa-lora, fed-sb
    trim_fraction: float = Field(0.1, ge=0, lt=0.5)  # trimmed_mean: share dropped at each end

    @property
    def enabled(self) -> bool:
        return self.norm_bound is not None or self.aggregate != "mean"


class AttackConfig(_Section):
    """Simulated attackers, to measure a defence: a seeded share of clients poison their updates."""

    fraction: float = Field(0.0, ge=0, le=1)  # share of the registered clients that attack (0: none)
    kind: Literal["scale", "sign_flip", "noise"] = "scale"
    scale: float = 10.0  # kind=scale: the factor on the honest change


class KDProxyConfig(_Section):
    """KD-FedLLM's public proxy set: prompts only, read by every party (``flexfed.kd.proxy``)."""

    path: str | None = None  # a JSONL file, one {"prompt": ..., "definition": optional} per line
    tasks: list[str] = Field(default_factory=list)  # no path: prompts of these unseen tasks (empty: every unseen task)
    prompts: int = Field(16, ge=1)  # at most this many prompts, a seeded draw
    max_new_tokens: int = Field(16, ge=1)  # response tokens the global model generates per prompt, each round


class KDConfig(_Section):
    """KD-FedLLM (``federation.method=kd``, docs/kd.md): clients send distributions on the proxy set."""

    mode: Literal["feddf", "fedmd"] = "feddf"  # fedmd: clients also distil the last round's consensus first
    encoding: Literal["full", "top-k", "labels"] = "top-k"  # what a client sends per scored position
    k: int = Field(16, ge=1)  # top-k: tokens kept per position (at most the vocabulary size)
    labels: list[str] = Field(default_factory=list)  # encoding=labels: the label words, one token each
    temperature: float = Field(1.0, gt=0)  # T of the distributions and of the distillation's KL
    mix_previous: float = Field(0.0, ge=0, lt=1)  # share of the previous global's distribution in the target
    server_steps: int = Field(8, ge=1)  # distillation steps on the proxy set per round
    server_lr: float = Field(1e-3, gt=0)
    client_distill_steps: int = Field(4, ge=1)  # fedmd: steps a client distils the consensus before training
    batch_size: int = Field(4, ge=1)  # proxy prompts per distillation step and per scoring pass
    client_layers: int | None = Field(None, ge=1)  # clients run the first this many decoder layers (None: all)
    proxy: KDProxyConfig = Field(default_factory=KDProxyConfig)

    @model_validator(mode="after")
    def _check(self):
        if (self.encoding == "labels") != bool(self.labels):
            raise ValueError("kd.labels is required for kd.encoding=labels, and applies to it only")
        if self.proxy.path is not None and self.proxy.tasks:
            raise ValueError("kd.proxy: set path (a file of prompts) or tasks (unseen tasks), not both")
        return self


class ZOConfig(_Section):
    """FedKSeed / FedKSeed-Pro (``federation.method=fedkseed|fedkseed-pro``, docs/zo.md); the
    local steps τ are ``training.local_steps``."""

    seeds: int = Field(4096, ge=1, le=2**24)  # K: the shared pool of perturbation seeds (indices travel as float32)
    eps: float = Field(5e-4, gt=0)  # ε: the perturbation scale of the two-point estimate
    lr: float = Field(3e-7, gt=0)  # η: the zeroth-order step size
    # fnmatch patterns over parameter names (``model.layers.*.mlp.*``); null: every parameter (the paper)
    modules: list[str] | None = None
    chunk: int = Field(2**20, ge=1)  # elements of z drawn at once; part of the stream every party regenerates


class SplitConfig(_Section):
    """federation.method=split (Split-FedLLM, docs/split.md): where the model is cut and how the
    server trains its part."""

    cut_layer: int = Field(1, ge=1)  # ℓ: the client runs the embeddings and decoder blocks 1..ℓ
    tail_layers: int = Field(0, ge=0)  # U-shape: the client also runs the last blocks and the head (labels stay home)
    server_mode: Literal["v1", "v2"] = "v1"  # SplitFed v1: a server-part copy per client, averaged; v2: one, updated client after client
    server_rank: int | None = Field(None, ge=1)  # LoRA rank of the server part (null: lora.rank)
    wire_dtype: Literal["model", "bfloat16", "float16"] = "model"  # activations and their gradients on the wire
    client_method: str = "fedit"  # how the client parts' LoRA is aggregated: a weights-protocol method
    client_method_options: dict[str, Any] = Field(default_factory=dict)
    # SFPrompt (arXiv 2407.17533): what the client part trains. lora: LoRA on the client's blocks,
    # aggregated by client_method; prompt: split.prompt_tokens virtual-token embeddings prepended
    # to every input, the client's blocks frozen with no LoRA, FedAvg-ed with the data-size weights.
    client_adapter: Literal["lora", "prompt"] = "lora"
    prompt_tokens: int = Field(0, ge=0)  # n, with client_adapter=prompt only
    # SFPrompt's local data pruning: each round a client drops this fraction of its examples, those
    # with the lowest EL2N score on its own head and tail (the ones it already fits); 0: off.
    prune_fraction: float = Field(0.0, ge=0.0, lt=1.0)


class RunConfig(_Section):
    name: str = "run"
    seed: int = 0
    output_dir: str = "runs"  # the run directory is output_dir/name
    device: str = "auto"  # auto: cuda when available, else cpu
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    lora: LoraConfig = Field(default_factory=LoraConfig)
    resources: ResourcesConfig = Field(default_factory=ResourcesConfig)
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    federation: FederationConfig = Field(default_factory=FederationConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    flower: FlowerConfig = Field(default_factory=FlowerConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    privacy: PrivacyConfig = Field(default_factory=PrivacyConfig)
    robust: RobustConfig = Field(default_factory=RobustConfig)
    attack: AttackConfig = Field(default_factory=AttackConfig)
    kd: KDConfig = Field(default_factory=KDConfig)  # federation.method=kd only
    zo: ZOConfig = Field(default_factory=ZOConfig)
    split: SplitConfig = Field(default_factory=SplitConfig)  # federation.method=split only

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.name

    @model_validator(mode="after")
    def _check_method(self):
        from flexfed.aggregation import Aggregator
        from flexfed.protocol import FAMILIES

        method, options = self.federation.method, self.federation.method_options
        if method != "kd" and self.kd != KDConfig():
            raise ValueError(f"the kd section applies to federation.method=kd, not {method!r}")
        if method not in ("fedkseed", "fedkseed-pro") and self.zo != ZOConfig():
            raise ValueError(f"the zo section applies to federation.method=fedkseed or fedkseed-pro, not {method!r}")
        if method != "split" and self.split != SplitConfig():
            raise ValueError(f"the split section applies to federation.method=split only, not {method!r}")
        from flexfed.aggregation.secure import check_config as check_secure

        check_secure(self)  # flower.secure_aggregation: only methods whose server needs a weighted sum
        if method in FAMILIES:  # a protocol of its own: its config section holds its options
            if options:
                raise ValueError(f"federation.method_options {options}: {method!r} takes its options from its own config section")
            if self.federation.sparse_stage.rounds:
                raise ValueError(f"federation.sparse_stage (SLoRA) is a stage of the weights protocol; {method!r} cannot run it")
            if self.privacy.local.enabled:
                raise ValueError(f"privacy.local (DP-SGD) covers the weights protocol's LoRA training; {method!r} cannot run it")
            if method == "split":
                from flexfed.split.checks import check_config

                check_config(self)
            return self
        if method not in Aggregator.registry:
            raise ValueError(f"federation.method {method!r} is not one of {sorted([*Aggregator.registry, *FAMILIES])}")
        try:  # the method's constructor checks its options: a typo fails here, before any work
            Aggregator.registry[method](**options)
        except (TypeError, ValueError) as err:
            raise ValueError(f"federation.method_options {options} for {method!r}: {err}") from None
        from flexfed.aggregation.defences import check_config

        check_config(self)  # privacy / robust settings the method cannot honour
        return self


class ConfigError(ValueError):
    pass


def _format(err: ValidationError, source: str) -> str:
    lines = [f"invalid config {source}:"]
    for e in err.errors():
        where = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = "unknown key" if e["type"] == "extra_forbidden" else e["msg"]
        lines.append(f"  {where}: {msg}")
    return "\n".join(lines)


def _parse_value(text: str) -> Any:
    return yaml.safe_load(text) if text != "" else ""


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """``["training.lr=1e-4", "lora.target_modules=[q_proj,v_proj]"]`` onto a raw mapping."""
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set expects key=value, got {item!r}")
        node = raw
        *parents, leaf = key.strip().split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {key}: {part!r} is not a section")
        node[leaf] = _parse_value(value.strip())
    return raw


def builtin_config_path(name: str) -> Path:
    path = resources.files("flexfed") / "configs" / f"{name}.yaml"
    return Path(str(path))


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> RunConfig:
    """Load and validate a run config; ``path`` may name a packaged config (e.g. ``quickstart``)."""
    if path is None:
        path = "quickstart"
    path = Path(path)
    if not path.exists() and path.suffix == "" and builtin_config_path(str(path)).exists():
        path = builtin_config_path(str(path))
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not UTF-8 text (byte {err.start}: {err.reason})") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return validate(apply_overrides(raw, list(overrides)), source=str(path))


def validate(raw: dict, source: str = "<dict>") -> RunConfig:
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_format(err, source)) from None


def dump(config: RunConfig) -> str:
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
