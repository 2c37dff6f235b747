"""Parameter machinery: value forms, gradients, filters, precedence (spec §2.3, §6 items 1-5)."""

from dataclasses import dataclass

import pytest

import mixcli
from mixcli.errors import MixcliError
from mixcli.params import NOTHING, check_setting, evaluate, param_specs, resolve


@dataclass
class Params:
    weight: float = mixcli.param(help="w", per_model=True)
    density: float = mixcli.param(1.0, help="d", per_model=True, min=0.0, max=1.0)
    lambda_: float = mixcli.param(1.0, help="l")
    normalize: bool = mixcli.param(False, help="n")
    mode: str = mixcli.param("a", help="m", choices=("a", "b"))


SPECS = param_specs(Params)

GRADIENT = [0, 0.5, 0.3, 0.7, 1]
EXPECTED = {0: 0.0, 1: 0.06451612903225806, 7: 0.45161290322580644, 8: 0.4935483870967742,
            15: 0.3129032258064516, 16: 0.32580645161290317, 23: 0.6870967741935483,
            24: 0.7290322580645161, 31: 1.0}


def test_declared_names_types_and_defaults():
    assert list(SPECS) == ["weight", "density", "lambda", "normalize", "mode"]
    assert SPECS["lambda"].field == "lambda_"
    assert SPECS["weight"].required and SPECS["weight"].per_model
    assert SPECS["normalize"].type is bool and SPECS["normalize"].default is False


@pytest.mark.parametrize("layer", sorted(EXPECTED))
def test_gradient_vectors_of_the_spec(layer):
    assert evaluate(GRADIENT, "model.layers.x", layer / 31) == EXPECTED[layer]


def test_two_point_gradient_over_four_layers():
    assert [evaluate([1, 0], "x", j / 3) for j in range(4)] == pytest.approx([1.0, 2 / 3, 1 / 3, 0.0], abs=1e-15)


def test_boolean_and_string_gradients_pick_without_interpolation():
    assert evaluate([True, False], "x", 0.49) is True
    assert evaluate([True, False], "x", 1.0) is False
    assert evaluate(["a", "b", "c"], "x", 0.6) == "b"


def test_first_matching_filter_wins_and_no_match_falls_through():
    setting = check_setting(SPECS["lambda"], [{"filter": "self_attn", "value": 0.1},
                                              {"filter": "attn", "value": 0.2}], "here")
    assert evaluate(setting, "model.layers.0.self_attn.q_proj.weight", 0.0) == 0.1
    assert evaluate(setting, "model.layers.0.cross_attn.q.weight", 0.0) == 0.2
    assert evaluate(setting, "model.layers.0.mlp.up_proj.weight", 0.0) is NOTHING
    value = resolve(SPECS["lambda"], [setting, 0.7], "model.layers.0.mlp.up_proj.weight", 0.0, "here")
    assert value == 0.7


def test_catch_all_filter_and_filtered_gradients():
    setting = check_setting(SPECS["lambda"], [{"filter": "mlp", "value": [0.0, 1.0]}, {"value": 0.5}], "here")
    assert evaluate(setting, "layers.3.mlp.down_proj.weight", 0.25) == 0.25
    assert evaluate(setting, "layers.3.self_attn.o_proj.weight", 0.25) == 0.5
    star = check_setting(SPECS["lambda"], {"filter": "*", "value": 3.0}, "here")
    assert evaluate(star, "anything", 0.0) == 3.0


def test_default_when_no_level_says_anything_and_error_when_required():
    assert resolve(SPECS["density"], [NOTHING, []], "x", 0.0, "here") == 1.0
    with pytest.raises(MixcliError, match="parameter 'weight' has no value for tensor 'lm_head.weight'"):
        resolve(SPECS["weight"], [NOTHING], "lm_head.weight", 0.0, "model 'a'")


@pytest.mark.parametrize("name, value, message", [
    ("density", 1.5, "parameter 'density' must be <= 1.0, got 1.5"),
    ("density", -0.1, "parameter 'density' must be >= 0.0"),
    ("density", "half", "parameter 'density' must be a number, got 'half'"),
    ("normalize", 1, "parameter 'normalize' must be true or false"),
    ("mode", "c", "parameter 'mode' must be one of 'a', 'b', got 'c'"),
    ("lambda", [0.1, [0.2]], "mixes lists and tables"),
    ("lambda", [{"filter": "x"}], "'value' is missing"),
    ("lambda", [{"filter": "x", "value": 1, "weight": 2}], "unknown key 'weight'"),
])
def test_values_are_checked_with_clear_messages(name, value, message):
    with pytest.raises(MixcliError, match=message.replace("(", r"\(").replace(")", r"\)")):
        check_setting(SPECS[name], value, "project.toml: [method]")


def test_gradient_elements_are_checked_too():
    with pytest.raises(MixcliError, match="must be <= 1.0, got 2"):
        check_setting(SPECS["density"], [0.5, 2], "here")


def registered(name):
    from mixcli.plugins import get_registry

    registry = get_registry()
    return (registry.methods.get(name) or registry.evaluators[name]).param_specs


@pytest.mark.parametrize("component, key, value, message", [
    ("ties", "density", 1.5, "parameter 'density' must be <= 1.0, got 1.5"),
    ("dare_ties", "density", -0.25, "parameter 'density' must be >= 0.0, got -0.25"),
    ("ties", "density", [], "parameter 'density' is an empty list; give a value or a gradient [a, b, ...] "
                            "(or remove it for the default)"),
    ("linear", "weight", float("nan"), "parameter 'weight' must be finite, got nan"),
    ("task_arithmetic", "lambda", float("inf"), "parameter 'lambda' must be finite, got inf"),
    ("slerp", "t", 2, "parameter 't' must be <= 1.0, got 2.0; set extrapolate = true under [method] to allow it"),
    ("slerp", "t", [0.0, -0.5], "parameter 't' must be >= 0.0, got -0.5; set extrapolate = true under [method] "
                                "to allow it"),
    ("breadcrumbs", "gamma", 1.2, "parameter 'gamma' must be <= 1.0, got 1.2"),
    ("della", "epsilon", -0.1, "parameter 'epsilon' must be >= 0.0, got -0.1"),
    ("passthrough", "scale", float("-inf"), "parameter 'scale' must be finite, got -inf"),
    ("moe_upcycle", "num_experts", 0, "parameter 'num_experts' must be >= 1, got 0"),
    ("moe_merge", "noise_scale", -1, "parameter 'noise_scale' must be >= 0.0, got -1.0"),
    ("moe_merge", "experts_per_token", 1.5, "parameter 'experts_per_token' must be a whole number, got 1.5"),
    ("we_moe", "router_hidden_layers", 3, "parameter 'router_hidden_layers' must be <= 2, got 3"),
    ("sparse_we_moe", "tv_prune_ratio", 1.5, "parameter 'tv_prune_ratio' must be <= 1, got 1.5"),
    ("rank_one_moe", "select_k", -2, "parameter 'select_k' must be >= -1, got -2"),
    ("model_recombination", "num_outputs", 0, "parameter 'num_outputs' must be >= 1, got 0"),
    ("classification", "batch_size", 0, "parameter 'batch_size' must be >= 1, got 0"),
])
def test_registered_parameters_refuse_values_outside_their_range(component, key, value, message):
    with pytest.raises(MixcliError) as error:
        check_setting(registered(component)[key], value, "project.toml: [method]")
    assert str(error.value) == f"project.toml: [method]: {message}"


def test_a_lifted_bound_lets_the_value_through():
    assert check_setting(registered("slerp")["t"], [2, -1], "here", lifted=True) == [2.0, -1.0]
    assert registered("slerp")["t"].describe_range() == "[0.0, 1.0] unless extrapolate = true"
