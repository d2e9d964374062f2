"""Run by test_distributed under torchrun (2 processes) and alone (1 process):
the same training with the same global batch; writes the final weights.
A third argument ``channels_last`` trains in that memory format."""
import sys

import torch
from torch import nn

from norton.training import (
    TrainConfig,
    fit,
    init_distributed,
    load_dataset,
    split_validation,
)


def small_net():
    # no BatchNorm: per-rank batch statistics would differ from the global batch's on CPU
    # (SyncBatchNorm needs CUDA), and this test is about gradient averaging and sharding
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(16, 10))


def main(run_dir, out, layout="contiguous"):
    torch.set_num_threads(1)
    device = torch.device("cpu")
    ddp = init_distributed(device)
    torch.manual_seed(0)
    model = small_net()
    train = load_dataset("digits", None, "train")
    train, val = split_validation(train, 200)
    fit(model, train, val, TrainConfig(epochs=2, batch_size=64, lr=0.05, warmup_epochs=0,
                                         channels_last=layout == "channels_last"), run_dir,
        device=device, overwrite=True, progress=False, ddp=ddp)
    state = model.state_dict()
    assert all(torch.isfinite(v).all() for v in state.values()), "training diverged"
    torch.save(state, f"{out}.rank{ddp.rank}.pt")
    if ddp.world_size > 1:
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
