"""The runner's shape: a protocol of hooks carried by an executor, and the client cost of every run."""

import ast
import io
import json
import re
import tokenize
from pathlib import Path

import pytest
import torch

from flexfed.lora import Factors
from flexfed.protocol import Message, Protocol
from flexfed.runner import Runner
from flexfed.server import ServerState, load_checkpoint

SRC = Path(__file__).resolve().parents[1] / "src" / "flexfed"


# ----------------------------------------------------------------------------- a protocol of its own


def _value(state: ServerState) -> float:
    return float(state.global_adapter["x"].b)


def _state(round_: int, value: float, metrics=()) -> ServerState:
    return ServerState(round=round_, global_adapter={"x": Factors(b=torch.tensor([[value]]), a=torch.ones(1, 1), scale=1.0)}, metrics=list(metrics))


class Relay(Protocol):
    """Two exchanges per client and round: the server sends its value x and the client answers
    x + its shard size n; the server sends that back doubled and the client answers it plus n.
    The update, 2 (x + n) + n, is combined as the weighted mean of the clients'."""

    def __init__(self, setup, failing: str | None = None):
        self.setup, self.failing, self.served = setup, failing, []

    def initial_state(self):
        return _state(0, 1.0)

    def conversation(self, state, round_, client, shares_base):
        who = {"client": self.setup.federation.clients[client].client_id}
        first = yield Message({"x": state.global_adapter["x"].b.clone()}, {**who, "step": 1})
        second = yield Message({"x": 2 * first.arrays["x"]}, {**who, "step": 2})
        return float(second.arrays["x"])

    def serve(self, setup, messages, on_done=None):
        out = []
        for m in messages:
            self.served.append((m.meta["client"], m.meta["step"]))
            shard = setup.federation.clients[setup.shard_index(m.meta["client"])]
            if m.meta["client"] == self.failing and m.meta["step"] == 2:
                out.append(ValueError("gave up mid-conversation"))
                continue
            stats = {"client": shard.client_id, "num_examples": shard.num_examples, "loss": 0.0, "tokens": 0, "seconds": 0.0}
            out.append(Message({"x": m.arrays["x"] + shard.num_examples}, stats))
        return out

    def combine(self, state, round_, updates, weights):
        mean = sum(u * w for u, w in zip(updates, weights)) / sum(weights)
        return _state(round_, mean, state.metrics)

    def evaluated(self, trainer, state):
        raise AssertionError("not evaluated in this test")


def _relay_run(tiny_config, name, failing=None, **run):
    config = tiny_config(f"name={name}", "federation.rounds=3", "federation.sample_fraction=0.1")
    runner = Runner(config, protocol=lambda setup: Relay(setup, failing))
    runner.evaluate = lambda state: {"time_eval_s": 0.0}
    runner.run(show_progress=False, **run)
    return runner, [json.loads(line) for line in (config.run_dir / "metrics.jsonl").read_text().splitlines()]


def test_a_protocol_of_its_own_runs_through_the_runner_with_several_exchanges_per_client(tiny_config):
    runner, metrics = _relay_run(tiny_config, "relay")
    clients = runner.federation.clients
    x = 1.0
    for m in metrics[1:]:
        sizes = {c["id"]: c["examples"] for c in m["clients"]}
        assert m["clients_reported"] == m["clients_sampled"] == len(sizes) > 1
        assert all(c["bytes_down"] == c["bytes_up"] == 2 * 4 for c in m["clients"])  # two float32 scalars each way
        x = sum((2 * (x + n) + n) * n for n in sizes.values()) / sum(sizes.values())
    assert _value(load_checkpoint(runner.run_dir)) == pytest.approx(x, rel=1e-6)
    # each sampled client was served twice per round, step 1 before step 2
    first = [c for c, step in runner.protocol.served if step == 1]
    assert [c for c, step in runner.protocol.served if step == 2] == first and set(first) <= {c.client_id for c in clients}

    # resumed after round 1: the same final state
    resumed, _ = _relay_run(tiny_config, "relay-resumed", stop_after=1)
    again = Runner(resumed.config, protocol=lambda setup: Relay(setup))
    again.evaluate = lambda state: {"time_eval_s": 0.0}
    again.run(resume=True, show_progress=False)
    assert _value(load_checkpoint(again.run_dir)) == _value(load_checkpoint(runner.run_dir))


def test_a_client_failing_in_a_later_exchange_is_left_out_with_what_it_was_sent(tiny_config):
    probe = Runner(tiny_config("name=probe", "federation.sample_fraction=0.1"), protocol=lambda setup: Relay(setup))
    from flexfed.server import sample_clients

    victim = probe.federation.clients[sample_clients(probe.config, len(probe.federation.clients), 1)[0]].client_id
    _, metrics = _relay_run(tiny_config, "relay-fail", failing=victim)
    round1 = metrics[1]
    assert [f["id"] for f in round1["clients_failed"]] == [victim]
    assert "gave up mid-conversation" in round1["clients_failed"][0]["reason"]
    assert round1["clients_failed"][0]["bytes_down"] == 2 * 4  # both messages went out
    assert round1["clients_reported"] == round1["clients_sampled"] - 1


# ----------------------------------------------------------------------------- what stays out of the runner and engines


def _code(path: Path) -> str:
    """The module's code without comments and strings (docstrings included)."""
    kept = [t.string for t in tokenize.generate_tokens(io.StringIO(path.read_text()).readline) if t.type not in (tokenize.COMMENT, tokenize.STRING)]
    return " ".join(kept)


METHOD_SPECIFICS = re.compile(r"merges_into_base|sparse_stage|sparse_indices|train_sparse|advance_sparse|check_sparse|in_sparse_stage|SparseStage|\bflora\w*|FLoRA")


def test_no_module_outside_the_weights_protocol_branches_on_flora_or_slora():
    outside = [p for p in SRC.rglob("*.py") if "aggregation" not in p.relative_to(SRC).parts and p.name != "config.py"]
    assert len(outside) > 20
    found = {str(p.relative_to(SRC)): sorted(set(METHOD_SPECIFICS.findall(_code(p)))) for p in outside}
    assert {k: v for k, v in found.items() if v} == {}


def _flower_imports() -> dict[str, set[str]]:
    package = SRC / "engines" / "flower"
    graph = {}
    for path in package.glob("*.py"):
        names = set()
        for node in ast.walk(ast.parse(path.read_text())):  # function-level imports count too
            if isinstance(node, ast.ImportFrom) and node.module:
                if node.module == "flexfed.engines.flower":
                    names |= {a.name for a in node.names}
                elif node.module.startswith("flexfed.engines.flower."):
                    names.add(node.module.rsplit(".", 1)[1])
            elif isinstance(node, ast.Import):
                names |= {a.name.rsplit(".", 1)[1] for a in node.names if a.name.startswith("flexfed.engines.flower.")}
        graph[path.stem] = names & {p.stem for p in package.glob("*.py")}
    return graph


def test_the_flower_package_has_no_import_cycle():
    graph = _flower_imports()
    assert "worker" not in graph["clientapp"] or "clientapp" not in graph["worker"]

    def reach(start: str) -> set[str]:
        seen, todo = set(), [start]
        while todo:
            for nxt in graph.get(todo.pop(), ()):
                if nxt not in seen:
                    seen.add(nxt)
                    todo.append(nxt)
        return seen

    assert [m for m in graph if m in reach(m)] == []


def test_the_flower_engine_is_the_runner_with_another_executor():
    from flexfed.engines.flower.serverapp import FlowerEngine

    own = {k for k in vars(FlowerEngine) if not k.startswith("__")}
    assert own == {"grid", "resume_hint"}  # no round, start or evaluation of its own: only the executor (and how a user resumes) differ


# ----------------------------------------------------------------------------- client cost


FLOP_TOLERANCE = 0.02  # counted (FlopCounterMode, one step, extended by the formula) vs the formula


def test_every_client_record_has_its_flops_and_peak_memory(tiny_config):
    from flexfed.report import write_report

    config = tiny_config("name=cost", "federation.rounds=1", "federation.method=flexlora", "resources.distribution=uniform", "eval.seen_examples=2", "eval.unseen_examples=2")
    runner = Runner(config)
    runner.run(show_progress=False)
    record = [json.loads(line) for line in (config.run_dir / "metrics.jsonl").read_text().splitlines()][1]
    assert record["clients_reported"] > 1
    for c in record["clients"]:
        assert c["flops"] > 0 and abs(c["flops"] / c["flops_analytic"] - 1) < FLOP_TOLERANCE, c
        assert c["peak_memory_bytes"] > 0 and c["peak_memory_source"] == ("cuda_max_allocated" if runner.device.type == "cuda" else "estimate")
    assert record["flops"] == sum(c["flops"] for c in record["clients"])
    # more tokens, more FLOPs: the formula's count grows with what the client trained
    by_tokens = sorted(record["clients"], key=lambda c: c["tokens"])
    assert by_tokens[0]["flops_analytic"] <= by_tokens[-1]["flops_analytic"]
    out = write_report([config.run_dir])
    assert "client GFLOP / round" in (out / "summary.md").read_text()
    s = json.loads((out / "summary.json").read_text())["runs"][0]
    assert s["client_flops_mean"] == pytest.approx(sum(c["flops"] for c in record["clients"]) / record["clients_reported"])
    assert s["client_peak_memory_bytes"] == max(c["peak_memory_bytes"] for c in record["clients"])


def test_the_formula_gives_the_specs_figure_for_a_smollm2_training_token():
    """SPEC: one LoRA training token of SmolLM2-135M costs about 0.42 GFLOP through its body
    (forward plus input gradients through 106 M frozen weights); attention and the output
    projection come on top, with the sequence length and the labelled share."""
    from flexfed.config import TrainingConfig
    from flexfed.cost import Architecture
    from flexfed.models import SMOLLM2, load_skeleton

    arch = Architecture.of(load_skeleton(SMOLLM2), TrainingConfig(), autocast=False)
    assert arch.body == pytest.approx(106e6, rel=0.01)
    body_per_token = arch.step_flops(1, 1, 0, 0) - 14 * arch.layers * arch.q_dim  # one token: less its attention
    assert body_per_token == pytest.approx(0.42e9, rel=0.02)


def _direct_trainer():
    """A trainer of a tiny Llama with a small head (so that the body and attention terms
    dominate) and twelve random examples of 20-60 tokens, 3-15 of them labelled."""
    from conftest import random_examples

    from flexfed.client import LocalTrainer
    from flexfed.config import LoraConfig, TrainingConfig
    from flexfed.lora import init_adapter, target_shapes
    from flexfed.models import tiny_llama

    model = tiny_llama(vocab_size=64)
    lora = LoraConfig(rank=4, target_modules=["q_proj", "v_proj", "up_proj"])
    shapes = target_shapes(model, lora.target_modules)
    trainer = LocalTrainer(model, lora, TrainingConfig(local_steps=3, batch_size=4, precision="fp32"), 0)
    return trainer, init_adapter(shapes, dict.fromkeys(shapes, 4), lora.alpha, False, 0), random_examples(12, 0, (20, 60), (3, 15))


def test_flops_are_counted_on_a_sampled_step_and_match_the_formula_on_a_direct_train():
    trainer, start, examples = _direct_trainer()
    result = trainer.train("c", start, examples, 0)
    assert abs(result.cost["flops"] / result.cost["flops_analytic"] - 1) < FLOP_TOLERANCE, result.cost


def test_a_counted_step_is_bit_identical_to_an_uncounted_one_and_counts_what_pytorch_counts(monkeypatch):
    """Counting must not touch the numerics (a run's result cannot depend on which of its steps
    were counted); the count is PyTorch's own (``FlopCounterMode``) total for the same step."""
    from torch.utils.flop_counter import FlopCounterMode

    from flexfed.cost import StepCost

    trainer, start, examples = _direct_trainer()
    counted = trainer.train("c", start, examples, 0)
    monkeypatch.setattr(StepCost, "flop_counter", lambda self: None)
    uncounted = trainer.train("c", start, examples, 0)
    assert counted.losses == uncounted.losses
    for name, f in counted.adapter.items():
        assert torch.equal(f.a, uncounted.adapter[name].a) and torch.equal(f.b, uncounted.adapter[name].b), name

    first_step = []
    monkeypatch.setattr(StepCost, "flop_counter", lambda self: first_step.append(FlopCounterMode(display=False)) or first_step[-1] if self.counted is None else None)
    reference = trainer.train("c", start, examples, 0)
    assert reference.cost["flops"] == counted.cost["flops"] and first_step[0].get_total_flops() > 0
