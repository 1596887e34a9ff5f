"""Registry: what a registration must declare, and the one-line errors a bad one gets."""
from __future__ import annotations

import numpy as np
import pytest

import pipeline.registry as registry
from pipeline.config import MethodConfig, RunConfig, load_config, resolve_method_defaults
from pipeline.errors import ConfigError
from pipeline.methods import TERM_BC, TERM_CE, TERM_LC
from pipeline.registry import Term, create_method, heads_used, list_methods, method_spec, register_method


@pytest.fixture(autouse=True)
def scratch_registry(monkeypatch):
    """Each test may register methods; the real table (with the built-ins) comes back after it."""
    list_methods()
    monkeypatch.setattr(registry, "_METHODS", dict(registry._METHODS))


def _factory(cfg, counts, **_):
    raise AssertionError("never built in these tests")


@pytest.mark.parametrize("kwargs,match", [
    (dict(n_views=1, terms=(TERM_CE,), defaults={"temperature": 0.1}),
     r"'bad': defaults may set only the method-dependent keys .*\['temperature'\]"),
    (dict(n_views=1, terms=()), r"'bad': terms must name at least one term"),
    (dict(n_views=3, terms=(TERM_LC, TERM_LC)), r"'bad': terms must name at least one term, each once"),
    (dict(n_views=0, terms=(TERM_CE,)), r"'bad': n_views must be >= 1"),
])
def test_bad_registration_fails_when_registered(kwargs, match):
    with pytest.raises(ValueError, match=match):
        register_method("bad", **kwargs)(_factory)
    assert "bad" not in list_methods()


@pytest.mark.parametrize("kwargs,key", [
    (dict(defaults={"mix": "bce"}), "method.mix"),
    (dict(defaults={"beta": -1.0}), "method.beta"),
    (dict(prototype_head="deep"), "model.prototype_head"),
])
def test_invalid_default_fails_when_a_config_names_the_method(kwargs, key):
    """Values are checked by the config's own types (registry imports no config): one line naming the method."""
    register_method("bad", n_views=1, terms=(TERM_CE,), **kwargs)(_factory)
    with pytest.raises(ConfigError, match=rf"method 'bad' registers an invalid default \({key}=.*register_method call in "):
        load_config(base={"method": {"name": "bad"}})


@pytest.mark.parametrize("name", list_methods())
def test_every_registered_method_resolves_to_a_valid_config(name):
    cfg = load_config(base={"method": {"name": name}})
    assert cfg.method.name == name and None not in cfg.method.model_dump().values()


def test_term_checks_weight_key_and_heads():
    with pytest.raises(ValueError, match=r"term 'x': weight must be one of alpha, beta, gamma"):
        Term("x", "delta", frozenset({"classifier"}))
    with pytest.raises(ValueError, match=r"term 'x': unknown head\(s\) \['decoder'\]"):
        Term("x", "alpha", frozenset({"decoder"}))


def test_registered_defaults_are_common_defaults_overlaid_and_validated():
    register_method("toy", n_views=3, terms=(TERM_LC, TERM_BC), defaults={"beta": 1})(_factory)
    spec = method_spec("toy")
    assert dict(spec.defaults) == {**registry.COMMON_DEFAULTS, "beta": 1}
    assert spec.prototype_head == "linear"
    resolved = load_config(base={"method": {"name": "toy"}}).method
    assert isinstance(resolved.beta, float) and resolved.beta == 1.0  # typed by the config when resolved
    assert spec.term_weights() == {"lc": "alpha", "bc": "beta"}


def test_unknown_name_is_a_config_error_with_a_suggestion():
    with pytest.raises(ConfigError, match=r"method\.name: unknown method 'supconn'\. Did you mean 'supcon'\? "
                                          r"Registered methods: bcl, ce, ecl"):
        method_spec("supconn")
    with pytest.raises(ConfigError, match=r"method\.name: unknown method 'nope'\. Registered methods"):
        resolve_method_defaults(RunConfig.model_construct(method=MethodConfig.model_construct(name="nope")))


def test_create_method_fills_unset_keys_from_the_registered_defaults():
    # a MethodConfig built by hand (not through load_config) still trains with the method's defaults
    method = create_method(MethodConfig(name="bcl"), np.array([30, 9, 4]))
    assert method.base_weights == {"lc": 1.0, "bc": 0.35} and method.normalisation == "none"
    ecl = create_method(MethodConfig(name="ecl"), np.array([30, 9, 4]))
    assert ecl.base_weights == {"lc": 0.7, "bc": 0.3, "cc": 0.5} and ecl.normalisation == "first_epoch_lc"


def test_heads_used_follows_declared_terms_and_is_safe_for_unknown_ones():
    assert heads_used("supcon", ["lc", "supcon"]) == {"classifier": True, "projection": True, "prototypes": False}
    assert heads_used("ecl", ["lc"]) == {"classifier": True, "projection": False, "prototypes": False}
    assert heads_used("ecl", ["bc"]) == {"classifier": True, "projection": True, "prototypes": True}
    assert all(heads_used("ecl", ["mystery"]).values())  # a term the method did not declare
    assert all(heads_used("not_registered", ["lc"]).values())
