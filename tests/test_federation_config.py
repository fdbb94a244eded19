"""Run config schema and what is shared in each phase."""
import pytest
import torch

from cmvim.config import ConfigError
from cmvim.run_config import RunConfig, run_config
from cmvim.sharing import shared_parameter_names
from cmvim.model import CMViM, CMViMClassifier, model_config
from cmvim.server.assembly import RunRequest
from cmvim.simulations.assembly import config_path


def test_quick_config_loads_and_typos_are_named():
    cfg = run_config(config_path("quick.yaml"))
    assert cfg.model.img_size == cfg.preprocess.shape == 48
    assert RunConfig.from_json(cfg.to_json()) == cfg
    with pytest.raises(ConfigError, match=r"run.pretrain: unknown key 'round'.*did you mean 'rounds'"):
        run_config({"pretrain": {"round": 3}})
    with pytest.raises(ConfigError, match="'fedsgd' is not one of"):
        run_config({"strategy": {"name": "fedsgd"}})
    with pytest.raises(ConfigError, match="must equal the model's img_size"):
        run_config({"preprocess": {"spatial": "none", "shape": 64}})


def test_the_default_run_config_is_a_valid_one():
    assert RunConfig() == run_config({})
    assert RunConfig().preprocess.shape == RunConfig().model.img_size


def test_flwr_run_config_keys_override_the_file():
    cfg = RunRequest.from_context({"config-file": "quick.yaml", "out-dir": "x", "pretrain.rounds": 2,
                                   "strategy.name": "fedprox"}, find=config_path).config()
    from_file = run_config(config_path("quick.yaml"))
    assert cfg.pretrain.rounds == 2 and cfg.strategy.name == "fedprox"
    assert cfg.finetune == from_file.finetune and from_file.pretrain.rounds != 2


def test_shared_parameters_per_phase_and_personalisation():
    mc = model_config("tiny")
    pretrain = CMViM(mc)
    assert set(shared_parameter_names(pretrain, "pretrain")) == set(pretrain.state_dict())
    assert any(n.startswith("momentum.") for n in shared_parameter_names(pretrain, "pretrain"))
    assert any(n.startswith("decoders.") for n in shared_parameter_names(pretrain, "pretrain"))
    clf = CMViMClassifier(mc)
    everything = set(clf.state_dict())
    assert set(shared_parameter_names(clf, "finetune")) == everything
    local_head = everything - set(shared_parameter_names(clf, "finetune", "head"))
    assert local_head == {"head.weight", "head.bias"}
    local_norm = everything - set(shared_parameter_names(clf, "finetune", "norm"))
    assert local_norm and all("norm" in n for n in local_norm)
    assert "image.encoder.norm_f.weight" in local_norm and "image.encoder.layers.0.norm.weight" in local_norm
    both = everything - set(shared_parameter_names(clf, "finetune", "head+norm"))
    assert both == local_head | local_norm


def test_fedadam_state_survives_a_checkpoint(tmp_path):
    from cmvim.server.checkpoints import Checkpoint
    from cmvim.server.strategy import make_strategy, restore_strategy_state, strategy_state
    from cmvim.run_config import StrategyConfig
    strategy = make_strategy(StrategyConfig(name="fedadam"))
    import numpy as np
    strategy.base.m_t, strategy.base.v_t = {"w": np.ones(3)}, {"w": np.full(3, 2.0)}
    strategy.base.current_arrays = {"w": np.zeros(3)}
    Checkpoint("finetune", 4, {"w": torch.zeros(3)}, strategy_state(strategy)).save(tmp_path)
    loaded = Checkpoint.latest(tmp_path)
    fresh = make_strategy(StrategyConfig(name="fedadam"))
    restore_strategy_state(fresh, loaded.strategy)
    assert (loaded.phase, loaded.round) == ("finetune", 4)
    np.testing.assert_array_equal(fresh.base.v_t["w"], np.full(3, 2.0))
    np.testing.assert_array_equal(fresh.base.m_t["w"], np.ones(3))


def test_site_folders_are_found_in_one_place(tmp_path):
    """The client (a simulated node's partition id), cmvim-sim and the benchmarks all find a
    run's sites through CohortSpec.site_folders: manifest folders, sorted, or the named ones."""
    from cmvim.run_config import CohortSpec
    for name in ("C", "A", "B"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "manifest.csv").write_text("subject_id,mri,label\n")
    (tmp_path / "notes").mkdir()                                       # no manifest: not a site
    assert CohortSpec(path=str(tmp_path)).site_folders() == {n: tmp_path / n for n in ("A", "B", "C")}
    assert list(CohortSpec(path=str(tmp_path), site_names=["C", "A"]).site_folders()) == ["C", "A"]
    with pytest.raises(ValueError, match="cohort.path"):
        CohortSpec().site_folders()


def test_a_rounds_time_splits_into_the_slowest_sites_work_and_overhead():
    from cmvim.server.runner import round_timing
    train = {"A": {"work-seconds": 4.0}, "B": {"work-seconds": 6.0}}
    assert round_timing(10.0, train, {"A": {"work-seconds": 1.0}, "B": {"work-seconds": 0.5}}) == {
        "site_work_seconds": 7.0, "overhead_seconds": 3.0}
    assert round_timing(10.0, train, {}) == {"site_work_seconds": 6.0, "overhead_seconds": 4.0}
    assert round_timing(10.0, {"A": {"epsilon": 1.0}}, {}) == {}        # DP: the sites send accounting only


def test_in_a_simulation_sites_queued_for_the_cores_count_as_work_not_overhead():
    """Three sites on two worker slots: two work at once, the third after one of them; the round's
    site work is that packing (longest first), not the slowest single site."""
    from cmvim.server.runner import packed_seconds, round_timing
    assert packed_seconds([4.0, 6.0, 5.0], 2) == 9.0        # 6 | 5 + 4
    assert packed_seconds([4.0, 6.0, 5.0], 1) == 15.0
    assert packed_seconds([4.0, 6.0, 5.0], 3) == packed_seconds([4.0, 6.0, 5.0], None) == 6.0
    assert packed_seconds([], 2) == 0.0
    train = {"A": {"work-seconds": 4.0}, "B": {"work-seconds": 6.0}, "C": {"work-seconds": 5.0}}
    evaluate = {s: {"work-seconds": 1.0} for s in "ABC"}
    assert round_timing(20.0, train, evaluate, slots=2) == {
        "site_work_seconds": 11.0, "overhead_seconds": 9.0, "sites_at_once": 2}     # 9 + (1 | 1 + 1)
    assert round_timing(20.0, train, evaluate, slots=3) == round_timing(20.0, train, evaluate) == {
        "site_work_seconds": 7.0, "overhead_seconds": 13.0}
