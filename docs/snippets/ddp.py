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
device = torch.device("cpu")  # on GPUs: this process's device, e.g. cuda:LOCAL_RANK
task = AlphaRepeat(vocab_size=8, length=6)
V, L = task.vocab_size, task.length
backbone = DiT(V, dim=32, depth=1, heads=2, dropout=0.0).to(device)
predictor = fl.XPredictor(DistributedDataParallel(backbone) if distributed else backbone)
interpolant = fl.LinearInterpolant(reparam=fl.TokenAccuracy(V)).to(device)
optimizer = torch.optim.AdamW(backbone.parameters(), lr=3e-3)

global_batch = 64
local = global_batch // world_size
mine = range(rank * local, (rank + 1) * local)  # this process's rows of the global batch
for step in range(20):
    tokens = torch.empty(local, L, dtype=torch.long, device=device)
    t = torch.empty(local, device=device)
    x_t = torch.empty(local, L, V, device=device)
    for j, row in enumerate(mine):
        # Row i of step k has its own seed: each process draws only its rows, and they are
        # the rows one process would draw, whatever the number of processes.
        seed = global_batch * step + row
        host = torch.Generator().manual_seed(seed)
        tokens[j] = task.sample(1, host)[0]
        # the time in stratum i of the global batch: rank i of global_batch one-row "ranks"
        t[j] = fl.uniform_times(1, rank=row, world_size=global_batch, generator=host)[0]
        noise = torch.Generator(device).manual_seed(seed)  # drawn on the device, into x_t
        x_t[j] = interpolant.noised(tokens[j : j + 1], t[j : j + 1], generator=noise)[0]
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
    trajectory = fl.rollout(sampler, torch.randn(16, L, V, device=device), fl.time_grid(4))
    print(f"{world_size} process(es): loss {mean_loss.item():.3f}, NFE {trajectory.nfe}")
if distributed:
    dist.destroy_process_group()
