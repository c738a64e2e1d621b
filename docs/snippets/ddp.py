# Run with:  torchrun --nproc_per_node=2 ddp.py   (or plain `python ddp.py`: one process)
import os

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

import flowlm as fl
from flowlm.backbones import DiT
from flowlm.data import AlphaRepeat

distributed = "RANK" in os.environ  # set by torchrun
if distributed:
    dist.init_process_group("gloo")  # "nccl" on GPUs, with one device per process
rank = dist.get_rank() if distributed else 0
world_size = dist.get_world_size() if distributed else 1

torch.manual_seed(0)  # identical initial weights on every process
task = AlphaRepeat(vocab_size=8, length=6)
V, L = task.vocab_size, task.length
backbone = DiT(V, dim=32, depth=1, heads=2, dropout=0.0)
predictor = fl.XPredictor(DistributedDataParallel(backbone) if distributed else backbone)
interpolant = fl.LinearInterpolant(reparam=fl.TokenAccuracy(V))
optimizer = torch.optim.AdamW(backbone.parameters(), lr=3e-3)

global_batch = 64
local = global_batch // world_size
mine = slice(rank * local, (rank + 1) * local)  # this process's rows of the global batch
for step in range(20):
    generator = torch.Generator().manual_seed(step)  # the same global draw on every process
    tokens = task.sample(global_batch, generator)[mine]
    t = fl.uniform_times(local, rank=rank, world_size=world_size, generator=generator)
    x0 = torch.randn(global_batch, L, V, generator=generator)[mine]
    x_t = interpolant.sample(x0, fl.one_hot(tokens, V), t)
    loss = fl.masked_mean(fl.cross_entropy(predictor.logits(x_t, t), tokens))
    optimizer.zero_grad(set_to_none=True)
    loss.backward()  # DDP averages the gradients across processes
    optimizer.step()

mean_loss = loss.detach()
if distributed:  # the loss of the whole global batch, as one process would see it
    dist.all_reduce(mean_loss)
    mean_loss /= world_size
if rank == 0:  # sample on one process, with the unwrapped network
    sampler = fl.XPredMap(fl.XPredictor(backbone), interpolant)
    trajectory = fl.rollout(sampler, torch.randn(16, L, V), fl.time_grid(4))
    print(f"{world_size} process(es): loss {mean_loss.item():.3f}, NFE {trajectory.nfe}")
if distributed:
    dist.destroy_process_group()
