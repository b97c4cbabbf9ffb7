import pytest

from flexfed.config import ConfigError, apply_overrides, load_config, validate


def test_packaged_configs_validate():
    for name in ("quickstart", "tiny"):
        config = load_config(name)
        assert config.federation.rounds >= 1


def test_defaults_are_a_valid_run():
    config = validate({})
    assert config.model.name == "smollm2-135m-instruct"
    assert config.federation.method == "fedit"


def test_set_overrides_parse_yaml_values():
    config = load_config("tiny", ["training.lr=1e-4", "lora.target_modules=[q_proj,v_proj]", "federation.sample_fraction=1"])
    assert config.training.lr == 1e-4
    assert config.lora.target_modules == ["q_proj", "v_proj"]
    assert config.federation.sample_fraction == 1.0


@pytest.mark.parametrize(
    "override, needle",
    [
        ("training.lrr=1", "training.lrr: unknown key"),
        ("bogus=1", "bogus: unknown key"),
        ("lora.rank=eight", "lora.rank"),
        ("federation.sample_fraction=0", "federation.sample_fraction"),
        ("federation.sample_fraction=1.5", "federation.sample_fraction"),
        ("federation.method=fedsomething", "fedsomething"),
        ("data.source=natural-instructions", "data.path is required"),
        ("training.local_epochs=1", "exactly one of training.local_steps"),
        ("data.max_response_tokens=500", "max_response_tokens"),
        ("training.clients_per_pass=0", "training.clients_per_pass must be a positive integer"),
        ("training.clients_per_pass=many", "training.clients_per_pass"),
    ],
)
def test_bad_values_are_named(override, needle):
    with pytest.raises(ConfigError) as err:
        load_config("tiny", [override])
    assert needle in str(err.value)


def test_bad_override_syntax():
    with pytest.raises(ConfigError, match="key=value"):
        apply_overrides({}, ["training.lr"])


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed")
    with pytest.raises(ConfigError, match="bad.yaml: not valid YAML"):
        load_config(bad)
    bad.write_text("- a list\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(bad)


def test_rank_larger_than_layer_is_rejected():
    from flexfed.resources import client_profiles

    config = load_config("tiny", ["lora.rank=100"])
    shapes = {"model.layers.0.self_attn.k_proj": (32, 64), "model.layers.0.self_attn.q_proj": (64, 64)}
    with pytest.raises(ValueError, match="lora.rank=100 is larger than layer model.layers.0.self_attn.k_proj"):
        client_profiles(config.resources, config.lora, shapes, 3, 0)


@pytest.mark.parametrize("method, options, named", [
    ("hetlora", "{gamma: 2}", "gamma must be a number in (0, 1)"),
    ("hetlora", "{norm_weighted: true}", "unknown options ['norm_weighted']"),
    ("flexlora", "{split: balanced}", "unknown FlexLoRA split 'balanced'"),
    ("lora-fair", "{ridge: 0.1}", "unexpected keyword argument 'ridge'"),
    ("fedit", "{rank: 4}", "takes no arguments"),
])
def test_method_options_are_checked_when_the_config_loads(method, options, named):
    with pytest.raises(ConfigError, match="federation.method_options") as err:
        load_config("tiny", [f"federation.method={method}", f"federation.method_options={options}"])
    assert named in str(err.value)
