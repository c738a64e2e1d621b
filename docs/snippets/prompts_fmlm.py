import torch

import flowlm as fl
from flowlm.backbones import DiT
from flowlm.data import AlphaRepeat
from flowlm.distill import init_student, semigroup_kl_loss

torch.manual_seed(0)
task = AlphaRepeat(vocab_size=8, length=6)
V, L = task.vocab_size, task.length
interp = fl.LinearInterpolant(reparam=fl.TokenAccuracy(V))


def train(model: torch.nn.Module, loss_of_batch, steps: int, lr: float) -> None:
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    for _ in range(steps):
        tokens = task.sample(64)
        context = fl.prefix_context(tokens, p_uncond=0.1)  # a random prompt per row
        loss = fl.masked_mean(loss_of_batch(tokens, context), context.unknown)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()


# 1. A conditional FLM teacher: known positions at time 1, the loss on the others.
teacher_net = DiT(V, dim=32, depth=1, heads=2, dropout=0.0)
teacher = fl.XPredictor(teacher_net)


def flm_loss(tokens, context):
    x1, t = fl.one_hot(tokens, V), context.times(fl.uniform_times(len(tokens)))
    return fl.cross_entropy(teacher.logits(interp.sample(torch.randn_like(x1), x1, t), t), tokens)


train(teacher_net, flm_loss, steps=150, lr=3e-3)
teacher.requires_grad_(False)

# 2. Conditional distillation: teacher and student see the same context (t = s = 1 on it).
student_net = DiT(V, dim=32, depth=1, heads=2, dropout=0.0, two_time=True)
init_student(student_net, teacher_net)
student = fl.XPredMap(fl.XPredictor(student_net), interp, two_time=True)


def fmlm_loss(tokens, context):
    pair = fl.time_pairs(len(tokens))
    t, s = context.times(pair.t), context.times(pair.s)
    x1 = fl.one_hot(tokens, V)
    return semigroup_kl_loss(student, teacher, interp.sample(torch.randn_like(x1), x1, t), t, s)


train(student_net, fmlm_loss, steps=60, lr=1e-3)

# 3. One call fills every unknown position given the prompt.
prompts = task.sample(512)
context = fl.Context.prefix(prompts, 2)
noise = torch.randn(512, L, V)
for name, flow_map in [("FLM", fl.XPredMap(teacher, interp)), ("FMLM", student)]:
    trajectory = fl.rollout(flow_map, noise, fl.time_grid(1), context=context)
    tokens = fl.decode(trajectory.x)
    print(f"{name}: 1 step, NFE {trajectory.nfe}, valid {task.valid_rate(tokens):.2f}")
