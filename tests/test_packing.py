"""The shared parameters travel as one packed vector: exact round trips, the layout both ends
derive from the run config, a clear error when they disagree, and one Flower object where there
were hundreds."""
import pytest
import torch
from flwr.app import ArrayRecord

from cmvim.run_config import run_config
from cmvim.sharing import PACKED, SharingError, load_shared, pack, shared_layout, split_shared, unpack
from cmvim.weights import build_model, initial_state


@pytest.fixture(scope="module")
def cfg():
    return run_config({"model": {"preset": "tiny"}, "preprocess": {"spatial": "none", "shape": 32}})


@pytest.mark.parametrize("phase", ["pretrain", "finetune"])
def test_packing_round_trips_every_parameter_exactly(cfg, phase):
    state = initial_state(cfg, phase)
    layout = shared_layout(build_model(cfg, phase), phase)
    packed = pack({name: state[name] for name in layout})
    assert list(packed) == [PACKED] and packed[PACKED].dtype == torch.float32
    assert packed[PACKED].numel() == sum(v.numel() for v in state.values())
    back = unpack(packed, layout)
    assert list(back) == list(layout)
    for name, value in state.items():
        assert torch.equal(back[name], value), name
    # through Flower's record and back: one array where there were one per tensor
    record = ArrayRecord(packed)
    assert len(record) == 1 and len(ArrayRecord(state)) == len(state) > 40
    assert torch.equal(unpack(record.to_torch_state_dict(), layout)[next(iter(layout))], state[next(iter(layout))])


def test_a_site_loads_a_packed_message_and_packs_its_reply_in_the_servers_layout(cfg):
    """personalize head: the server packs the shared parameters only; the site's model takes
    them and keeps its own head; what it sends back unpacks on the server into the same names."""
    cfg = run_config({"model": {"preset": "tiny"}, "preprocess": {"spatial": "none", "shape": 32}, "personalize": "head"})
    server_layout = shared_layout(build_model(cfg, "finetune"), "finetune", "head")
    assert not any(name.startswith("head.") for name in server_layout)
    torch.manual_seed(1)
    global_state = {name: torch.randn(shape) for name, shape in server_layout.items()}
    site_model = build_model(cfg, "finetune")
    local = {k: v for k, v in site_model.state_dict().items() if k.startswith("head.")}
    load_shared(site_model, "finetune", "head", pack(global_state), local)
    for name, value in global_state.items():
        assert torch.equal(site_model.state_dict()[name], value), name
    shared, kept = split_shared(site_model, "finetune", "head")
    assert set(kept) == set(local)
    received = unpack(pack(shared), server_layout)
    assert all(torch.equal(received[name], global_state[name]) for name in server_layout)


def test_a_packed_vector_of_the_wrong_size_is_named(cfg):
    model = build_model(cfg, "finetune")
    layout = shared_layout(model, "finetune")
    short = {PACKED: torch.zeros(sum(torch.Size(s).numel() for s in layout.values()) - 3)}
    with pytest.raises(SharingError, match=r"hold \d+ values, the model expects \d+ in \d+ tensors"):
        load_shared(model, "finetune", "none", short, {})


def test_named_arrays_still_load(cfg):
    """A peer or a test that sends parameters by name is understood as before."""
    state = initial_state(cfg, "finetune")
    model = load_shared(build_model(cfg, "finetune"), "finetune", "none", state, {})
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
