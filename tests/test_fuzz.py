"""Bad input, fuzzed (hypothesis, fixed example budgets): malformed payloads at decode, config
files at load, data files at every loader. Each gets a clear error naming the client, field or
file; nothing else escapes, and the server's global state is unchanged."""

import json
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

from flexfed.config import ConfigError, load_config
from flexfed.data.jsonl import load_instruction_jsonl, load_prompt_completion_dir
from flexfed.data.natural_instructions import load_natural_instructions
from flexfed.resources import client_profiles
from flexfed.server import Server, UpdateRejected

FUZZ = settings(max_examples=60, deadline=None, derandomize=True,  # the same examples on every run: CI must not pass or fail by chance
                 suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
SHAPES = {"layers.0.q_proj": (6, 5), "layers.0.v_proj": (4, 5)}
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int8, torch.bool, torch.complex64]
VALUES = [0.0, 1.0, -1.0, 1e-45, 5e-324, 1e38, 3.4e38, 1e300, float("nan"), float("inf"), -float("inf")]


def _server(method: str, distribution: str = "homogeneous") -> Server:
    config = load_config("tiny", [f"federation.method={method}", f"resources.distribution={distribution}", "lora.rank=2"])
    ids = [f"c{i}" for i in range(4)]
    profiles, assignment = client_profiles(config.resources, config.lora, SHAPES, len(ids), config.seed)
    return Server(config, SHAPES, profiles, assignment, ids)


SERVERS = {m: _server(m, d) for m, d in [("fedit", "homogeneous"), ("ffa-lora", "homogeneous"), ("fed-sb", "homogeneous"), ("flexlora", "uniform"), ("hetlora", "uniform")]}


@st.composite
def payloads(draw, server: Server, client: int):
    """A well-formed payload, then broken: keys dropped/added/renamed, shapes, dtypes, ranks, values."""
    state = server.initial_state()
    good = {k: v.clone() for k, v in server.downlink(state, client).items()}
    keys = sorted(good)
    out = dict(good)
    for _ in range(draw(st.integers(1, 3))):
        op = draw(st.sampled_from(["drop", "add", "shape", "dtype", "value", "rank", "empty", "scalar"]))
        key = draw(st.sampled_from(keys))
        if op == "drop":
            out.pop(key, None)
        elif op == "add":
            out[draw(st.sampled_from([key + "x", "junk", "", "layers.0.q_proj.c"]))] = torch.zeros(2, 2)
        elif op == "empty":
            out = {} if draw(st.booleans()) else {k: torch.empty(0) for k in out}
        elif key in out:
            t = out[key]
            if op == "shape":
                out[key] = torch.zeros(tuple(draw(st.integers(0, 7)) for _ in range(draw(st.integers(0, 3)))))
            elif op == "dtype":
                out[key] = torch.zeros(t.shape).to(draw(st.sampled_from(DTYPES)))
            elif op == "rank" and t.ndim == 2:
                out[key] = torch.zeros(t.shape[0] + draw(st.integers(1, 3)), t.shape[1])
            elif op == "scalar":
                out[key] = torch.tensor(draw(st.sampled_from(VALUES)))
            elif op == "value" and t.numel():
                wide = t.double()  # set in float64, then back: 1e300 becomes inf in float32, 1e-45 a subnormal
                wide.view(-1)[draw(st.integers(0, t.numel() - 1))] = draw(st.sampled_from(VALUES))
                out[key] = wide.to(t.dtype)
    return out


@pytest.mark.parametrize("method", sorted(SERVERS))
def test_malformed_payloads_are_refused_naming_the_client_and_leave_the_global_unchanged(method):
    server = SERVERS[method]
    state = server.initial_state()
    before = {n: (f.a.clone(), f.b.clone()) for n, f in state.global_adapter.items()}

    @settings(FUZZ, max_examples=200)
    @given(data=st.data())
    def check(data):
        client = data.draw(st.integers(0, len(server.client_ids) - 1))
        payload = data.draw(payloads(server, client))
        try:
            update = server.receive(client, payload)
        except UpdateRejected as err:
            assert f"client {server.client_ids[client]}" in str(err)
        else:  # accepted: then it is a well-formed, finite, bounded update
            server.check_update(client, update)
            after = server.advance(state, 1, [update], [1.0])
            if after.rejected is not None:  # refused at aggregation (e.g. an SVD that cannot converge): nothing of it kept
                for n, f in after.global_adapter.items():
                    assert torch.equal(f.a, before[n][0]) and torch.equal(f.b, before[n][1])
        for n, f in state.global_adapter.items():
            assert torch.equal(f.a, before[n][0]) and torch.equal(f.b, before[n][1])

    check()


# ----------------------------------------------------------------------------- config files

SECTIONS = ["model", "data", "lora", "training", "federation", "eval", "privacy", "robust", "attack", "resources", "flower"]
leaves = st.one_of(st.none(), st.booleans(), st.integers(-10**12, 10**12), st.floats(allow_nan=True), st.text(max_size=20), st.lists(st.integers(), max_size=3))


@FUZZ
@given(
    raw=st.one_of(
        st.binary(max_size=200),
        st.text(max_size=200).map(str.encode),
        st.dictionaries(st.sampled_from(SECTIONS + ["seed", "name", "nope"]), st.one_of(leaves, st.dictionaries(st.text(max_size=12), leaves, max_size=4)), max_size=5).map(lambda d: json.dumps(d, default=str).encode()),
    )
)
def test_any_config_file_loads_or_fails_with_a_config_error_naming_it(tmp_path_factory, raw):
    path = tmp_path_factory.mktemp("cfg") / "run.yaml"
    path.write_bytes(raw)
    try:
        load_config(path)
    except ConfigError as err:
        assert str(path) in str(err)


# ----------------------------------------------------------------------------- data files

records = st.one_of(
    st.dictionaries(st.sampled_from(["instruction", "context", "input", "response", "output", "category", "prompt", "completion", "x"]), leaves, max_size=5),
    leaves,
)
lines = st.one_of(
    st.lists(records, max_size=4).map(lambda rs: "\n".join(json.dumps(r) for r in rs).encode()),
    st.binary(max_size=120),
    st.sampled_from([b"", b"\n\n", b"{", b'{"instruction": "a", "output": "b"}\n\xff\xfe', b'\xef\xbb\xbf{"instruction": "a", "output": "b"}', b"[1, 2", b'{"prompt": "p", "completion": "<|endoftext|>"}']),
)


def _check_names_file(load, path: Path):
    try:
        load()
    except (ValueError, FileNotFoundError) as err:
        assert str(path) in str(err), f"{type(err).__name__}: {err}"


@FUZZ
@given(content=lines, suffix=st.sampled_from([".jsonl", ".json"]))
def test_instruction_files_load_or_fail_naming_the_file(tmp_path_factory, content, suffix):
    path = tmp_path_factory.mktemp("ij") / f"data{suffix}"
    path.write_bytes(content)
    _check_names_file(lambda: load_instruction_jsonl(path), path)


@FUZZ
@given(content=lines)
def test_prompt_completion_tasks_load_or_fail_naming_the_file(tmp_path_factory, content):
    root = tmp_path_factory.mktemp("pc")
    path = root / "super_glue_rte.jsonl"
    path.write_bytes(content)
    _check_names_file(lambda: load_prompt_completion_dir(root), root)


ni_values = st.one_of(leaves, st.lists(st.one_of(leaves, st.dictionaries(st.sampled_from(["input", "output"]), st.one_of(leaves, st.lists(leaves, max_size=2)), max_size=2)), max_size=3))


@FUZZ
@given(
    content=st.one_of(
        st.binary(max_size=120),
        st.dictionaries(st.sampled_from(["Definition", "Categories", "Instances", "Positive Examples", "x"]), ni_values, max_size=5).map(lambda d: json.dumps(d).encode()),
    )
)
def test_natural_instructions_tasks_load_or_fail_naming_the_file(tmp_path_factory, content):
    root = tmp_path_factory.mktemp("ni")
    path = root / "task001_fuzz.json"
    path.write_bytes(content)
    _check_names_file(lambda: load_natural_instructions(root), root)


def test_a_100_mb_line_is_refused_naming_the_file_and_line(tmp_path):
    path = tmp_path / "huge.jsonl"
    with open(path, "w") as fh:
        fh.write('{"instruction": "a", "output": "b"}\n')
        fh.write('{"instruction": "' + "a" * (100 << 20) + '", "output": "b"}\n')
    with pytest.raises(ValueError, match=rf"{path}:2: line of 100\.0 MiB"):
        load_instruction_jsonl(path)
