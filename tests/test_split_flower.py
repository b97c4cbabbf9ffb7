"""Split-FedLLM on Flower: every local step a message exchange between the ServerApp and a
SuperNode's ClientApp (a real SuperLink and two SuperNodes on loopback), ending with the
in-process simulator's result bit for bit; and mixed-dtype payloads on Flower's wire."""

import pytest
import torch

from flexfed.config import load_config
from flexfed.engines import simulation
from flexfed.engines.flower import wire
from flexfed.engines.flower.deploy import node_config_string
from flexfed.engines.flower.project import write_app

from test_flower import _assert_same_global_adapter, _comparable, _metrics, _wait_for_run_dir, federations  # noqa: F401  (the harness and its fixture)

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


def test_split_training_over_a_real_superlink_equals_the_simulator(tmp_path, federations):  # noqa: F811
    fed = federations()
    fed.start_superlink()
    nodes = [fed.start_supernode(f"node{k}", node_config_string(partition=(k, 2))) for k in range(2)]
    config = load_config("tiny", [*SPLIT, f"output_dir={tmp_path / 'flower'}"])
    run_id = fed.submit(write_app(tmp_path / "app", config))
    reference = load_config("tiny", [*SPLIT, f"output_dir={tmp_path / 'inproc'}"])
    simulation.run(reference, show_progress=False)
    _wait_for_run_dir(config.run_dir, 2, fed, run_id)

    _assert_same_global_adapter(config.run_dir, reference.run_dir)
    flower, inproc = _metrics(config.run_dir), _metrics(reference.run_dir)
    assert _comparable(flower) == _comparable(inproc)
    steps = config.training.local_steps
    for m in flower[1:]:
        assert m["clients_reported"] == 2
        for c in m["clients"]:
            # every step was a round trip through the SuperLink: activations up, gradient down
            assert c["steps"] == steps and len(c["bytes_up_per_step"]) == steps
            assert c["array_bytes_up"] == c["bytes_up"] and c["array_bytes_down"] == c["bytes_down"]
            assert c["wire_bytes_up"] > c["bytes_up"]
    assert all(p.alive() for p in nodes)
