"""Shared test inputs."""

import torch


def ids_batch(b=2, n=96, pad=(0, 17), seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 128, (b, n), generator=g)
    am = torch.ones_like(ids)
    for i, p in enumerate(pad[:b]):
        am[i, :p] = 0
        ids[i, :p] = 0
    return ids, am
