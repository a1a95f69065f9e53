"""DDP lays its buckets out anew after its first step: the hook's error-feedback residuals move
with their parameters (TNQHookState._segments) instead of being dropped. One rank, a real
torch.distributed Gloo group and DDP in this process: with error feedback 1.0 what a parameter
received over the steps is what it sent, less its last residual, across the new layout."""

import io
import warnings

import numpy as np
import pytest
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from horovod_tnq.protocol.exchange import residual_slots
from horovod_tnq.torch.ddp import TNQHookState, tnq_hook

STEPS = 4


@pytest.fixture(scope="module")
def one_rank_group():
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


class Crossed(torch.nn.Module):
    """Layers defined in the reverse of the order forward uses them: DDP's first buckets
    (reverse definition order) are not those it rebuilds (the order gradients became ready)."""

    def __init__(self):
        super().__init__()
        self.last = torch.nn.Linear(64, 8)
        self.middle = torch.nn.Linear(128, 64)
        self.first = torch.nn.Linear(32, 128)

    def forward(self, x):
        return self.last(torch.relu(self.middle(torch.relu(self.first(x)))))


def offsets(parameters):
    return np.cumsum([0] + [p.numel() for p in parameters]).tolist()


def train(settings, resume_at=None, **ddp_options):
    """Per parameter (by name): the gradients DDP handed the hook and what it gave back,
    summed over the steps; each step's bucket layout; the state. With ``resume_at``, the run
    is checkpointed after that many steps and goes on in a new model, DDP and hook state
    loaded from the checkpoint (DDP starts again from its first layout)."""
    torch.manual_seed(0)
    model = Crossed()
    sent = {name: torch.zeros(p.numel(), dtype=torch.float64)
            for name, p in model.named_parameters()}
    received = {name: torch.zeros_like(total) for name, total in sent.items()}
    layouts = []

    def start(model, checkpoint=None):
        names = {id(p): name for name, p in model.named_parameters()}
        ddp = DDP(model, bucket_cap_mb=0.02, **ddp_options)
        state = TNQHookState(named_parameters=model.named_parameters(), **settings)
        if checkpoint is not None:
            state.load_state_dict(torch.load(checkpoint, weights_only=True))

        def recording_hook(state, bucket):
            given = bucket.buffer().detach().clone()
            parameters = bucket.parameters()
            layouts[-1].append(tuple(names[id(p)] for p in parameters))

            def record(future):
                out = future.value()
                bounds = offsets(parameters)
                for k, p in enumerate(parameters):
                    sent[names[id(p)]] += given[bounds[k]:bounds[k + 1]].double()
                    received[names[id(p)]] += out[bounds[k]:bounds[k + 1]].double()
                return out

            return tnq_hook(state, bucket).then(record)

        ddp.register_comm_hook(state, recording_hook)
        return ddp, state, torch.optim.SGD(model.parameters(), lr=0.01)

    ddp, state, optimizer = start(model)
    for step in range(STEPS):
        if step == resume_at:
            checkpoint = io.BytesIO()
            torch.save(state.state_dict(), checkpoint)
            checkpoint.seek(0)
            resumed = Crossed()
            resumed.load_state_dict(model.state_dict())
            model = resumed
            ddp, state, optimizer = start(model, checkpoint)
        layouts.append([])
        optimizer.zero_grad()
        x = torch.randn(16, 32, generator=torch.Generator().manual_seed(step))
        ddp(x).pow(2).mean().backward()
        optimizer.step()
    return model, state, sent, received, layouts


def last_residuals(model, state, layout):
    """Each parameter's residual after the last step, read from the state's slots where
    exchange.residual_slots places them in the last layout's buckets (and their segments)."""
    by_name = dict(model.named_parameters())
    residual = {name: np.zeros(p.numel()) for name, p in by_name.items()}
    for index, bucket in enumerate(layout):
        bounds = offsets([by_name[name] for name in bucket])
        flat = np.zeros(bounds[-1])
        for start, stop, config, name in state._layouts[index][2]:
            for slot, _, begin, end in residual_slots(config, stop - start, 1, 0, None, name):
                flat[start + begin:start + end] = state.state.residuals[slot]
        for k, name in enumerate(bucket):
            residual[name] += flat[bounds[k]:bounds[k + 1]]
    return residual


def assert_nothing_lost(model, state, sent, received, layouts):
    residual = last_residuals(model, state, layouts[-1])
    for name in sent:
        total = sent[name].numpy()
        # what a residual dropped on the way would leave: a step's quantization error
        assert np.abs(residual[name]).max() > 1e-3 * np.abs(total).max(), name
        gap = np.abs(received[name].numpy() - (total - residual[name])).max()
        assert gap < 1e-5 * np.abs(total).max(), (name, gap)


@pytest.mark.parametrize("overrides", [None, {"middle.*": {"bits": 4}}],
                         ids=["one-setting", "overrides"])
def test_error_feedback_residuals_move_with_their_parameters_to_ddps_new_buckets(
        one_rank_group, overrides):
    settings = dict(bits=2, error_feedback=1.0, min_numel=16, part_elements=2048,
                    overrides=overrides)
    model, state, sent, received, layouts = train(settings)
    assert layouts[0] != layouts[1] and layouts[1:] == [layouts[1]] * (STEPS - 1), layouts
    if overrides:  # a bucket in segments of their own settings
        assert any(len(state._layouts[i][2]) > 1 for i in range(len(layouts[-1])))
    assert_nothing_lost(model, state, sent, received, layouts)


def test_error_feedback_residuals_resume_from_a_checkpoint_in_ddps_first_buckets(
        one_rank_group):
    """Saved in DDP's rebuilt buckets, resumed in a new DDP that starts again from its first
    ones and rebuilds them after one step: nothing lost either way."""
    settings = dict(bits=2, error_feedback=1.0, min_numel=16, part_elements=2048)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # (no "start afresh")
        model, state, sent, received, layouts = train(settings, resume_at=2)
    first, rebuilt = layouts[0], layouts[1]
    assert first != rebuilt and layouts == [first, rebuilt, first, rebuilt], layouts
    assert_nothing_lost(model, state, sent, received, layouts)


def test_error_feedback_residuals_move_when_ddp_rebuilds_a_step_later_with_static_graph(
        one_rank_group):
    settings = dict(bits=2, error_feedback=1.0, min_numel=16, part_elements=2048)
    model, state, sent, received, layouts = train(settings, static_graph=True)
    assert layouts[0] == layouts[1] != layouts[2] == layouts[3], layouts
    assert_nothing_lost(model, state, sent, received, layouts)
