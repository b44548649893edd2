"""What a sealed model shares with a checkpoint the user declares public (``stip seal
--public-base``): the side knowledge that vocabulary and weight matching need."""

from __future__ import annotations

import torch

# Weight matching recovered 99 % of π from MiniLM sealed with every tensor perturbed by 0.3 of
# its own standard deviation, 5 % at 1.0 (benchmarks/attacks.py; docs/threat-model.md).
NEAR = 0.5


@torch.no_grad()
def compare(model, public) -> dict:
    """Tensors of ``model`` identical to, or near (relative L2 distance < NEAR), the public
    model's tensor of the same name and shape; and whether the input embedding table is one."""
    mine, theirs = model.state_dict(), public.state_dict()
    shared = [n for n in mine if n in theirs and mine[n].shape == theirs[n].shape and mine[n].is_floating_point()]
    identical, near = [], []
    for n in shared:
        a, b = mine[n].double(), theirs[n].double()
        if torch.equal(a, b):
            identical.append(n)
        elif (a - b).norm() < NEAR * b.norm():
            near.append(n)
    table = model.get_input_embeddings().weight
    ptable = public.get_input_embeddings().weight
    same_table = table.shape == ptable.shape and bool(torch.equal(table, ptable))
    return {"tensors": len(mine), "shared": len(shared), "identical": identical, "near": near, "embedding_table_public": same_table}


def warnings(report: dict) -> list[str]:
    out = []
    if report["embedding_table_public"]:
        out.append("the input embedding table is the public one: the cloud can recover the user's tokens from what it "
                   "receives by vocabulary matching (measured 100 % on MiniLM; `stip attack vocab`)")
    n = len(report["identical"]) + len(report["near"])
    if n > report["tensors"] // 4:
        out.append(f"{len(report['identical'])} tensors are identical to the public checkpoint and {len(report['near'])} near it: "
                   "the cloud can recover the whole key by weight matching and then decrypt all traffic "
                   "(measured 100 % of π on MiniLM; `stip attack weights`)")
    return out
