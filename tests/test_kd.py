"""KD-FedLLM (``federation.method=kd``): the encodings' arithmetic, distillation, bytes, resume,
smaller client models, refused settings, and Flower's simulation engine against the simulator."""

import json
import os
import signal
import subprocess
import sys

import pytest
import torch

from flexfed.aggregation.base import payload_bytes
from flexfed.config import ConfigError, load_config
from flexfed.kd.distill import Encoding, kl_per_position, mixture, probabilities
from flexfed.runner import Runner
from flexfed.server import load_checkpoint

V = 49152  # SmolLM2's vocabulary, which the tiny model shares
SMALL_RUN = ["federation.method=kd", "kd.proxy.prompts=4", "kd.proxy.max_new_tokens=4", "kd.server_steps=2", "eval.seen_examples=2", "eval.unseen_examples=2", "eval.validation_examples=0"]


def _metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _run(tiny_config, *overrides, **run):
    config = tiny_config(*SMALL_RUN, *overrides)
    runner = Runner(config)
    runner.run(show_progress=False, **run)
    return runner, _metrics(config.run_dir)


# ----------------------------------------------------------------------------- the arithmetic


def test_top_k_with_k_equal_to_the_vocabulary_mixes_exactly_as_the_full_vocabulary():
    g = torch.Generator().manual_seed(0)
    logits = [torch.randn(6, V, generator=g) * 3 for _ in range(3)]
    weights = [5, 1, 3]
    full, top = Encoding("full", V), Encoding("top-k", V, k=V)
    for temperature in (1.0, 2.0):
        probs = [probabilities(z, temperature) for z in logits]
        dense_full = mixture([full.encode(p) for p in probs], weights, full)
        dense_top = mixture([top.encode(p) for p in probs], weights, top)
        assert torch.equal(dense_full, dense_top)
        assert torch.allclose(dense_full.sum(-1), torch.ones(6), atol=1e-5)


def test_top_k_supports_are_unioned_with_each_clients_rest_spread_over_what_it_did_not_send():
    vocab = 6
    top2 = Encoding("top-k", vocab, k=2)
    # client 1 sends tokens 0, 1 (0.5, 0.3, rest 0.2); client 2 sends tokens 4, 5 (0.6, 0.2, rest 0.2)
    one = {"values": torch.tensor([[0.5, 0.3]]), "indices": torch.tensor([[0.0, 1.0]]), "rest": torch.tensor([[0.2]])}
    two = {"values": torch.tensor([[0.6, 0.2]]), "indices": torch.tensor([[4.0, 5.0]]), "rest": torch.tensor([[0.2]])}
    mixed = mixture([one, two], [3, 1], top2)[0]
    w1, w2 = 0.75, 0.25
    expected = torch.tensor([
        w1 * 0.5 + w2 * 0.2 / 4,  # in client 1's support, client 2's rest share
        w1 * 0.3 + w2 * 0.2 / 4,
        w1 * 0.2 / 4 + w2 * 0.2 / 4,  # in no support: both rests
        w1 * 0.2 / 4 + w2 * 0.2 / 4,
        w1 * 0.2 / 4 + w2 * 0.6,
        w1 * 0.2 / 4 + w2 * 0.2,
    ])
    assert torch.allclose(mixed, expected, atol=1e-7) and abs(float(mixed.sum()) - 1) < 1e-6


def test_each_encoding_sends_the_bytes_of_its_formula_and_refuses_malformed_payloads():
    probs = probabilities(torch.randn(7, V, generator=torch.Generator().manual_seed(1)), 1.0)
    for enc, per_position in ((Encoding("full", V), V * 4), (Encoding("top-k", V, k=16), 16 * (4 + 4) + 4), (Encoding("labels", V, labels=(11, 22, 33)), (3 + 1) * 4)):
        payload = enc.encode(probs)
        assert payload_bytes(payload) == enc.nbytes(7) == 7 * per_position
        enc.check(payload, 7)
        with pytest.raises(ValueError, match="shape"):
            enc.check(payload, 8)
    top = Encoding("top-k", V, k=4)
    good = top.encode(probs)
    for name, bad in (("values", good["values"] * 3), ("indices", good["indices"] + 0.5), ("indices", good["indices"] + V), ("values", good["values"] * float("nan"))):
        with pytest.raises(ValueError):
            top.check({**good, name: bad}, 7)
    with pytest.raises(ValueError, match="out of range"):
        Encoding("top-k", V, k=V + 1)


# ----------------------------------------------------------------------------- distillation


def test_distilling_one_clients_full_vocabulary_distribution_drives_the_servers_kl_to_it_below_a_bound(tiny_config):
    """One client, the server's own model, T = 1: after 30 distillation steps the global model's
    KL to the client's distribution on the proxy positions is below 1e-3 nats, from above 1e-2."""
    runner, metrics = _run(
        tiny_config, "data.partition=iid", "data.num_clients=1", "federation.sample_fraction=1", "federation.rounds=1",
        "kd.encoding=full", "kd.temperature=1", "training.lr=0.02", "training.local_steps=8", "kd.server_steps=30", "kd.server_lr=0.01",
        "kd.proxy.prompts=8", "kd.proxy.max_new_tokens=8",
    )
    kd, setup = runner.protocol, runner.setup
    start = kd.initial_state()
    examples = kd.examples(kd.responses(start, 1))  # the round's scored positions (kept from the run)
    # The client's distribution, recomputed: its training from the global adapter is seeded.
    client = setup.federation.clients[0].client_id
    (reply,) = kd.serve(setup, [next(kd.conversation(start, 1, 0, True))])
    assert reply.meta["client"] == client
    target = kd.encoding.dense(reply.arrays)
    before = kl_per_position(target, kd.score(setup.trainer, start.global_adapter, examples)[0], 1.0).mean()
    after = kl_per_position(target, kd.score(setup.trainer, load_checkpoint(runner.run_dir).global_adapter, examples)[0], 1.0).mean()
    assert before > 1e-2 and after < 1e-3, (float(before), float(after))
    assert metrics[1]["kd_kl_after"] == pytest.approx(float(after), rel=1e-4)


# ----------------------------------------------------------------------------- bytes, smaller clients, resume


def test_bytes_per_client_follow_the_formula_and_a_smaller_client_model_costs_less(tiny_config):
    full, metrics = _run(tiny_config, "name=full", "kd.k=5", "federation.rounds=1")
    (m,) = metrics[1:]
    positions = m["kd_positions"]
    assert 4 <= positions <= 4 * 4  # 4 prompts, at most 4 response tokens each
    adapter = sum(f.a.numel() + f.b.numel() for f in full.protocol.initial_state().global_adapter.values()) * 4
    for c in m["clients"]:
        assert c["bytes_up"] == positions * (5 * (4 + 4) + 1 * 4)
        assert c["bytes_down"] == adapter + 4 * 4 * 4  # the adapter, and 4 x 4 response token ids
    small, small_metrics = _run(tiny_config, "name=small", "kd.k=5", "federation.rounds=1", "kd.client_layers=1")
    (s,) = small_metrics[1:]
    by_id = {c["id"]: c for c in m["clients"]}
    for c in s["clients"]:
        assert c["layers"] == 1 and c["bytes_down"] == adapter // 2 + 4 * 4 * 4  # the first of the two layers' modules
        assert c["flops_analytic"] < by_id[c["id"]]["flops_analytic"]  # the same steps, one layer fewer
    assert s["rouge_l_unseen"] is not None  # the server's full model is evaluated


def test_an_interrupted_fedmd_run_resumes_to_the_same_global_and_consensus_bit_for_bit(tiny_config):
    args = ("kd.mode=fedmd", "federation.rounds=2", "kd.client_distill_steps=2", "eval.every=2")
    whole, metrics = _run(tiny_config, "name=whole", *args)
    assert metrics[2]["flops"] > metrics[1]["flops"]  # round 2's clients also digest round 1's consensus
    cut, _ = _run(tiny_config, "name=cut", *args, stop_after=1)
    Runner(cut.config).run(resume=True, show_progress=False)
    a, b = load_checkpoint(whole.run_dir), load_checkpoint(cut.run_dir)
    assert set(a.global_adapter) == set(b.global_adapter) and set(a.tensors) == set(b.tensors) >= {"consensus.values", "consensus.indices", "consensus.rest", "consensus.responses"}
    for n in a.global_adapter:
        assert torch.equal(a.global_adapter[n].a, b.global_adapter[n].a) and torch.equal(a.global_adapter[n].b, b.global_adapter[n].b)
    assert all(torch.equal(a.tensors[k], b.tensors[k]) for k in a.tensors)


# ----------------------------------------------------------------------------- refused settings


@pytest.mark.parametrize("overrides, message", [
    (["kd.proxy.path=/nonexistent/proxy.jsonl"], "kd.proxy.path '/nonexistent/proxy.jsonl': file not found"),
    (["kd.k=49153"], "kd.k=49153 is out of range"),
    (["kd.encoding=labels", "kd.labels=[unbelievably]"], "kd.labels: 'unbelievably' is 4 tokens"),
    (["kd.proxy.tasks=[add]"], "'add' is a training task"),
    (["privacy.clip_norm=1.0"], "cannot honour privacy.clip_norm"),
    (["kd.client_layers=3"], "kd.client_layers=3: the server's model has 2 decoder layers"),
])
def test_settings_kd_cannot_honour_are_refused_naming_the_field(tiny_config, overrides, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
        Runner(tiny_config("federation.method=kd", *overrides))


def test_a_proxy_file_is_read_line_by_line_and_a_bad_line_is_named(tiny_config, tmp_path):
    good = tmp_path / "proxy.jsonl"
    good.write_text("\n".join(json.dumps({"prompt": f"Say {w}.", "definition": "Repeat."}) for w in ("one", "two", "three")) + "\n")
    runner = Runner(tiny_config("federation.method=kd", f"kd.proxy.path={good}", "kd.proxy.prompts=8"))
    assert len(runner.protocol.prompts) == 3
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "fine"}\n{"text": "no prompt"}\n')
    with pytest.raises(ValueError, match="bad.jsonl:2: expected an object with a non-empty string 'prompt'"):
        Runner(tiny_config("federation.method=kd", f"kd.proxy.path={bad}"))


def test_the_kd_section_is_refused_for_other_methods_and_checked_in_itself():
    with pytest.raises(ConfigError, match="the kd section applies to federation.method=kd"):
        load_config("tiny", ["kd.k=4"])
    with pytest.raises(ConfigError, match="kd.labels is required for kd.encoding=labels"):
        load_config("tiny", ["federation.method=kd", "kd.encoding=labels"])
    with pytest.raises(ConfigError, match="method_options"):
        load_config("tiny", ["federation.method=kd", "federation.method_options={k: 4}"])


# ----------------------------------------------------------------------------- Flower


def test_flower_sim_engine_gives_the_simulators_global_adapter_bit_for_bit(tmp_path):
    small = [*SMALL_RUN, "data.partition=iid", "data.num_clients=2", "federation.rounds=1", "federation.sample_fraction=1.0", "flower.client_cpus=2"]
    sets = [arg for s in [*small, f"output_dir={tmp_path / 'flower'}"] for arg in ("--set", s)]
    cmd = [sys.executable, "-m", "flexfed.cli", "run", "--config", "tiny", "--engine", "flower-sim", "--quiet", *sets]
    # One intra-op thread everywhere, as the reference below has (conftest): KD's server and
    # clients sum over the vocabulary, whose order depends on the thread count.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path, start_new_session=True, env=env)
    try:
        output, _ = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, output[-5000:]
    reference = load_config("tiny", [*small, f"output_dir={tmp_path / 'inproc'}"])
    Runner(reference).run(show_progress=False)
    a, b = load_checkpoint(tmp_path / "flower" / "tiny"), load_checkpoint(reference.run_dir)
    for n in a.global_adapter:
        assert torch.equal(a.global_adapter[n].a, b.global_adapter[n].a) and torch.equal(a.global_adapter[n].b, b.global_adapter[n].b), n
    flower, inproc = _metrics(tmp_path / "flower" / "tiny")[1], _metrics(reference.run_dir)[1]
    assert [c["bytes_up"] for c in flower["clients"]] == [c["bytes_up"] for c in inproc["clients"]]
    assert [c["flops"] for c in flower["clients"]] == [c["flops"] for c in inproc["clients"]]
    assert flower["kd_kl_after"] == inproc["kd_kl_after"]


def test_slora_sparse_stage_is_refused_for_a_protocol_of_its_own():
    with pytest.raises(ConfigError, match="federation.sparse_stage"):
        load_config("tiny", ["federation.method=kd", "federation.sparse_stage.rounds=1", "federation.rounds=2"])


def test_a_malformed_reply_is_rejected_and_a_client_sent_the_wrong_modules_fails_alone(tiny_config):
    from flexfed.protocol import Message
    from flexfed.server import UpdateRejected

    runner = Runner(tiny_config(*SMALL_RUN, "kd.k=5"))
    kd = runner.protocol
    talk = kd.conversation(kd.initial_state(), 1, 0, True)
    message = next(talk)
    (reply,) = kd.serve(runner.setup, [message])
    inflated = {**reply.arrays, "rest": reply.arrays["rest"] + 0.5}  # mass above 1
    with pytest.raises(UpdateRejected, match=f"client {runner.federation.clients[0].client_id}: top-k distributions"):
        talk.send(Message(inflated, reply.meta))
    first = sorted(kd.modules)[0]
    short = {k: v for k, v in message.arrays.items() if not k.startswith(first + ".")}
    (failed,) = kd.serve(runner.setup, [Message(short, message.meta)])
    assert isinstance(failed, ValueError) and "payload does not match the modules" in str(failed)
