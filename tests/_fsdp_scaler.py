"""A worker of tests/test_fsdp.py (2 processes, torchrun, gloo): modx.train.fsdp.GradScaler
over a sharded model whose gradient overflows in process 1's shard only.

    python -m torch.distributed.run --nproc-per-node 2 tests/_fsdp_scaler.py OUT_DIR

Writes OUT_DIR/scaler_<rank>.json: found_inf and the scale after the overflowing step,
whether the step left the weights alone, and the unscaled gradient of the next step (with
the one it must be)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from modx.strategies.base import local
from modx.train.fsdp import GradScaler


def main(out: Path) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    model = nn.Linear(4, 4)
    model.scale = nn.Parameter(torch.tensor(1.0))  # 0-d: replicated, as CLIP's logit scale
    fully_shard(model, mesh=init_device_mesh("cpu", (2,)), ignored_params={model.scale})
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    scaler = GradScaler("cpu", init_scale=1024.0)

    def backward() -> None:
        optimizer.zero_grad(set_to_none=True)
        loss = (model(torch.ones(2, 4)) * model.scale).sum()
        scaler.scale(loss).backward()

    backward()
    if rank == 1:
        local(model.weight.grad)[0, 0] = float("inf")  # process 1's rows only
    before = local(model.weight).clone()
    scaler.unscale_(optimizer)
    found_inf = sum(v.item() for v in scaler._found_inf_per_device(optimizer).values())
    scaler.step(optimizer)
    scaler.update()
    unchanged = torch.equal(local(model.weight), before)

    backward()  # d loss / d W = scale * sum over the batch of the input: 2 everywhere
    scaler.unscale_(optimizer)
    scaler.unscale_(optimizer)  # a second call before update: a no-op
    got = local(model.weight.grad).flatten().tolist()
    want = [2.0 * model.scale.item()] * len(got)
    result = {"found_inf": found_inf, "scale_after": scaler.get_scale(), "weight_unchanged": unchanged,
              "unscaled": got, "want": want}
    (out / f"scaler_{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
