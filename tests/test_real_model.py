"""End-to-end checks on the real SmolLM2-135M-Instruct (fetched from PyPI on first use)."""

import json

import pytest
from peft import PeftModel

from flexfed.config import load_config
from flexfed.data import encode_prompt
from flexfed.engines.simulation import run
from flexfed.evaluation import evaluation_loss, generate
from flexfed.federation import build_federation
from flexfed.models import SMOLLM2, load_model, load_tokenizer
from flexfed.precision import base_dtype

pytestmark = pytest.mark.real_model


@pytest.fixture(scope="module")
def smollm2():
    return load_model(SMOLLM2), load_tokenizer(SMOLLM2)


def test_packaged_model_knows_the_capital_of_france(smollm2):
    model, tokenizer = smollm2
    prompt = encode_prompt(tokenizer, "", "What is the capital of France?", 64)
    # SPEC §6: greedy decoding of the packaged model answers exactly this
    assert generate(model, tokenizer, [prompt], max_new_tokens=20, batch_size=1)[0] == "The capital of France is Paris."


def test_a_real_federated_round_saves_an_adapter_peft_loads_and_reproduces(tmp_path, smollm2):
    config = load_config(
        "quickstart",
        [
            f"output_dir={tmp_path}",
            "federation.rounds=1",
            "federation.sample_fraction=0.04",
            "training.local_steps=2",
            "training.batch_size=4",
            "eval.seen_examples=4",
            "eval.unseen_examples=6",
            "eval.max_new_tokens=8",
        ],
    )
    run_dir = run(config, show_progress=False)
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert metrics[1]["clients_reported"] == 2 and metrics[1]["train_loss"] > 0

    _, tokenizer = smollm2
    base = load_model(SMOLLM2, dtype=base_dtype(config))  # the dtype the run trained and evaluated in
    peft_model = PeftModel.from_pretrained(base, str(run_dir / "adapters" / "round-0001"))
    federation = build_federation(config, tokenizer)
    # The adapter PEFT loads is the one the run evaluated: same loss on the same items.
    loss = evaluation_loss(peft_model, federation.eval_unseen, tokenizer.pad_token_id, batch_size=6)
    assert loss == pytest.approx(metrics[1]["eval_loss_unseen"], rel=1e-4)
    assert loss != pytest.approx(metrics[0]["eval_loss_unseen"], rel=1e-6)  # training changed the model
    # ... and it generates what the run predicted for the first unseen item
    text = generate(peft_model, tokenizer, [federation.eval_unseen[0].prompt_ids], max_new_tokens=8, batch_size=1)[0]
    saved = [json.loads(line) for line in (run_dir / "predictions" / "round-0001.jsonl").read_text().splitlines()]
    first_unseen = next(p for p in saved if p["split"] == "unseen")
    assert first_unseen["task"] == federation.eval_unseen[0].task
    assert text == first_unseen["prediction"]
