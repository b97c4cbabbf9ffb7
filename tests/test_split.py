"""Split-FedLLM (flexfed.split): the cut model trains exactly as the whole one, bytes on the
wire are the activations' and gradients' own, SplitFed v1/v2 server parts, resume, refusals."""

import json

import pytest
import torch

from flexfed.aggregation.fedit import fedit_average
from flexfed.aggregation.base import normalized_weights
from flexfed.build import Setup
from flexfed.config import ConfigError, load_config
from flexfed.protocol import Failure, Outcome, converse
from flexfed.runner import Runner
from flexfed.split.protocol import SplitProtocol


@pytest.fixture(scope="module")
def deep(tmp_path_factory):
    """A Setup on the four-layer tiny Llama, fp32, a clipping norm that bites, three local steps."""
    config = load_config("tiny", [
        f"output_dir={tmp_path_factory.mktemp('split')}", "model.name=tiny-llama-4", "federation.method=split",
        "training.precision=fp32", "training.local_steps=3", "training.lr=0.01", "training.max_grad_norm=0.5",
    ])
    return Setup(config)


def _split(setup, **options) -> SplitProtocol:
    s = setup.config.split
    defaults = {"cut_layer": 1, "tail_layers": 0, "server_mode": "v1", "wire_dtype": "model"}
    for key, value in {**defaults, **options}.items():
        setattr(s, key, value)
    return SplitProtocol(setup)


def _round(protocol, setup, state, round_, clients, log=None, drop=None):
    """One round's conversations through ``converse`` with the protocol's own ``serve`` (the
    in-process executor's delivery); ``log`` collects (client, sent, reply); ``drop``: a client
    whose node is gone after its second exchange (its reply is an error)."""
    conversations = {c: protocol.conversation(state, round_, c, True) for c in clients}
    exchanges = dict.fromkeys(clients, 0)

    def deliver(wave):
        replies = dict(zip(wave, protocol.serve(setup, list(wave.values()))))
        for c in wave:
            exchanges[c] += 1
            if c == drop and exchanges[c] == 2:
                replies[c] = ConnectionError("node gone")
            if log is not None:
                log.append((c, wave[c], replies[c]))
        return replies

    return converse(conversations, deliver)


def _max_diff(adapter, reference) -> float:
    assert set(adapter) == set(reference)
    return max(float((adapter[n].a - reference[n].a).abs().max()) + float((adapter[n].b - reference[n].b).abs().max()) for n in adapter)


CUTS = [(1, 0), (2, 0), (3, 0), (1, 1), (1, 2), (2, 1)]  # (cut_layer, tail_layers) on 4 blocks


def test_split_training_is_ordinary_lora_training_at_every_cut(deep):
    """One client, every cut, with and without U-shape: the same per-step losses and the same
    trained adapter (client part + server part), within fp32 tolerance, as ordinary LoRA training
    of the whole model from the same start on the same batches with the same seed."""
    client_id = deep.federation.clients[0].client_id
    examples = deep.examples(client_id)
    flops = {}
    for cut, tail in CUTS:
        protocol = _split(deep, cut_layer=cut, tail_layers=tail)
        state = protocol.initial_state()
        outcome = _round(protocol, deep, state, 1, [0])[0]
        assert isinstance(outcome, Outcome), outcome
        reference = deep.trainer.train(client_id, state.global_adapter, examples, protocol.server.client_seed(1, 0))
        assert outcome.stats["losses"] == pytest.approx(reference.losses, rel=1e-5, abs=1e-6), (cut, tail)
        trained = {**outcome.update.client, **outcome.update.server}
        assert _max_diff(trained, reference.adapter) < 1e-5, (cut, tail)
        assert _max_diff(trained, state.global_adapter) > 1e-3  # it did train
        if tail == 0:
            flops[cut] = (outcome.stats["flops"], outcome.stats["flops_analytic"], outcome.stats["peak_memory_bytes"])
    # The client's compute and memory grow with the cut (fall as it moves toward the input),
    # and stay below ordinary training of the whole model.
    for a, b in zip(sorted(flops), sorted(flops)[1:]):
        assert all(x < y for x, y in zip(flops[a], flops[b])), flops
    assert flops[3][0] < reference.cost["flops"] and flops[3][2] < reference.cost["peak_memory_bytes"]


@pytest.mark.parametrize("tail,wire_dtype,element", [(0, "model", 4), (0, "bfloat16", 2), (1, "float16", 2)])
def test_bytes_per_step_are_activations_and_gradients(deep, tail, wire_dtype, element):
    """Measured from the messages sent: up B·T·h·e + B·T (mask) + 8·B·T (labels) per step, down
    B·T·h·e; U-shape: twice B·T·h·e each way, plus the mask up, and never a label."""
    protocol = _split(deep, cut_layer=1, tail_layers=tail, wire_dtype=wire_dtype)
    log = []
    outcome = _round(protocol, deep, protocol.initial_state(), 1, [0], log)[0]
    h = deep.trainer.base_model.config.hidden_size
    up, down, step = [], [], None
    for _, sent, reply in log:  # each message the server sent, and the client's reply to it
        if sent.meta["op"] == "gradient":  # the step's gradient at the cut, for the batch of the last activations
            assert sent.nbytes == step * h * element
            down.append(sent.nbytes)
        if sent.meta["op"] == "output":
            assert sent.nbytes == step * h * element and reply.nbytes == step * h * element
        if reply.meta["op"] == "activations":
            rows, tokens = reply.arrays["attention_mask"].shape
            step = rows * tokens
            assert reply.arrays["hidden"].dtype == (torch.float32 if wire_dtype == "model" else getattr(torch, wire_dtype))
            assert ("labels" in reply.arrays) == (tail == 0)
            up.append(reply.nbytes)
            assert reply.nbytes == step * h * element + step + (8 * step if tail == 0 else 0)
    steps = deep.config.training.local_steps
    assert len(up) == len(down) == steps == outcome.update.steps
    per_step_up = [u if tail == 0 else u + d for u, d in zip(up, down)]  # U-shape: the gradient at the output goes up too
    assert outcome.update.bytes_up_per_step == per_step_up
    assert outcome.update.bytes_down_per_step == [d * (2 if tail else 1) for d in down]


def test_wire_compression_changes_the_loss_little(deep):
    losses = {}
    for wire_dtype in ("model", "bfloat16", "float16"):
        protocol = _split(deep, cut_layer=2, wire_dtype=wire_dtype)
        losses[wire_dtype] = _round(protocol, deep, protocol.initial_state(), 1, [0])[0].stats["losses"]
    for compressed in ("bfloat16", "float16"):
        assert losses[compressed][0] == pytest.approx(losses["model"][0], rel=1e-3)
        assert losses[compressed] == pytest.approx(losses["model"], rel=1e-2)
    assert losses["bfloat16"] != losses["model"]  # the rounding does reach the loss


def test_splitfed_v1_averages_the_server_copies_and_v2_shares_one(deep):
    clients = [0, 1, 2]
    weights = [deep.federation.clients[c].num_examples for c in clients]
    protocol = _split(deep, cut_layer=2, server_mode="v1")
    state = protocol.initial_state()
    out = _round(protocol, deep, state, 1, clients)
    updates = [out[c].update for c in clients]
    new = protocol.combine(state, 1, updates, weights)
    p = normalized_weights(weights)
    for n in protocol.server_shapes:  # v1: the weighted FedIT average of the clients' server-part copies
        expected = fedit_average([u.server[n] for u in updates], p)
        assert torch.equal(new.global_adapter[n].a, expected.a) and torch.equal(new.global_adapter[n].b, expected.b)
    for n in protocol.client_shapes:  # the client parts: the configured method (FedIT)
        expected = fedit_average([u.client[n] for u in updates], p)
        assert torch.equal(new.global_adapter[n].b, expected.b)
    assert len({float(u.server[n].b.abs().sum()) for u in updates for n in protocol.server_shapes}) > 1  # copies differ

    # v2: one server part trained by every client's steps; a failed client discards it.
    protocol = _split(deep, cut_layer=2, server_mode="v2")
    out = _round(protocol, deep, state, 1, clients)
    assert all(out[c].update.server is None for c in clients)
    v2 = protocol.combine(state, 1, [out[c].update for c in clients], weights)
    assert _max_diff({n: v2.global_adapter[n] for n in protocol.server_shapes}, {n: new.global_adapter[n] for n in protocol.server_shapes}) > 1e-4
    assert protocol.round_fields(v2, 1, [])["split"]["server_part"] == "updated"

    out = _round(protocol, deep, state, 2, clients, drop=1)
    assert isinstance(out[1], Failure) and isinstance(out[0], Outcome)
    dropped = protocol.combine(state, 2, [out[c].update for c in (0, 2)], [weights[0], weights[2]])
    assert protocol.round_fields(dropped, 2, [])["split"]["server_part"] == "discarded"
    for n in protocol.server_shapes:
        assert torch.equal(dropped.global_adapter[n].b, state.global_adapter[n].b)

    protocol = _split(deep, cut_layer=2, server_mode="v1")  # v1: the dropped client's copy is simply not averaged
    out = _round(protocol, deep, state, 2, clients, drop=1)
    kept = protocol.combine(state, 2, [out[c].update for c in (0, 2)], [weights[0], weights[2]])
    p = normalized_weights([weights[0], weights[2]])
    n = sorted(protocol.server_shapes)[0]
    assert torch.equal(kept.global_adapter[n].a, fedit_average([out[0].update.server[n], out[2].update.server[n]], p).a)


def test_a_malformed_activation_fails_that_client_alone(deep):
    protocol = _split(deep, cut_layer=1)
    state = protocol.initial_state()
    conversations = {c: protocol.conversation(state, 1, c, True) for c in (0, 1)}

    def deliver(wave):
        replies = dict(zip(wave, protocol.serve(deep, list(wave.values()))))
        if 1 in replies and replies[1].meta.get("op") == "activations":
            replies[1].arrays["hidden"] = replies[1].arrays["hidden"][:-1]  # one token short
        return replies

    out = converse(conversations, deliver)
    assert isinstance(out[0], Outcome)
    assert isinstance(out[1], Failure) and "activations: shape" in str(out[1].error)
    assert protocol.sessions.keys() <= {deep.federation.clients[1].client_id}  # client 0's round is closed


def test_a_client_norm_that_is_not_a_finite_number_fails_that_client_and_spares_the_server_part(deep):
    protocol = _split(deep, cut_layer=1, server_mode="v2")
    state = protocol.initial_state()
    conversations = {c: protocol.conversation(state, 1, c, True) for c in (0, 1)}

    def deliver(wave):
        replies = dict(zip(wave, protocol.serve(deep, list(wave.values()))))
        if 1 in replies and "grad_sq" in replies[1].meta:
            replies[1].meta["grad_sq"] = float("nan")
        return replies

    out = converse(conversations, deliver)
    assert isinstance(out[0], Outcome) and "grad_sq nan" in str(out[1].error)
    new = protocol.combine(state, 1, [out[0].update], [1])
    assert protocol.round_fields(new, 1, [])["split"]["server_part"] == "discarded"
    assert all(torch.isfinite(f.a).all() for f in new.global_adapter.values())


def test_runner_resumes_bit_exact_with_flexlora_at_mixed_client_ranks(tiny_config):
    """The runner drives split rounds like any protocol; FlexLoRA aggregates client parts of
    mixed ranks; a run stopped after round 1 and resumed ends bit for bit as one that was not."""
    options = ["federation.method=split", "split.client_method=flexlora", "split.server_mode=v2", "resources.distribution=uniform",
               "federation.sample_fraction=0.3", "training.precision=fp32", "eval.every=2"]
    whole = Runner(tiny_config("name=whole", *options)).run(show_progress=False)
    stopped = Runner(tiny_config("name=resumed", *options))
    stopped.run(show_progress=False, stop_after=1)
    resumed = Runner(tiny_config("name=resumed", *options)).run(resume=True, show_progress=False)
    a = (whole / "adapters" / "round-0002" / "adapter_model.safetensors").read_bytes()
    assert a == (resumed / "adapters" / "round-0002" / "adapter_model.safetensors").read_bytes()
    lines = [json.loads(x) for x in (whole / "metrics.jsonl").read_text().splitlines()]
    rounds = lines[1:]
    assert [r["split"]["server_part"] for r in rounds] == ["updated", "updated"]
    ranks = {json.dumps(c["ranks"]) for r in rounds for c in r["clients"]}
    assert len(ranks) > 1, ranks  # clients trained their parts at different ranks
    for r in rounds:
        for c in r["clients"]:
            assert c["steps"] == 2 and c["flops"] > 0 and c["peak_memory_bytes"] > 0
            assert c["bytes_up"] > sum(c["bytes_up_per_step"]) and c["bytes_down"] > sum(c["bytes_down_per_step"])  # plus the adapters
    assert lines[-1]["rouge_l_unseen"] is not None


@pytest.mark.parametrize("overrides,message", [
    (["split.cut_layer=2"], "split section applies to federation.method=split only"),
    (["federation.method=split", "split.client_method=flora"], "split.client_method 'flora'"),
    (["federation.method=split", "split.client_method=nope"], "split.client_method 'nope'"),
    (["federation.method=split", "privacy.clip_norm=1.0"], "privacy.clip_norm"),
])
def test_config_refuses_what_split_cannot_do(tiny_config, overrides, message):
    with pytest.raises(ConfigError, match=message):
        tiny_config(*overrides)


def test_protocol_refuses_a_cut_outside_the_model(tiny_config):
    for overrides, message in ((["split.cut_layer=2"], r"split.cut_layer=2: the model has 2 decoder blocks"),
                               (["split.tail_layers=1"], "leaves the server no block")):
        with pytest.raises(ValueError, match=message):
            Runner(tiny_config("federation.method=split", *overrides))


def test_a_parts_cost_counts_the_frozen_base_whether_or_not_peft_has_wrapped_it(tiny_config):
    """A node builds its client's cost before its model is wrapped, the in-process server after:
    both must count the same blocks (the Flower run's metrics equal the simulator's)."""
    from flexfed.split.parts import part_architecture

    setup = Setup(tiny_config("model.name=tiny-llama-4"))
    trainer = setup.trainer
    before = part_architecture(trainer.arch, trainer.base_model, [0, 3], head=True)
    trainer.use_slot(dict.fromkeys(setup.shapes, 4))
    after = part_architecture(trainer.arch, trainer.base_model, [0, 3], head=True)
    assert before == after
    whole = part_architecture(trainer.arch, trainer.base_model, [0, 1, 2, 3], head=True)
    assert (whole.body, whole.first_qkv, whole.layers) == (trainer.arch.body, trainer.arch.first_qkv, trainer.arch.layers)
