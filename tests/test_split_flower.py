"""Split-FedLLM on Flower: every local step a message exchange between the ServerApp and a
SuperNode's ClientApp (a real SuperLink and two SuperNodes on loopback), ending with the
in-process simulator's result bit for bit; and mixed-dtype payloads on Flower's wire."""

import time

import pytest
import torch

from flexfed.config import load_config
from flexfed.engines import simulation
from flexfed.engines.flower import wire
from flexfed.engines.flower.deploy import node_config_string
from flexfed.engines.flower.project import write_app
from flexfed.server import load_checkpoint

from test_flower import RUN_TIMEOUT, _assert_same_global_adapter, _comparable, _metrics, _wait_for_run_dir, federations  # noqa: F401  (the harness and its fixture)

SPLIT = [
    "federation.method=split",
    "split.cut_layer=1",
    "split.server_mode=v1",
    "federation.rounds=2",
    "federation.sample_fraction=1.0",
    "data.partition=iid",
    "data.num_clients=2",
    "eval.every=2",
    "eval.seen_examples=2",
    "eval.unseen_examples=2",
    "flower.min_nodes=2",
    # bf16 activations cross Flower as float32 (NumPy has no bfloat16): the arrays' bytes equal
    # the payload's in fp32 only
    "training.precision=fp32",
]


def test_a_split_step_payload_of_mixed_dtypes_survives_the_wire_bit_for_bit():
    payload = {"hidden": torch.randn(6, 4), "attention_mask": torch.tensor([[1, 1, 0]], dtype=torch.uint8), "labels": torch.tensor([[-100, 5, 7]])}
    arrays, meta = wire.encode_payload(payload)
    assert meta == {"dtype": "mixed", "dtypes": "attention_mask=uint8,hidden=float32,labels=int64"}
    back = wire.decode_payload(wire.from_record(wire.to_record(arrays)), meta["dtype"], meta["dtypes"])
    assert all(back[k].dtype == t.dtype and torch.equal(back[k], t) for k, t in payload.items())
    with pytest.raises(wire.WireError, match="expected a 2-D int64"):
        wire.decode_payload(arrays, "mixed", "attention_mask=uint8,hidden=float32,labels=int64".replace("hidden=float32", "hidden=int64"))
    with pytest.raises(wire.WireError, match="dtypes names"):
        wire.decode_payload(arrays, "mixed", "hidden=float32")


# SFPrompt's options (docs/split.md): a soft prompt for client part, a U-shape, EL2N pruning.
SFPROMPT = ["model.name=tiny-llama-4", "split.tail_layers=1", "split.client_adapter=prompt", "split.prompt_tokens=2",
            "split.prune_fraction=0.5", "training.local_steps=null", "training.local_epochs=0.1"]  # 2 steps on the 74 kept of 148


@pytest.mark.parametrize("options", [[], SFPROMPT], ids=["lora", "sfprompt"])
def test_split_training_over_a_real_superlink_equals_the_simulator(tmp_path, federations, options):  # noqa: F811
    fed = federations()
    fed.start_superlink()
    nodes = [fed.start_supernode(f"node{k}", node_config_string(partition=(k, 2))) for k in range(2)]
    config = load_config("tiny", [*SPLIT, *options, f"output_dir={tmp_path / 'flower'}"])
    run_id = fed.submit(write_app(tmp_path / "app", config))
    reference = load_config("tiny", [*SPLIT, *options, f"output_dir={tmp_path / 'inproc'}"])
    simulation.run(reference, show_progress=False)
    _wait_for_run_dir(config.run_dir, 2, fed, run_id)

    _assert_same_global_adapter(config.run_dir, reference.run_dir)
    a, b = load_checkpoint(config.run_dir).tensors, load_checkpoint(reference.run_dir).tensors  # the prompt, if any
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    flower, inproc = _metrics(config.run_dir), _metrics(reference.run_dir)
    assert _comparable(flower) == _comparable(inproc)
    for m in flower[1:]:
        assert m["clients_reported"] == 2
        for c in m["clients"]:
            # every step was a round trip through the SuperLink: activations up, gradient down
            steps = config.training.local_steps or c["steps"]
            assert c["steps"] == steps and len(c["bytes_up_per_step"]) == steps
            assert (c.get("pruned", 0) > 0) == bool(options)
            assert c["array_bytes_up"] == c["bytes_up"] and c["array_bytes_down"] == c["bytes_down"]
            assert c["wire_bytes_up"] > c["bytes_up"]
    assert all(p.alive() for p in nodes)


@pytest.mark.parametrize("server_mode,fate", [("v1", "averaged"), ("v2", "discarded")])
def test_a_supernode_killed_mid_split_round_is_left_out_and_the_run_finishes(tmp_path, federations, server_mode, fate):  # noqa: F811
    """Three SuperNodes, two clients a round; one node is killed after its client's third message
    of round 1 (the server part has taken its steps). The round completes without it (Flower's
    deadline, ``flower.round_timeout``): its client is in ``clients_failed``, left out of the
    averages; v1 averages the other's server copy alone, v2 discards the shared part it touched.
    Round 2, which does not sample it, trains as usual and the run finishes."""
    from flexfed.server import sample_clients

    overrides = [
        "seed=7", "federation.method=split", "split.cut_layer=1", f"split.server_mode={server_mode}", "federation.rounds=2",
        "federation.sample_fraction=0.6", "data.partition=iid", "data.num_clients=3", "eval.every=2", "eval.seen_examples=2",
        "eval.unseen_examples=2", "flower.min_nodes=3", "flower.round_timeout=20", f"output_dir={tmp_path / 'flower'}",
    ]
    config = load_config("tiny", overrides)
    (victim_client,) = sorted(set(sample_clients(config, 3, 1)) - set(sample_clients(config, 3, 2)))
    ids = [f"client-{i}" for i in range(3)]
    fed = federations()
    fed.start_superlink()
    nodes = [fed.start_supernode(f"node{k}", node_config_string(partition=(k, 3))) for k in range(3)]
    victim = nodes[victim_client]  # partition k hosts client index k
    run_id = fed.submit(write_app(tmp_path / "app", config))
    deadline = time.monotonic() + RUN_TIMEOUT
    while victim.log.read_text(errors="replace").count("Receiving: train message") < 3:  # start, then two steps' gradients
        assert time.monotonic() < deadline, victim.log.read_text()[-3000:]
        time.sleep(0.1)
    victim.kill()
    _wait_for_run_dir(config.run_dir, 2, fed, run_id)

    first, second = _metrics(config.run_dir)[1:]
    assert first["clients_sampled"] == 2 and first["clients_reported"] == 1
    (failed,) = first["clients_failed"]
    assert failed["id"] == ids[victim_client], failed
    assert [c["id"] for c in first["clients"]] == [ids[i] for i in sample_clients(config, 3, 1) if i != victim_client]
    assert first["split"]["server_part"] == fate
    assert second["clients_reported"] == 2 and not second["clients_failed"] and second["split"]["server_part"] == ("averaged" if server_mode == "v1" else "updated")
    assert f"client {ids[victim_client]} left out" in fed.logs(run_id)
    state = load_checkpoint(config.run_dir)
    assert state.round == 2 and all(torch.isfinite(f.a).all() and torch.isfinite(f.b).all() for f in state.global_adapter.values())
    assert all(p.alive() for k, p in enumerate(nodes) if k != victim_client)
