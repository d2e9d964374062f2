"""MACs removed by 50 % filter pruning of torchvision models with depthwise
convolutions (random weights, 1×3×64×64 input, l2 selection), and whether the
output keeps its shape.  The pruning guide's (docs/guides/pruning.md) depthwise figures come from this script:

    .venv/bin/python benchmarks/depthwise_pruning.py
"""
import torch
import torchvision

from norton import prune

MODELS = ("mobilenet_v2", "mobilenet_v3_small", "mnasnet0_5", "efficientnet_b0")

if __name__ == "__main__":
    torch.manual_seed(0)
    x = torch.randn(1, 3, 64, 64)
    print(f"{'model':<20} {'MACs removed':>12}  output shape kept  groups left whole")
    for name in MODELS:
        model = getattr(torchvision.models, name)(weights=None).eval()
        shape = model(x).shape
        report = prune(model, amount=0.5, example_inputs=x, criterion="l2")
        print(f"{name:<20} {1 - report.macs_after / report.macs_before:>11.1%}  {str(model(x).shape == shape):<17} "
              f"{len(report.skipped)}")
