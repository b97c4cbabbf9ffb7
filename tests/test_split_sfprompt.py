"""SFPrompt's options on Split-FedLLM (docs/split.md): a soft prompt as the client part
(``split.client_adapter=prompt``) and local EL2N data pruning (``split.prune_fraction``), on the
four-block tiny Llama."""

import json
import math

import pytest
import torch

from flexfed.build import Setup
from flexfed.client import collate, response_loss
from flexfed.config import ConfigError, load_config
from flexfed.data.prompts import IGNORE_INDEX
from flexfed.protocol import Outcome
from flexfed.runner import Runner
from flexfed.split.prompt import PromptedModel
from flexfed.split.protocol import PROMPT, SplitProtocol
from flexfed.split.sides import ClientSession

from test_split import _round, _split

N = 3  # virtual tokens


@pytest.fixture(scope="module")
def prompt_setup(tmp_path_factory):
    """A Setup per (cut, tail): a trainer's PEFT model holds one set of adapted modules, and with
    a prompt that set is the server part's, which the cut decides (one run has one cut)."""
    setups = {}

    def make(cut_layer: int, tail_layers: int = 0, **options):
        if (cut_layer, tail_layers) not in setups:
            config = load_config("tiny", [
                f"output_dir={tmp_path_factory.mktemp('sfprompt')}", "model.name=tiny-llama-4", "federation.method=split",
                "training.precision=fp32", "training.local_steps=4", "training.lr=0.01", "training.max_grad_norm=0.5",
                "split.client_adapter=prompt", f"split.prompt_tokens={N}", f"split.cut_layer={cut_layer}", f"split.tail_layers={tail_layers}",
            ])
            setups[cut_layer, tail_layers] = Setup(config)
        setup = setups[cut_layer, tail_layers]
        return setup, _split(setup, cut_layer=cut_layer, tail_layers=tail_layers, **options)

    return make


@pytest.fixture(scope="module")
def prune_setup(tmp_path_factory):
    config = load_config("tiny", [
        f"output_dir={tmp_path_factory.mktemp('prune')}", "model.name=tiny-llama-4", "federation.method=split",
        "training.precision=fp32", "training.local_steps=null", "training.local_epochs=2", "training.batch_size=2",
        "split.cut_layer=1", "split.tail_layers=1", "split.prune_fraction=0.5",
    ])
    return Setup(config)


def _client_loss(setup, protocol, state, client=0) -> float:
    """The response loss of the model ``state`` stands for (server LoRA folded in, the prompt in
    front) on all of one client's training examples: what evaluation computes."""
    examples = setup.examples(setup.federation.clients[client].client_id)
    batch = collate(examples, setup.trainer.pad_id)
    with protocol.evaluated(setup.trainer, state) as model, torch.no_grad():
        return float(response_loss(model, batch))


@pytest.mark.parametrize("tail", [0, 1])
def test_a_soft_prompt_trains_and_its_positions_cross_the_wire(prompt_setup, tail):
    """The client part is the prompt alone (no client LoRA); it trains and the loss falls; every
    step's payloads carry the n extra positions (up B·(T+n)·h·4 + B·(T+n) + 8·B·(T+n), down
    B·(T+n)·h·4; U-shape twice the activations, no labels); the prompt's n·h·4 bytes go down at the
    start and up at the end, in place of the client adapter."""
    setup, protocol = prompt_setup(1, tail)
    assert protocol.client_shapes == {} and set(protocol.server_shapes) == set(protocol.server_adapter(protocol.initial_state()))
    state = protocol.initial_state()
    h = setup.trainer.base_model.config.hidden_size
    assert state.tensors[PROMPT].shape == (N, h) and state.tensors[PROMPT].dtype == torch.float32
    examples = setup.examples(setup.federation.clients[0].client_id)
    log = []
    outcome = _round(protocol, setup, state, 1, [0], log)[0]
    assert isinstance(outcome, Outcome), outcome
    prompt_bytes = N * h * 4
    start, first = log[0][1], log[0][2]
    assert set(start.arrays) == {"prompt"} and start.nbytes == prompt_bytes
    up_steps, down_steps = [], []
    for _, sent, reply in log:  # each message the server sent, and the client's reply to it
        if sent.meta["op"] == "gradient":  # the gradient at the cut, for the last activations' batch
            assert sent.nbytes == step * h * 4
            down_steps.append(sent.nbytes)
        if sent.meta["op"] == "output":  # U-shape: the server's output down, its gradient up
            assert sent.nbytes == reply.nbytes == step * h * 4
        if reply.meta["op"] == "activations":
            rows, tokens = reply.arrays["attention_mask"].shape
            assert bool((reply.arrays["attention_mask"][:, :N] == 1).all())  # every row attends to the prompt
            widest = max(len(e.input_ids) for e in examples)
            assert N < tokens <= widest + N
            step = rows * tokens
            if tail == 0:
                assert bool((reply.arrays["labels"][:, :N] == IGNORE_INDEX).all())  # no loss on a virtual token
                assert reply.nbytes == step * h * 4 + step + 8 * step
            else:
                assert "labels" not in reply.arrays and reply.nbytes == step * h * 4 + step
            up_steps.append(reply.nbytes)
    done = log[-1][2]
    assert done.meta["op"] == "done" and set(done.arrays) == {"prompt"} and done.nbytes == prompt_bytes
    assert outcome.update.steps == setup.config.training.local_steps
    # The cost formula sees the n extra positions and the input gradient block 0 now needs.
    assert outcome.stats["flops"] == pytest.approx(outcome.stats["flops_analytic"], rel=1e-3)
    assert outcome.bytes_down == prompt_bytes + sum(outcome.update.bytes_down_per_step)
    assert outcome.bytes_up == prompt_bytes + sum(outcome.update.bytes_up_per_step)
    # The prompt moved; the server part trained too; FedAvg of one client is its prompt.
    assert float((outcome.update.client - state.tensors[PROMPT]).abs().max()) > 1e-3
    new = protocol.combine(state, 1, [outcome.update], [1])
    assert torch.equal(new.tensors[PROMPT], outcome.update.client)
    # A few rounds on one client: the loss of the trained model on its data falls.
    before = _client_loss(setup, protocol, state)
    for r in range(2, 5):
        new = protocol.combine(new, r, [_round(protocol, setup, new, r, [0])[0].update], [1])
    assert _client_loss(setup, protocol, new) < before - 0.1


def test_the_prompts_are_averaged_with_the_data_size_weights(prompt_setup):
    setup, protocol = prompt_setup(2)
    state = protocol.initial_state()
    outcomes = _round(protocol, setup, state, 1, [0, 1])
    weights = [3, 1]
    new = protocol.combine(state, 1, [outcomes[c].update for c in (0, 1)], weights)
    expected = 0.75 * outcomes[0].update.client + 0.25 * outcomes[1].update.client
    assert torch.allclose(new.tensors[PROMPT], expected, atol=1e-7)
    assert protocol.round_fields(new, 1, [])["split"]["client_adapter"] == "prompt"


def test_a_malformed_prompt_fails_that_client(prompt_setup):
    setup, protocol = prompt_setup(1)
    state = protocol.initial_state()
    state.tensors[PROMPT] = torch.zeros(N + 1, setup.trainer.base_model.config.hidden_size)
    reply = protocol.serve(setup, [next(protocol.conversation(state, 1, 0, True))])[0]
    assert isinstance(reply, ValueError) and "soft prompt alone" in str(reply)


def test_the_evaluated_model_is_the_trained_function(prompt_setup):
    """``PromptedModel``'s loss on a batch is the split forward's (client blocks on the prompted
    embeddings, then the server's), and its greedy generation continues the same prompted input:
    its first token is the argmax of the prompted model's last position."""
    setup, protocol = prompt_setup(1)
    state = protocol.initial_state()
    state.tensors[PROMPT] = state.tensors[PROMPT] + 0.5 * torch.randn(state.tensors[PROMPT].shape, generator=torch.Generator().manual_seed(1))
    examples = setup.examples(setup.federation.clients[0].client_id)[:3]
    batch = collate(examples, setup.trainer.pad_id)
    model = protocol.model(protocol.server.ranks_of(0))
    with torch.no_grad():
        mask, inputs, labels = model.first_inputs(batch, state.tensors[PROMPT])
        hidden = model.forward({}, protocol.cut.head_blocks, mask, **inputs)
        server = {n: (f.a, f.b) for n, f in protocol.server_adapter(state).items()}
        split_loss = model.head_losses(server, protocol.cut.server_blocks, hidden, mask, labels).mean()
    with protocol.evaluated(setup.trainer, state) as prompted, torch.no_grad():
        assert isinstance(prompted, PromptedModel)
        assert float(response_loss(prompted, batch)) == pytest.approx(float(split_loss), rel=1e-5)
        ids = torch.tensor([examples[0].input_ids[:5]])
        out = prompted.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=2, do_sample=False)
        assert torch.equal(out[:, :5], ids) and out.shape == (1, 7)
        hidden = prompted.get_decoder()(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state
        assert int(prompted.get_output_embeddings()(hidden[:, -1]).argmax()) == int(out[0, 5])


def test_prompt_run_resumes_bit_exact_and_saves_a_peft_prompt_adapter(tiny_config):
    """A prompt run stopped after round 1 and resumed ends bit for bit as one that was not (the
    prompt travels in the checkpoint); the saved prompt loads with ``PeftModel.from_pretrained``
    and gives the evaluated model's logits."""
    from peft import PeftModel

    options = ["model.name=tiny-llama-4", "federation.method=split", "split.client_adapter=prompt", "split.prompt_tokens=2",
               "federation.sample_fraction=0.3", "training.precision=fp32", "eval.every=2"]
    whole = Runner(tiny_config("name=whole", *options)).run(show_progress=False)
    stopped = Runner(tiny_config("name=resumed", *options))
    stopped.run(show_progress=False, stop_after=1)
    resumed_runner = Runner(tiny_config("name=resumed", *options))
    resumed = resumed_runner.run(resume=True, show_progress=False)
    last = "adapters/round-0002"
    for name in ("adapter_model.safetensors", "prompt/adapter_model.safetensors"):
        assert (whole / last / name).read_bytes() == (resumed / last / name).read_bytes(), name
    lines = [json.loads(x) for x in (whole / "metrics.jsonl").read_text().splitlines()]
    h = resumed_runner.trainer.base_model.config.hidden_size
    for r in lines[1:]:
        assert r["split"]["client_adapter"] == "prompt" and r["split"]["prompt_tokens"] == 2
        for c in r["clients"]:
            assert c["bytes_up"] == 2 * h * 4 + sum(c["bytes_up_per_step"]) and c["bytes_down"] == 2 * h * 4 + sum(c["bytes_down_per_step"])
    # The user's route: a fresh base, the round's LoRA merged in, then the prompt adapter.
    from safetensors.torch import load_file

    from flexfed.models import load_model

    from flexfed.server import load_checkpoint

    protocol, state = resumed_runner.protocol, load_checkpoint(resumed)
    assert state.round == 2
    assert torch.equal(state.tensors[PROMPT], load_file(str(resumed / last / "prompt" / "adapter_model.safetensors"))["prompt_embeddings"])
    ids = torch.tensor([[5, 9, 11, 13, 17]])
    with protocol.evaluated(resumed_runner.trainer, state) as prompted, torch.no_grad():
        hidden = prompted.get_decoder()(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state
        ours = prompted.get_output_embeddings()(hidden)
    fresh = load_model("tiny-llama-4", seed=0)
    merged = PeftModel.from_pretrained(fresh, str(resumed / last)).merge_and_unload()
    with torch.no_grad():
        theirs = PeftModel.from_pretrained(merged, str(resumed / last / "prompt"))(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    assert torch.allclose(ours, theirs[:, -ids.shape[1]:], atol=1e-5)


# ---------------------------------------------------------------------------- local pruning


def test_pruning_drops_the_lowest_el2n_examples_and_the_steps_they_cost(prune_setup):
    """A client drops floor(f·n) examples, those of lowest EL2N on its own head and tail (scores
    do not depend on the batch an example is scored in); its round is then exactly the round of
    an unpruned client holding the kept examples (same steps, same bytes per step, same losses),
    so the bytes saved are exactly those of the steps the pruned examples no longer need. The
    count goes into the client's record. Deterministic: a second round gives the same."""
    setup = prune_setup
    client_id = setup.federation.clients[0].client_id
    examples = setup.examples(client_id)
    n = len(examples)
    protocol = _split(setup, cut_layer=1, tail_layers=1)
    state = protocol.initial_state()
    outcome = _round(protocol, setup, state, 1, [0])[0]
    assert isinstance(outcome, Outcome), outcome
    pruned = math.floor(0.5 * n)
    assert outcome.update.pruned == outcome.stats["pruned"] == pruned > 0
    assert protocol.client_fields(1, 0, outcome.update)["pruned"] == pruned
    B = setup.config.training.batch_size
    assert outcome.update.steps == math.ceil(2 * math.ceil((n - pruned) / B)) < math.ceil(2 * math.ceil(n / B))

    # Which ones: score each example alone, and in the session's batches.
    ranks = protocol.server.ranks_of(0)
    start = protocol.link.start(protocol.server.downlink(protocol.client_view(state), 0), ranks, protocol.server.client_seed(1, 0))
    model = protocol.model(ranks)
    session = ClientSession(model, client_id, start, examples, protocol.server.client_seed(1, 0))
    factors = session.trainable.subset(session.head_modules | session.tail_modules)
    alone = [float(model.el2n(factors, protocol.cut.client_blocks(), collate([e], setup.trainer.pad_id), None)[0]) for e in examples]
    lowest = set(sorted(range(n), key=lambda i: (alone[i], i))[:pruned])
    kept = [e for i, e in enumerate(examples) if i not in lowest]
    pruned_session = ClientSession(model, client_id, start, examples, protocol.server.client_seed(1, 0), prune_fraction=0.5)
    assert [e.input_ids for e in pruned_session.examples] == [e.input_ids for e in kept]
    assert all(0.0 <= s <= math.sqrt(2) for s in alone)

    # The pruned round equals an unpruned round on the kept examples, payload for payload.
    setup.config.split.prune_fraction = 0.0
    original = setup.examples
    try:
        setup.examples = lambda cid: kept if cid == client_id else original(cid)
        on_kept = _round(protocol, setup, state, 1, [0])[0]
        setup.examples = original
        unpruned = _round(protocol, setup, state, 1, [0])[0]
    finally:
        setup.examples = original
        setup.config.split.prune_fraction = 0.5
    assert on_kept.update.bytes_up_per_step == outcome.update.bytes_up_per_step
    assert on_kept.update.bytes_down_per_step == outcome.update.bytes_down_per_step
    assert on_kept.stats["losses"] == outcome.stats["losses"]
    assert sum(outcome.update.bytes_up_per_step) < sum(unpruned.update.bytes_up_per_step)
    h = setup.trainer.base_model.config.hidden_size
    for up, down in zip(outcome.update.bytes_up_per_step, outcome.update.bytes_down_per_step):
        assert down % (2 * h * 4) == 0 and up == down + down // (2 * h * 4)  # U-shape: 2·B·T·h·4 down; up the same plus the mask's B·T
    again = _round(protocol, setup, state, 1, [0])[0]
    assert again.update.bytes_up_per_step == outcome.update.bytes_up_per_step and again.stats["losses"] == outcome.stats["losses"]


@pytest.mark.parametrize("overrides,message", [
    (["split.client_adapter=prompt"], "split.prompt_tokens must be at least 1"),
    (["split.prompt_tokens=4"], "split.prompt_tokens=4 applies to split.client_adapter=prompt only"),
    (["split.client_adapter=prompt", "split.prompt_tokens=4", "split.client_method=flexlora"], "split.client_method 'flexlora'"),
    (["split.client_adapter=prompt", "split.prompt_tokens=4", "resources.distribution=uniform"], "resources.distribution='uniform'"),
    (["split.prune_fraction=0.3", "training.local_steps=null", "training.local_epochs=1"], "split.prune_fraction=0.3 needs split.tail_layers > 0"),
    (["split.prune_fraction=0.3", "split.tail_layers=1"], "needs training.local_epochs"),
    (["split.prune_fraction=1.0"], "split.prune_fraction"),
])
def test_config_refuses_sfprompt_options_it_cannot_honour(tiny_config, overrides, message):
    with pytest.raises(ConfigError, match=message):
        tiny_config("federation.method=split", *overrides)


def test_a_prompt_runs_server_part_starts_where_a_lora_runs_does(prompt_setup, tiny_config):
    """Same seed, same cut: the server part's start does not depend on what the client trains."""
    _, protocol = prompt_setup(1)
    lora = SplitProtocol(Setup(tiny_config("model.name=tiny-llama-4", "federation.method=split", "split.cut_layer=1")))
    a, b = protocol.server_adapter(protocol.initial_state()), lora.server_adapter(lora.initial_state())
    assert set(a) == set(b) and all(torch.equal(a[n].a, b[n].a) and torch.equal(a[n].b, b[n].b) for n in a)

