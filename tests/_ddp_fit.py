"""Run by tests/test_foundation.py under `torchrun --nproc_per_node=2` (CPU, gloo): the shared fit loop
trains a tiny regression in 2 processes; each rank writes what it saw."""
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from duotok.config import TrainConfig
from duotok.train import evaluate_loss, fit
from duotok.tracking import NullTracker

out = Path(sys.argv[1])
g = torch.Generator().manual_seed(0)
x = torch.randn(512, 4, generator=g); y = x @ torch.tensor([1.0, -2.0, 0.5, 3.0])
loader = DataLoader(TensorDataset(x, y), batch_size=32, shuffle=True)
cfg = TrainConfig(steps=30, batch_size=32, lr=0.3, warmup_steps=3, weight_decay=0.0, grad_clip=10.0,
                  val_every=0, ckpt_every=10, log_every=10, seed=0, mixed_precision="no", num_workers=0)
loss = lambda m, b: {"reg/mse": ((m(b[0]).squeeze(-1) - b[1]) ** 2).mean()}
model = nn.Linear(4, 1)
before = evaluate_loss(model, loss, DataLoader(TensorDataset(x, y), batch_size=128))["reg/mse"]
r = fit(model, loss, loader, cfg, out / "toy", NullTracker(), {"reg/mse": 1.0}, progress=False)
after = evaluate_loss(r.model, loss, DataLoader(TensorDataset(x, y), batch_size=128))["reg/mse"]
assert dist.is_initialized(), "torchrun must give a real process group"
rank, world = dist.get_rank(), dist.get_world_size()
w = r.model.weight.detach().flatten().tolist()
(out / f"rank{rank}.json").write_text(json.dumps({"world": world, "before": before, "after": after, "w": w, "step": r.step, "num_processes": r.num_processes}))
