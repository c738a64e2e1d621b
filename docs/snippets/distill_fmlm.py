import torch

import flowlm as fl
from flowlm.backbones import DiT
from flowlm.data import AlphaRepeat
from flowlm.distill import init_student, semigroup_kl_loss

torch.manual_seed(0)
task = AlphaRepeat(vocab_size=8, length=6)
V = task.vocab_size
interp = fl.LinearInterpolant(reparam=fl.TokenAccuracy(V))


def train(model: torch.nn.Module, loss_of_batch, steps: int, lr: float) -> None:
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    for _ in range(steps):
        tokens = task.sample(64)
        loss = fl.masked_mean(loss_of_batch(tokens, fl.one_hot(tokens, V)))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()


# 1. A tiny FLM teacher (see the quickstart).
teacher_net = DiT(V, dim=32, depth=1, heads=2, dropout=0.0)
teacher = fl.XPredictor(teacher_net)


def flm_loss(tokens, x1):
    t = fl.uniform_times(len(tokens))
    return fl.cross_entropy(teacher.logits(interp.sample(torch.randn_like(x1), x1, t), t), tokens)


train(teacher_net, flm_loss, steps=150, lr=3e-3)
teacher.requires_grad_(False)

# 2. The student: a two-time DiT that starts as the teacher (second time embedding at zero).
student_net = DiT(V, dim=32, depth=1, heads=2, dropout=0.0, two_time=True)
init_student(student_net, teacher_net)
student = fl.XPredMap(fl.XPredictor(student_net), interp, two_time=True)  # X_{t→s}


def fmlm_loss(tokens, x1):
    t, s = fl.time_pairs(len(tokens))  # jumps t → s, sometimes the whole 0 → 1
    x_t = interp.sample(torch.randn_like(x1), x1, t)
    return semigroup_kl_loss(student, teacher, x_t, t, s)


train(student_net, fmlm_loss, steps=60, lr=1e-3)

# 3. One step from noise: FLM returns per-position marginals, FMLM jumps to the data.
noise = torch.randn(512, task.length, V)
for name, flow_map in [("FLM", fl.XPredMap(teacher, interp)), ("FMLM", student)]:
    trajectory = fl.rollout(flow_map, noise, fl.time_grid(1))
    tokens = fl.decode(trajectory.x)
    print(f"{name}: 1 step, NFE {trajectory.nfe}, valid {task.valid_rate(tokens):.2f}")
