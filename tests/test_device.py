"""Device placement and precision: what resolves to what, bf16 autocast through the engine on the
CPU, checkpoints that move between devices, a site's --device, the simulation's GPU shares. The
CUDA tests run only where a GPU is (benchmarks/gpu.py is the full check there)."""
import argparse
from pathlib import Path

import pytest
import torch

from cmvim import engine
from cmvim.device import DeviceError, Precision, resolve_device, to_cpu, to_device
from cmvim.model import CMViM, CMViMClassifier, model_config
from cmvim.run_config import run_config
from cmvim.simulations.toy import synthetic_batch

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="no CUDA device on this machine (benchmarks/gpu.py checks the GPU path)")


def test_devices_resolve_and_a_missing_gpu_is_an_error_not_a_silent_fallback():
    assert resolve_device("auto") == torch.device("cuda" if CUDA else "cpu")
    assert resolve_device("CPU") == torch.device("cpu")
    if not CUDA:
        with pytest.raises(DeviceError, match="no CUDA device"):
            resolve_device("cuda")
        with pytest.raises(DeviceError, match="no CUDA device"):
            resolve_device("cuda:1")
    for bad in ("gpu", "cuda:x", "tpu", ""):
        with pytest.raises(DeviceError, match="choose auto, cpu, cuda or cuda:N"):
            resolve_device(bad)
    # the run config checks the spelling without touching a GPU; the default is auto
    assert run_config({}).device == "auto" and run_config({}).precision == "auto"
    with pytest.raises(ValueError, match="device 'gpu'"):
        run_config({"device": "gpu"})
    with pytest.raises(ValueError, match="precision"):
        run_config({"precision": "fp8"})
    with pytest.raises(ValueError, match="gpus_per_site"):
        run_config({"gpus_per_site": -1})


def test_precision_auto_is_fp32_on_a_cpu_and_explicit_choices_are_checked():
    cpu = torch.device("cpu")
    assert Precision.resolve("auto", cpu).name == "fp32"
    bf16 = Precision.resolve("bf16", cpu)
    assert bf16.name == "bf16" and bf16.scaler is None
    with pytest.raises(DeviceError, match="fp16 needs a CUDA device"):
        Precision.resolve("fp16", cpu)
    with pytest.raises(DeviceError, match="choose one of"):
        Precision.resolve("fp8", cpu)


def _pretrain_steps(precision: Precision, steps: int = 3):
    mc = model_config("tiny")
    torch.manual_seed(0)
    model = CMViM(mc)
    batches = [synthetic_batch(mc, 4, seed=s) for s in range(steps)]
    optimizer = engine.make_optimizer(model, 1e-3)
    torch.manual_seed(1)
    metrics = engine.train(model, batches, optimizer, engine.pretrain_loss, precision=precision)
    return model, metrics


def test_bf16_autocast_trains_through_the_engine_with_fp32_weights_and_close_losses():
    fp32_model, fp32 = _pretrain_steps(Precision("fp32"))
    bf16_model, bf16 = _pretrain_steps(Precision("bf16"))
    assert all(p.dtype == torch.float32 for p in bf16_model.parameters())       # autocast: weights stay fp32
    assert torch.isfinite(torch.tensor(bf16["loss"]))
    assert bf16["loss"] == pytest.approx(fp32["loss"], rel=0.05), (bf16, fp32)
    moved = [n for (n, a), b in zip(fp32_model.named_parameters(), bf16_model.parameters())
             if a.requires_grad and not torch.equal(a, b)]
    assert moved                                            # the bf16 run is not a copy of the fp32 one
    # inside autocast the projections really run in bf16, and the scan hands back the input's dtype
    mc = model_config("tiny")
    clf = CMViMClassifier(mc)
    batch = synthetic_batch(mc, 2, seed=3)
    seen = []
    clf.image.encoder.layers[0].mixer.in_proj.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        hidden = clf.features(batch)
    assert seen == [torch.bfloat16]
    reference = clf.features(batch)
    torch.testing.assert_close(hidden.float(), reference, atol=0.1, rtol=0.1)


def test_predict_and_probe_follow_the_model_and_return_host_arrays():
    mc = model_config("tiny", readout="tokens")
    clf = CMViMClassifier(mc)
    batch = synthetic_batch(mc, 4, seed=0)
    batch["label"] = torch.tensor([0, 1, 0, 1])
    labels, probs = engine.predict(clf, [batch], Precision("bf16"))
    assert probs.shape == (4, 2) and abs(probs.sum(1) - 1).max() < 1e-3
    moved = to_device(batch, torch.device("cpu"))
    assert moved is not batch and moved["mri"] is batch["mri"]      # the CPU path copies nothing


def test_checkpoints_and_shared_weights_leave_on_the_cpu_and_load_anywhere(tmp_path):
    from cmvim.server.checkpoints import Checkpoint
    from cmvim.weights import load_weights
    mc = model_config("tiny")
    state = CMViMClassifier(mc).state_dict()
    # a state on the meta device stands in for one on a GPU: to_cpu refuses to invent its values
    with pytest.raises(NotImplementedError):
        to_cpu({k: v.to("meta") for k, v in state.items()})
    cpu_state = to_cpu(state)
    assert all(v.device.type == "cpu" and not v.requires_grad for v in cpu_state.values())
    Checkpoint("finetune", 2, state).save(tmp_path / "checkpoints")
    loaded = Checkpoint.latest(tmp_path / "checkpoints")
    assert loaded.round == 2 and all(torch.equal(loaded.arrays[k], state[k]) for k in state)
    # a model on the meta device (no memory: a stand-in for another device) takes the
    # checkpoint's weights with assign, and lands on the CPU with them
    meta_model = CMViMClassifier(mc).to("meta")
    meta_model.load_state_dict(loaded.arrays, assign=True)
    assert all(p.device.type == "cpu" for p in meta_model.parameters())
    torch.save({"arrays": state}, tmp_path / "weights.pt")
    assert set(load_weights(tmp_path / "weights.pt")) == set(state)


def test_a_site_task_trains_on_its_device_in_bf16_and_shares_cpu_tensors(easy_cohort):
    from cmvim.data import SiteData
    from cmvim.site_task import SiteTask
    from cmvim.weights import initial_state
    cfg = run_config({"cohort": {"path": str(easy_cohort)}, "model": {"preset": "tiny"},
                      "preprocess": {"spatial": "none", "shape": 32, "voxel_size": 6.25}, "precision": "bf16", "device": "cpu",
                      "pretrain": {"rounds": 1, "batch_size": 8, "max_steps": 2}})
    site = SiteData.load(Path(easy_cohort) / "A", cfg.preprocess, seed=0)
    task = SiteTask(cfg, [site], "A")
    assert task.device == torch.device("cpu") and task.precision.name == "bf16"
    result = task.train("pretrain", 1, initial_state(cfg, "pretrain"))
    assert result.metrics["num-examples"] == 16 and torch.isfinite(torch.tensor(result.metrics["loss"]))
    assert all(v.device.type == "cpu" and v.dtype == torch.float32 for v in result.shared.values())
    if not CUDA:
        with pytest.raises(DeviceError, match="no CUDA device"):
            SiteTask(cfg, [site], "A", device="cuda")       # the site's own choice is checked, not ignored


def test_cmvim_client_refuses_a_device_it_does_not_have(tmp_path):
    from cmvim.client.join import JoinError, preflight, supernode_command
    args = argparse.Namespace(insecure=True, root_cert=None, auth_key=None, policy=None, server="127.0.0.1:9092",
                              site="A", data=tmp_path, device="cpu")
    preflight(args)
    command = supernode_command(args, 9094, tmp_path)
    assert 'device="cpu"' in command[command.index("--node-config") + 1]
    if not CUDA:
        args.device = "cuda:0"
        with pytest.raises(JoinError, match="--device: .*no CUDA device"):
            preflight(args)


def test_simulation_gpu_shares_are_checked_against_the_machine():
    from cmvim.simulations.assembly import gpu_problem, simulated_device
    assert gpu_problem(run_config({})) is None
    # without GPU shares every simulated site computes on the CPU, whatever Ray shows it
    assert simulated_device(run_config({})).device == "cpu"
    assert simulated_device(run_config({"gpus_per_site": 0.5})).device == "auto"
    if not CUDA:
        assert "no CUDA device" in gpu_problem(run_config({"gpus_per_site": 0.5}))
    assert "gpus_per_site > 0" in gpu_problem(run_config({"device": "cuda"}))


# -- on a GPU only ------------------------------------------------------------------------------------

@needs_cuda
def test_cuda_forward_and_gradients_match_the_cpu():
    mc = model_config("tiny", readout="tokens")
    torch.manual_seed(0)
    cpu_model = CMViMClassifier(mc)
    gpu_model = CMViMClassifier(mc)
    gpu_model.load_state_dict(cpu_model.state_dict())
    gpu_model.cuda()
    batch = synthetic_batch(mc, 2, seed=0)
    out_cpu = cpu_model(batch)
    out_gpu = gpu_model(to_device(batch, torch.device("cuda")))
    torch.testing.assert_close(out_gpu.cpu(), out_cpu, atol=1e-3, rtol=1e-3)
    out_cpu.sum().backward()
    out_gpu.sum().backward()
    for (name, a), b in zip(cpu_model.named_parameters(), gpu_model.parameters()):
        torch.testing.assert_close(b.grad.cpu(), a.grad, atol=1e-3, rtol=1e-2, msg=name)


@needs_cuda
def test_fp16_on_a_gpu_scales_the_loss():
    precision = Precision.resolve("fp16", torch.device("cuda"))
    assert precision.scaler is not None
    mc = model_config("tiny")
    model = CMViM(mc).cuda()
    metrics = engine.train(model, [synthetic_batch(mc, 4, seed=0)], engine.make_optimizer(model, 1e-3),
                           engine.pretrain_loss, precision=precision)
    assert torch.isfinite(torch.tensor(metrics["loss"]))
