"""Crash safety for real: a simulator process killed with SIGKILL at random points (client
training, aggregation, checkpoint writing) and resumed with ``--resume`` ends bit for bit where
an uninterrupted run does; a truncated or corrupted checkpoint is detected by its checksums and
the previous one is used."""

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from flexfed.engines.simulation import run
from flexfed.lora import Factors
from flexfed.server import CheckpointError, ServerState, checkpoint_round, load_checkpoint, save_checkpoint

from test_simulation import _strip_timing

SRC = str(Path(__file__).resolve().parents[1] / "src")
SETTINGS = ["federation.rounds=3", "eval.every=3", "eval.seen_examples=2", "eval.unseen_examples=2", "eval.validation_examples=0"]


def _env():
    return {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1", "COLUMNS": "200"}


def _state(round_: int, size: int = 8) -> ServerState:
    """A state whose every value says which round wrote it."""
    f = Factors(b=torch.full((size, 2), float(round_)), a=torch.full((2, size), -float(round_)), scale=2.0)
    return ServerState(round=round_, global_adapter={"m": f}, metrics=[{"round": r} for r in range(round_ + 1)])


def _assert_state_of(state: ServerState, round_: int) -> None:
    assert state.round == round_ and state.metrics == [{"round": r} for r in range(round_ + 1)]
    assert torch.all(state.global_adapter["m"].b == round_) and torch.all(state.global_adapter["m"].a == -round_)


# ----------------------------------------------------------------------------- checksums


def test_a_truncated_or_corrupted_newest_checkpoint_falls_back_to_the_previous_one(tmp_path, caplog):
    for r in (1, 2):
        save_checkpoint(tmp_path, _state(r))
    newest = tmp_path / "checkpoints" / "round-0002"
    tensors = newest / "global.safetensors"
    data = tensors.read_bytes()
    tensors.write_bytes(data[: len(data) // 2])  # truncated
    with caplog.at_level("WARNING", logger="flexfed.server"):
        _assert_state_of(load_checkpoint(tmp_path), 1)
    assert checkpoint_round(tmp_path) == 1
    assert any("round-0002 is damaged" in r.getMessage() and "global.safetensors" in r.getMessage() for r in caplog.records)

    tensors.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))  # one bit flipped, same length
    _assert_state_of(load_checkpoint(tmp_path), 1)
    tensors.write_bytes(data)
    _assert_state_of(load_checkpoint(tmp_path), 2)  # restored: intact again
    state_json = newest / "state.json"
    state_json.write_text(state_json.read_text().replace('"round": 2', '"round": 9'))  # altered metadata
    _assert_state_of(load_checkpoint(tmp_path), 1)

    previous = tmp_path / "checkpoints" / "round-0001" / "SHA256SUMS"
    previous.write_text("{not json")
    with pytest.raises(CheckpointError, match="no intact checkpoint.*round-0002.*round-0001"):
        load_checkpoint(tmp_path)


_WRITER = textwrap.dedent(
    """
    import sys, torch
    from flexfed.lora import Factors
    from flexfed.server import ServerState, save_checkpoint
    run_dir, size = sys.argv[1], int(sys.argv[2])
    r = int(sys.argv[3])
    while True:
        f = Factors(b=torch.full((size, 2), float(r)), a=torch.full((2, size), -float(r)), scale=2.0)
        save_checkpoint(run_dir, ServerState(round=r, global_adapter={"m": f}, metrics=[{"round": i} for i in range(r + 1)]))
        print(r, flush=True)
        r += 1
    """
)


def test_sigkill_while_checkpoints_are_written_leaves_an_intact_one(tmp_path):
    """A process writing checkpoints back to back (each a few MB, so a kill lands inside a write)
    is killed at random moments; every time, the newest intact checkpoint is one it finished."""
    rng = random.Random(15)
    run_dir, start = tmp_path / "run", 1
    for _ in range(2):
        proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(run_dir), "400000", str(start)], stdout=subprocess.PIPE, text=True, env=_env())
        done = [int(proc.stdout.readline())]  # the first write has finished: kill in the middle of later ones
        time.sleep(rng.uniform(0.0, 0.3))
        proc.send_signal(signal.SIGKILL)
        out, _ = proc.communicate()
        done += [int(x) for x in out.split()]
        state = load_checkpoint(run_dir)
        assert state.round in (done[-1], done[-1] + 1)  # the last one it reported, or one whose rename it did not get to report
        b = state.global_adapter["m"].b
        assert b.shape == (400000, 2) and torch.all(b == state.round)
        start = state.round + 1


# ----------------------------------------------------------------------------- a killed run


def _cli(*args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "flexfed.cli", "-v", "run", "--quiet", *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_env())


def _kill_on(proc: subprocess.Popen, marker: str, delay: float) -> str:
    """Read the run's log until ``marker`` appears, then SIGKILL it after ``delay`` seconds."""
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if marker in line:
            time.sleep(delay)
            proc.send_signal(signal.SIGKILL)
            proc.communicate()
            return "".join(seen)
    raise AssertionError(f"the run ended before {marker!r}:\n{''.join(seen)[-3000:]}")


def test_a_run_killed_at_random_points_and_resumed_equals_an_uninterrupted_one(tiny_config, tmp_path):
    whole = tiny_config("name=whole", *SETTINGS)
    run(whole, show_progress=False)

    rng = random.Random(2026)
    killed = tmp_path / "killed"
    sets = [x for s in [f"output_dir={tmp_path}", "name=killed", *SETTINGS] for x in ("--set", s)]
    # where each try dies: mid-training, mid-aggregation, mid-checkpoint (markers from the run's own log)
    kills = [("round 1: clients training", rng.uniform(0.05, 0.4)), ("round 2: aggregating", 0.0), ("round 2: writing checkpoint", 0.0)]
    rounds_at_kill = []
    for i, (marker, delay) in enumerate(kills):
        proc = _cli("--config", "tiny", *sets) if i == 0 else _cli("--resume", str(killed))
        _kill_on(proc, marker, delay)
        assert proc.returncode == -signal.SIGKILL
        rounds_at_kill.append(checkpoint_round(killed))
    assert rounds_at_kill[0] == 0 and rounds_at_kill[1] == 1 and rounds_at_kill[2] in (1, 2)
    final = _cli("--resume", str(killed))
    out, _ = final.communicate(timeout=300)
    assert final.returncode == 0, out[-3000:]

    a, b = load_checkpoint(whole.run_dir), load_checkpoint(killed)
    assert a.round == b.round == 3
    for name in a.global_adapter:
        assert torch.equal(a.global_adapter[name].a, b.global_adapter[name].a)
        assert torch.equal(a.global_adapter[name].b, b.global_adapter[name].b)
    metrics = [[json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()] for d in (whole.run_dir, killed)]
    assert _strip_timing(metrics[0]) == _strip_timing(metrics[1])
    last = "adapters/round-0003/adapter_model.safetensors"
    assert (whole.run_dir / last).read_bytes() == (killed / last).read_bytes()
