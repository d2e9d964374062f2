"""Which zoo models have groups in which one channel of a layer is several
channels of the group (a Ghost module's primary conv): the groups whose ties
make equal blocks, and those left whole for irregular ties.  A trace only
(no pruning): it shows which models the tie handling changes.

    .venv/bin/python benchmarks/group_ties.py [--models resnet18 timm/ghostnet_100 ...]
"""
from __future__ import annotations

import argparse
import sys

import torch

sys.path.insert(0, __file__.rsplit("/", 1)[0])
import zoo  # noqa: E402  (benchmarks/zoo.py: the model lists and builder)

from norton.compression.graph import all_groups, tied_blocks, build_graph  # noqa: E402

SKIPPED = ("vit_h_14", "vit_l_16", "vit_l_32", "regnet_y_16gf", "regnet_y_32gf", "regnet_y_128gf")  # size


def main() -> None:
    import torchvision

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    names = args.models or ([f"timm/{n}" for n in zoo.TIMM_MODELS]
                            + [n for n in torchvision.models.list_models(module=torchvision.models) if n not in SKIPPED])
    for name in names:
        size = 224 if any(k in name for k in ("vit", "swin", "maxvit")) else 64
        try:
            torch.manual_seed(0)
            model = zoo.build(name).eval()
            x = torch.randn(1, 3, size, size)
            ties = [tied_blocks(group, len(group[0].idxs)) for group in all_groups(build_graph(model, x))]
            print(f"{name:<28} {len(ties):4d} groups  tied in blocks: {sum(1 for t in ties if t not in (1, None)):3d}  "
                  f"irregular: {ties.count(None)}", flush=True)
        except Exception as err:  # noqa: BLE001 - a model this input size does not fit is reported, not fatal
            print(f"{name:<28} not traced: {type(err).__name__}: {str(err)[:80]}", flush=True)


if __name__ == "__main__":
    main()
