"""Site policy and cmvim-client's checks before it connects (no network needed)."""
from pathlib import Path
from types import SimpleNamespace

import pytest

from cmvim.client.join import JoinError, preflight
from cmvim.client.policy import PolicyRefusal, SitePolicy, load_policy
from cmvim.config import ConfigError
from cmvim.run_config import run_config


def cfg(**overrides):
    return run_config({"model": {"preset": "tiny"}, "preprocess": {"spatial": "none", "shape": 32},
                       "finetune": {"local_epochs": 3, "batch_size": 8}, **overrides})


def test_policy_yaml_typo_names_the_key(tmp_path):
    path = tmp_path / "policy.yaml"
    path.write_text("max_local_epoch: 3\n")
    with pytest.raises(ConfigError, match="max_local_epoch.*did you mean 'max_local_epochs'"):
        load_policy(path)
    path.write_text("allowed_phases: [pretrain, finetuning]\n")
    with pytest.raises(ConfigError, match="finetuning"):
        load_policy(path)


def test_requests_inside_the_policy_pass_and_outside_are_refused_with_the_rule():
    run = cfg()
    SitePolicy().check(run, "finetune", training=True)
    SitePolicy(allowed_phases=["pretrain", "finetune"]).check(run, "finetune", training=False, split="val")
    with pytest.raises(PolicyRefusal, match="does not allow the evaluate phase"):
        SitePolicy(allowed_phases=["pretrain", "finetune"]).check(run, "finetune", training=False, split="test")
    with pytest.raises(PolicyRefusal, match="does not allow the pretrain phase"):
        SitePolicy(allowed_phases=["finetune", "evaluate"]).check(run, "pretrain", training=True)
    with pytest.raises(PolicyRefusal, match="at most 2 local epochs; the run asks for 3 \\(finetune.local_epochs\\)"):
        SitePolicy(max_local_epochs=2).check(run, "finetune", training=True)
    with pytest.raises(PolicyRefusal, match=r"at most 4 subjects per batch; the run asks for 8 \(finetune.batch_size\)"):
        SitePolicy(max_batch_size=4).check(run, "finetune", training=True)
    with pytest.raises(PolicyRefusal, match="use of reports"):
        SitePolicy(use_reports=False).check(run, "pretrain", training=False, split="val")
    SitePolicy(use_reports=False).check(cfg(use_reports=False), "pretrain", training=True)
    with pytest.raises(PolicyRefusal, match="requires differential privacy"):
        SitePolicy(dp_required=True).check(run, "pretrain", training=True)


def test_the_site_bounds_what_an_evaluation_may_release():
    SitePolicy().check(cfg(), "finetune", training=False, split="test")
    with pytest.raises(PolicyRefusal, match=r"at most 50 score histogram bins; the run asks for 100000 \(evaluation.histogram_bins\)"):
        SitePolicy().check(cfg(evaluation={"histogram_bins": 100000}), "finetune", training=False, split="test")
    with pytest.raises(PolicyRefusal, match=r"at most 2000 bootstrap resamples; the run asks for 100000000"):
        SitePolicy().check(cfg(evaluation={"bootstrap": 100_000_000}), "finetune", training=False, split="val")
    with pytest.raises(PolicyRefusal, match="does not allow the finetune phase"):      # pretraining only: no scoring
        SitePolicy(allowed_phases=["pretrain"]).check(cfg(), "finetune", training=False, split="val")


def test_a_privacy_cap_binds_runs_without_dp_and_the_site_bounds_delta_and_noise():
    """max_epsilon means something only under DP: a run without it is refused; the site, not the
    server, bounds delta and (with dp_required) the noise multiplier."""
    plain = cfg()
    with pytest.raises(PolicyRefusal, match="caps the privacy budget .* trains without differential privacy"):
        SitePolicy(max_epsilon=8.0).check(plain, "finetune", training=True)
    SitePolicy(max_epsilon=8.0).check(plain, "finetune", training=False, split="test")     # evaluation spends none
    loose = cfg(privacy={"enabled": True, "noise_multiplier": 1.0, "delta": 0.5})
    with pytest.raises(PolicyRefusal, match="delta at most 0.001 .* asks for 0.5"):
        SitePolicy(max_delta=0.001).check(loose, "finetune", training=True)
    faint = cfg(privacy={"enabled": True, "noise_multiplier": 0.001})
    with pytest.raises(PolicyRefusal, match="noise multiplier of at least 0.5 .* asks for 0.001"):
        SitePolicy(dp_required=True).check(faint, "finetune", training=True)
    SitePolicy(dp_required=True).check(cfg(privacy={"enabled": True, "noise_multiplier": 0.8}), "finetune",
                                       training=True)


def args(tmp_path: Path, **kw):
    base = dict(site="A", data=tmp_path, server="127.0.0.1:9092", root_cert=None, auth_key=None, policy=None,
                insecure=False, coordinator_key=None)
    return SimpleNamespace(**{**base, **kw})


def test_preflight_names_the_wrong_file(tmp_path):
    with pytest.raises(JoinError, match="give --root-cert ca.crt, --auth-key A.key and --coordinator-key "
                                        "coordinator.pub"):
        preflight(args(tmp_path))
    not_cert, not_key = tmp_path / "ca.crt", tmp_path / "A.key"
    not_cert.write_text("hello\n")
    from cmvim.instructions import write_keys
    (tmp_path / "coordinator").mkdir()
    _, coordinator = write_keys(tmp_path / "coordinator")
    not_key.write_text("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")
    with pytest.raises(JoinError, match="--root-cert .*ca.crt: not a PEM certificate"):
        preflight(args(tmp_path, root_cert=not_cert, auth_key=not_key, coordinator_key=coordinator))
    with pytest.raises(JoinError, match="--root-cert .*missing.crt: cannot read it"):
        preflight(args(tmp_path, root_cert=tmp_path / "missing.crt", auth_key=not_key, coordinator_key=coordinator))
    from cmvim.deploy.certs import make_ca, make_site_keys
    make_ca(tmp_path / "certs", days=1)
    make_site_keys(tmp_path / "certs", "A")
    with pytest.raises(JoinError, match="--auth-key .*A.key: not an unencrypted OpenSSH private key"):
        preflight(args(tmp_path, root_cert=tmp_path / "certs" / "ca.crt", auth_key=not_key, coordinator_key=coordinator))
    good = dict(root_cert=tmp_path / "certs" / "ca.crt", auth_key=tmp_path / "certs" / "sites" / "A.key",
                coordinator_key=coordinator)
    preflight(args(tmp_path, **good))
    with pytest.raises(JoinError, match="--coordinator-key .*A.pub: not a PEM public key"):   # the site's own key
        preflight(args(tmp_path, **{**good, "coordinator_key": tmp_path / "certs" / "sites" / "A.pub"}))
    with pytest.raises(JoinError, match="--coordinator-key .*ca.crt: not a PEM public key"):
        preflight(args(tmp_path, **{**good, "coordinator_key": tmp_path / "certs" / "ca.crt"}))
    with pytest.raises(JoinError, match="--server 'fl.example.org': expected HOST:PORT"):
        preflight(args(tmp_path, server="fl.example.org", **good))
    bad_policy = tmp_path / "policy.yaml"
    bad_policy.write_text("max_batchsize: 4\n")
    with pytest.raises(JoinError, match="--policy .*max_batchsize"):
        preflight(args(tmp_path, policy=bad_policy, **good))


def test_the_example_policy_in_deploy_loads():
    policy = load_policy(Path(__file__).resolve().parent.parent / "deploy" / "policy.example.yaml")
    assert policy.max_local_epochs == 5 and policy.allowed_phases == ["pretrain", "finetune", "evaluate"]


def test_a_site_that_requires_secure_aggregation_refuses_unmasked_training():
    run, policy = cfg(), SitePolicy(secure_aggregation_required=True)
    with pytest.raises(PolicyRefusal, match="requires secure aggregation"):
        policy.check(run, "finetune", training=True)
    policy.check(run, "finetune", training=True, masked=True)       # through SecAgg+
    policy.check(run, "finetune", training=False, split="test")     # evaluation sends no weights
