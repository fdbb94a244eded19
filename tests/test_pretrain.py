"""A few pretraining steps (engine.pretrain, the sites' loop) on the tiny config lower every loss term on a fixed synthetic batch."""
import torch

from cmvim.engine import make_optimizer, pretrain, pretrain_losses
from cmvim.model import CMViM, model_config
from cmvim.simulations.toy import synthetic_batch


def test_pretraining_steps_lower_each_loss_term():
    torch.manual_seed(0)
    cfg = model_config("tiny")
    model = CMViM(cfg)                       # the automatic scan backend
    batch = synthetic_batch(cfg, 8, seed=1, pet_missing=0.2)
    optimizer = make_optimizer(model, lr=1e-3)
    before = pretrain_losses(model, [batch], seed=0)
    pretrain(model, [batch], optimizer, epochs=40)      # the loop every site runs, 40 steps on one batch
    after = pretrain_losses(model, [batch], seed=0)
    assert set(before) == {"loss", "recon_mri", "recon_pet", "intra", "inter", "report"}
    for term in before:
        assert after[term] < before[term], f"{term}: {before[term]:.4f} -> {after[term]:.4f}"
    assert after["recon_mri"] < 0.5 * before["recon_mri"]
