"""DPConfig: parsing a Flower run config, defaults, and every validation error."""

from __future__ import annotations

import dataclasses

import pytest

from privacy import Budget, DPConfig, PrivacyError


def test_defaults_mean_no_dp_and_match_the_dataclass():
    cfg = DPConfig.from_run_config({})
    assert cfg.modes == frozenset()
    assert cfg.noise_multiplier is None and cfg.target_epsilon is None and cfg.budget() is None
    field_defaults = {f.name: f.default for f in dataclasses.fields(DPConfig) if f.name != "modes"}
    for key, value in DPConfig.DEFAULTS.items():
        attr = key.replace("-", "_")
        if key == "dp" or value == 0.0:
            continue  # "none" and the 0 = unset keys map to frozenset() / None
        assert field_defaults[attr] == value, key


def test_full_run_config_is_parsed_and_other_keys_ignored():
    cfg = DPConfig.from_run_config({
        "dp": "user,sample", "max-grad-norm": 2, "noise-multiplier": 1.1, "target-epsilon": 0,
        "delta": 1e-6, "accountant": "prv", "budget-epsilon": 8.0, "budget-delta": 0,
        "user-noise-multiplier": 0.8, "user-clipping-norm": 0.5, "user-clipping": "adaptive",
        "client-sampling": "fixed", "local-epsilon": 2.0, "local-sensitivity": 0.1,
        "num-server-rounds": 5, "model": "cnn"})
    assert cfg.modes == frozenset({"sample", "user"})
    assert (cfg.max_grad_norm, cfg.noise_multiplier, cfg.target_epsilon) == (2.0, 1.1, None)
    assert (cfg.delta, cfg.accountant) == (1e-6, "prv")
    assert (cfg.user_clipping, cfg.client_sampling) == ("adaptive", "fixed")
    assert (cfg.user_noise_multiplier, cfg.user_clipping_norm, cfg.local_epsilon, cfg.local_sensitivity) == (
        0.8, 0.5, 2.0, 0.1)
    assert cfg.budget() == Budget(8.0, 1e-6)  # budget-delta unset: the run's delta


@pytest.mark.parametrize(("dp", "modes"), [("none", set()), ("sample", {"sample"}), ("user", {"user"}),
                                           ("local", {"local"}), ("sample,user", {"sample", "user"}),
                                           (" Sample , User ", {"sample", "user"})])
def test_modes(dp, modes):
    rc = {"dp": dp, "noise-multiplier": 1.0}
    assert DPConfig.from_run_config(rc).modes == frozenset(modes)


def test_target_epsilon_alone_is_enough_for_sample_dp():
    cfg = DPConfig.from_run_config({"dp": "sample", "target-epsilon": 3.0, "budget-epsilon": 5,
                                    "budget-delta": 1e-7})
    assert cfg.target_epsilon == 3.0 and cfg.noise_multiplier is None
    assert cfg.budget() == Budget(5.0, 1e-7)


@pytest.mark.parametrize(("rc", "match"), [
    ({"dp": "central"}, "dp mode 'central'"),
    ({"dp": "sample,local", "noise-multiplier": 1.0}, "not a supported combination"),
    ({"dp": 3}, "dp=3"),
    ({"dp": "sample", "target-epsilon": -1.0}, "target-epsilon=-1.0"),
    ({"budget-epsilon": -2.0}, "budget-epsilon=-2.0"),
    ({"local-epsilon": 0}, "local-epsilon=0.0"),
    ({"delta": 0}, r"delta=0\.0.*\(0, 1\)"),
    ({"delta": 1.0}, "delta=1.0"),
    ({"budget-epsilon": 1.0, "budget-delta": 1.5}, "budget-delta=1.5"),
    ({"dp": "sample", "noise-multiplier": -0.5}, "noise-multiplier=-0.5"),
    ({"user-noise-multiplier": 0}, "user-noise-multiplier=0.0"),
    ({"max-grad-norm": 0}, "max-grad-norm=0.0"),
    ({"max-grad-norm": "big"}, "max-grad-norm='big'.*number"),
    ({"user-clipping-norm": -1}, "user-clipping-norm=-1.0"),
    ({"local-sensitivity": 0}, "local-sensitivity=0.0"),
    ({"dp": "sample"}, "needs noise-multiplier or target-epsilon"),
    ({"dp": "sample", "noise-multiplier": 1.0, "target-epsilon": 3.0}, "set only one"),
    ({"accountant": "moments"}, "accountant='moments'.*rdp, prv, pld"),
    ({"client-sampling": "stratified"}, "client-sampling='stratified'.*poisson, fixed"),
    ({"user-clipping": "none"}, "user-clipping='none'.*fixed, adaptive"),
])
def test_every_bad_value_gets_one_line_naming_it(rc, match):
    with pytest.raises(PrivacyError, match=match) as exc:
        DPConfig.from_run_config(rc)
    assert "\n" not in str(exc.value)
    assert isinstance(exc.value, ValueError)


def test_direct_construction_is_validated_too():
    with pytest.raises(PrivacyError, match="'global'"):
        DPConfig(modes=frozenset({"global"}))
    with pytest.raises(PrivacyError, match="max-grad-norm=-1"):
        DPConfig(modes=frozenset(), max_grad_norm=-1)
    with pytest.raises(PrivacyError, match="not a string"):
        DPConfig(modes="sample")  # type: ignore[arg-type]


def test_warn_delta():
    cfg = DPConfig.from_run_config({"delta": 1e-3})
    assert cfg.warn_delta(100) is None
    warning = cfg.warn_delta(1000)
    assert warning is not None and "delta=0.001" in warning and "n=1000" in warning and "0.0001" in warning
    tight_budget = DPConfig.from_run_config({"delta": 1e-6, "budget-epsilon": 4.0, "budget-delta": 0.01})
    assert tight_budget.warn_delta(500) is not None
