import math

import pytest
import torch

from flexfed.aggregation import get_aggregator
from flexfed.client import LocalTrainer
from flexfed.config import load_config
from flexfed.data import encode_for_training
from flexfed.lora import init_adapter, target_shapes
from flexfed.models import tiny_llama
from flexfed.multiclient import ClientJob, clients_per_pass, train_clients

# fp32 on the CPU: joint and one-at-a-time runs differ only in matmul shapes and padding width.
# Measured: losses within 2e-6, factors within 3e-5 (one AdamW step at lr 1e-2 moves an entry by
# up to 1e-2; Adam's m/sqrt(v) turns rounding noise in near-zero gradients into such steps),
# 2e-5 of the update's norm. The bounds below leave a few times that.
LOSS_TOLERANCE = {"rtol": 1e-5, "atol": 1e-5}
FACTOR_TOLERANCE = {"rtol": 1e-4, "atol": 1e-4}
UPDATE_TOLERANCE = 1e-4  # ||joint - alone|| / ||alone - start|| per factor

WORDS = ["apple", "river", "stone", "cloud", "green", "table", "music", "light", "ocean", "paper", "tiger", "lemon", "plant"]


@pytest.fixture(scope="module")
def jobs(tokenizer):
    """Five clients: different tasks, data sizes (so step counts) and rank layouts, one mixed per module."""
    tasks = [
        ("Reverse the word.", lambda w: w[::-1]),
        ("Uppercase the word.", str.upper),
        ("Give the first letter.", lambda w: w[0]),
        ("Double the word.", lambda w: w + w),
        ("Give the length of the word in letters, as a number.", lambda w: str(len(w))),
    ]
    sizes = [8, 3, 13, 5, 6]
    shapes = target_shapes(tiny_llama(), ["q_proj", "v_proj", "up_proj"])
    layouts = [
        {n: 4 for n in shapes},
        {n: 2 for n in shapes},
        {n: (8 if "up_proj" in n else 2) for n in shapes},
        {n: 4 for n in shapes},
        {n: 2 for n in shapes},
    ]
    out = []
    for k, ((definition, answer), size, ranks) in enumerate(zip(tasks, sizes, layouts)):
        examples = [encode_for_training(tokenizer, definition, w, answer(w), 96, 16) for w in WORDS[:size]]
        start = init_adapter(shapes, ranks, alpha=8, rslora=False, seed=k)
        # A non-zero B, as a server-sent adapter has after round 1: every factor gets gradients.
        for f in start.values():
            f.b.normal_(0, 0.02, generator=torch.Generator().manual_seed(k))
        out.append(ClientJob(f"client-{k}", start, examples, seed=100 + k))
    return out


def _trainer(tokenizer, *overrides):
    config = load_config(
        "tiny",
        ["lora.target_modules=[q_proj,v_proj,up_proj]", "training.precision=fp32", "training.local_steps=null", "training.local_epochs=2", "training.lr=0.01", *overrides],
    )
    return LocalTrainer(tiny_llama(), config.lora, config.training, tokenizer.pad_token_id)


def _assert_same(joint, alone, start):
    assert joint.client_id == alone.client_id and joint.num_examples == alone.num_examples
    assert joint.tokens == alone.tokens and len(joint.losses) == len(alone.losses)
    torch.testing.assert_close(torch.tensor(joint.losses), torch.tensor(alone.losses), **LOSS_TOLERANCE)
    assert joint.adapter.keys() == alone.adapter.keys()
    for n, f in alone.adapter.items():
        g = joint.adapter[n]
        assert g.scale == f.scale and g.a.dtype == f.a.dtype
        for x, y, s in ((g.a, f.a, start[n].a), (g.b, f.b, start[n].b)):
            torch.testing.assert_close(x, y, **FACTOR_TOLERANCE)
            if not torch.equal(y, s):
                assert (x - y).norm() <= UPDATE_TOLERANCE * (y - s).norm()


@pytest.mark.parametrize(
    "overrides",
    [
        ["training.optimizer=adamw", "training.weight_decay=0.1", "training.max_grad_norm=0.5"],
        ["training.optimizer=sgd", "training.lr=0.5", "training.momentum=0.9", "training.max_grad_norm=null"],
    ],
    ids=["adamw-clipped", "sgd-momentum"],
)
def test_clients_trained_together_equal_clients_trained_one_at_a_time(tokenizer, jobs, overrides):
    trainer = _trainer(tokenizer, *overrides)
    # On the bare base model first (no PEFT wrapper yet), then beside the PEFT slots the
    # sequential trainer creates: both must give what one-at-a-time training gives.
    before_peft = train_clients(trainer, jobs, per_pass=3)
    alone = train_clients(trainer, jobs, per_pass=1)
    flags = {n: p.requires_grad for n, p in trainer.base_model.named_parameters()}
    after_peft = train_clients(trainer, jobs, per_pass=3)
    assert trainer.peft_model is not None
    assert len({len(r.losses) for r in alone}) > 2  # the clients ran different numbers of steps
    for joint in (before_peft, after_peft):
        for j, a, job in zip(joint, alone, jobs):
            _assert_same(j, a, job.start)
    # Nothing is left behind on the model: the same trainable flags, eval mode, no hooks.
    assert flags == {n: p.requires_grad for n, p in trainer.base_model.named_parameters()}
    assert not trainer.base_model.training
    assert not any(m._forward_hooks for m in trainer.base_model.modules())


def test_clients_trained_together_in_bf16_match_one_at_a_time_within_rounding(tokenizer, jobs):
    """On the bf16 path the joint pass runs the branch in bf16 too: per-step losses within 2% and
    each client's update within 10% of its one-at-a-time update (bf16 rounds the activations)."""
    trainer = _trainer(tokenizer, "training.precision=bf16", "training.optimizer=adamw")
    joint = train_clients(trainer, jobs, per_pass=3)
    alone = train_clients(trainer, jobs, per_pass=1)
    for j, a, job in zip(joint, alone, jobs):
        assert j.tokens == a.tokens
        torch.testing.assert_close(torch.tensor(j.losses), torch.tensor(a.losses), rtol=0.02, atol=0.0)
        for n, f in a.adapter.items():
            learned = f.delta(torch.float32) - job.start[n].delta(torch.float32)
            assert (j.adapter[n].delta(torch.float32) - f.delta(torch.float32)).norm() <= 0.1 * learned.norm(), (job.client_id, n)


def test_a_client_with_a_non_finite_loss_leaves_alone(tokenizer, jobs):
    broken = jobs[1].start
    poisoned = {n: type(f)(b=f.b, a=torch.full_like(f.a, float("nan")), scale=f.scale) for n, f in broken.items()}
    mixed = [jobs[0], ClientJob("broken", poisoned, jobs[1].examples, jobs[1].seed), jobs[2], ClientJob("empty", jobs[3].start, [], 0)]
    trainer = _trainer(tokenizer)
    joint = train_clients(trainer, mixed, per_pass=4)
    alone = train_clients(trainer, mixed, per_pass=1)
    assert isinstance(joint[1], FloatingPointError) and "client broken: non-finite training loss at step 0" in str(joint[1])
    assert isinstance(joint[3], ValueError) and "no training examples" in str(joint[3])
    assert type(alone[1]) is type(joint[1]) and type(alone[3]) is type(joint[3])
    _assert_same(joint[0], alone[0], jobs[0].start)
    _assert_same(joint[2], alone[2], jobs[2].start)


def test_only_b_trains_when_a_is_frozen(tokenizer, jobs):
    trainer = _trainer(tokenizer)
    joint = train_clients(trainer, jobs[:2], per_pass=2, trainable=("b",))
    alone = train_clients(trainer, jobs[:2], per_pass=1, trainable=("b",))
    for j, a, job in zip(joint, alone, jobs):
        assert all(torch.equal(j.adapter[n].a, job.start[n].a) for n in job.start)
        _assert_same(j, a, job.start)


def test_a_methods_penalty_and_pruning_are_the_same_trained_together(tokenizer, jobs):
    """HetLoRA's local rule (tail penalty every step, rank cut at the end) in the batched trainer
    gives what the one training loop gives, pruned ranks included."""
    rule = get_aggregator("hetlora", gamma=0.5, **{"lambda": 10.0}).local_rule()
    trainer = _trainer(tokenizer)
    joint = train_clients(trainer, jobs, per_pass=3, rule=rule)
    alone = train_clients(trainer, jobs, per_pass=1, rule=rule)
    pruned = 0
    for j, a, job in zip(joint, alone, jobs):
        ranks = {n: f.rank for n, f in a.adapter.items()}
        assert ranks == {n: f.rank for n, f in j.adapter.items()}
        assert ranks in ({n: f.rank for n, f in job.start.items()}, rule.pruned_ranks({n: f.rank for n, f in job.start.items()}))
        pruned += ranks != {n: f.rank for n, f in job.start.items()}
        torch.testing.assert_close(torch.tensor(j.losses), torch.tensor(a.losses), **LOSS_TOLERANCE)
        for n, f in a.adapter.items():
            torch.testing.assert_close(j.adapter[n].a, f.a, **FACTOR_TOLERANCE)
            torch.testing.assert_close(j.adapter[n].b, f.b, **FACTOR_TOLERANCE)
    assert pruned > 0


def test_auto_clients_per_pass():
    assert clients_per_pass("auto", torch.device("cpu")) == 1
    assert clients_per_pass("auto", torch.device("cuda")) == 8
    assert clients_per_pass(4, torch.device("cpu")) == 4


def test_a_simulated_round_is_the_same_with_clients_trained_together(tiny_config):
    from flexfed.engines.simulation import Simulation

    def round_one(name, per_pass):
        config = tiny_config(f"name={name}", "federation.rounds=1", "federation.method=flexlora", "resources.distribution=uniform", "training.precision=fp32", f"training.clients_per_pass={per_pass}")
        sim = Simulation(config)
        state = sim.server.initial_state()
        return sim, sim.round(state, 1, progress=None)

    sim, alone = round_one("alone", 1)
    _, joint = round_one("joint", 4)
    a, j = alone.metrics[-1], joint.metrics[-1]
    assert a["clients_reported"] == j["clients_reported"] == 5 and len({c["ranks"]["q_proj"] for c in j["clients"]}) > 1
    assert [c["id"] for c in a["clients"]] == [c["id"] for c in j["clients"]]
    assert a["tokens_trained"] == j["tokens_trained"]
    assert j["train_loss"] == pytest.approx(a["train_loss"], rel=1e-5)
    for n, f in alone.global_adapter.items():
        torch.testing.assert_close(joint.global_adapter[n].b, f.b, **FACTOR_TOLERANCE)


def test_a_poisoned_client_leaves_a_joint_round_alone(tiny_config):
    from flexfed.engines.simulation import Simulation

    config = tiny_config("federation.rounds=1", "training.clients_per_pass=8", "training.precision=fp32")
    sim = Simulation(config)
    victim = sim.server.sample(1)[2]
    start_adapter = sim.server.start_adapter

    def poisoned(state, client):
        start = start_adapter(state, client)
        if client == victim:
            start = {n: type(f)(b=f.b, a=f.a * float("nan"), scale=f.scale) for n, f in start.items()}
        return start

    sim.server.start_adapter = poisoned
    record = sim.round(sim.server.initial_state(), 1, progress=None).metrics[-1]
    assert [f["id"] for f in record["clients_failed"]] == [sim.federation.clients[victim].client_id]
    assert "non-finite training loss" in record["clients_failed"][0]["reason"]
    assert record["clients_reported"] == record["clients_sampled"] - 1
    assert all(math.isfinite(c["loss"]) for c in record["clients"])
