"""Opacus per-sample gradients through the Vim encoder equal per-example backward passes."""
import opacus
import pytest
import torch
from torch import nn

from cmvim.model import VimEncoder
from cmvim.ssm import available_backends

BACKENDS = [b for b in available_backends() if b in ("torch", "cpu")]


class TinyEncoder(nn.Module):
    """Tokens (b, L, 16) -> logits (b, 3): two bidirectional Vim blocks, mean pool, linear head."""

    def __init__(self, backend):
        super().__init__()
        self.encoder = VimEncoder(16, depth=2, d_state=4, scan_backend=backend)
        self.head = nn.Linear(16, 3)

    def forward(self, tokens):
        return self.head(self.encoder(tokens).mean(dim=1))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["hooks", "functorch"])
def test_per_sample_gradients_match_per_example_backward(backend, mode):
    torch.manual_seed(0)
    model = TinyEncoder(backend)
    reference = TinyEncoder(backend)
    reference.load_state_dict(model.state_dict())
    tokens, labels = torch.randn(5, 12, 16), torch.tensor([0, 1, 2, 1, 0])
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(tokens, labels), batch_size=5)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    engine = opacus.PrivacyEngine()
    private, optimizer, _ = engine.make_private(module=model, optimizer=optimizer, data_loader=loader,
                                                noise_multiplier=0.0, max_grad_norm=1e6,
                                                grad_sample_mode=mode, poisson_sampling=False)
    nn.functional.cross_entropy(private(tokens), labels).backward()

    params = dict(reference.named_parameters())
    checked = 0
    for name, param in model.named_parameters():
        assert param.grad_sample is not None, f"no per-sample gradient for {name}"
        for i in range(len(tokens)):
            reference.zero_grad()
            nn.functional.cross_entropy(reference(tokens[i:i + 1]), labels[i:i + 1]).backward()
            torch.testing.assert_close(param.grad_sample[i], params[name].grad, rtol=1e-4, atol=1e-6,
                                       msg=lambda m: f"{name}, sample {i}: {m}")
        checked += 1
    assert checked == len(params)
    # the raw SSM parameters are among those checked
    assert any(n.endswith("A_b_log") for n in params) and any(n.endswith(".D") for n in params)
