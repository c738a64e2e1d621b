"""FMLM, the flow-map language model: distil an FLM checkpoint into a few-step (one-step) sampler.

Loads an FLM checkpoint of examples/flm.py, trains a two-time student with one of the flow-map
distillation objectives of `flowlm.distill` (paper §5-6), then samples at 1, 2, 4 steps and
reports NFE, entropy and the task's measures next to the teacher's 1- and 8-step FLM.

    python examples/flm.py --out runs/flm.pt && python examples/fmlm.py --teacher runs/flm.pt
    python examples/fmlm.py --teacher runs/flm.pt --method lagrangian --out runs/fmlm.pt
    python examples/fmlm.py --teacher runs/flm.pt --smoke            # seconds, for CI
    python examples/fmlm.py --teacher runs/flm.pt --context prefix --out runs/fmlm.pt
    python examples/fmlm.py --teacher runs/flm.pt --out runs/fmlm.pt --sample-only --prompt "And"
    python examples/fmlm.py --teacher runs/flm.pt --soft-cap 30   # the student's logits capped
    python examples/fmlm.py --teacher runs/flm.pt --out runs/fmlm.pt --sample-only --churn 0.8
    python examples/fmlm.py --teacher runs/sc.pt --out runs/sc-fmlm.pt --self-condition-guidance 3

Methods (--method), one branch each in the loop below:

- v2: semigroup KL on the two-time denoiser + KL tie of its diagonal to the teacher; with
  --diagonal-fraction F, a share F of the rows trains only the tie, the rest only the jumps.
  --pair-sampling, --boundary-prob and --beta2 are the other options of the authors' v2 recipe.
- lagrangian / eulerian: one JVP per step, targets in logit space.
- self: semigroup KL + cross-entropy of the diagonal to data (no teacher in the loss).
- regression: KL of the student's jumps to the teacher's --teacher-steps-step rollout.
- v1: stage 1 trains a Taylor correction g (2 NFE per step) by semigroup self-distillation;
  stage 2 regresses a one-network student onto that frozen map.

The student is the teacher's DiT plus a second time embedding that starts at zero: before
training it *is* the teacher's Euler step. The network's and data's flags (--task, --dim, ...)
and the tokenizer are the teacher's; a teacher of --preset lm1b or owt is distilled with the
paper's settings for it. --steps counts steps per stage. The student's checkpoint stores the
teacher's checksum (a retrained teacher is refused); randomness and resumption are as in flm.py.

--soft-cap C: the student's logits C tanh(z / C) (default: the teacher's cap). --churn C: the
student's steps by γ-sampling (jump to s + C(1 - s), renoise back to s; one step unchanged).
A self-conditioned teacher (flm.py --self-condition) is queried as its own two-call estimate;
its self-conditioned student reads no estimate or its own first one, δ_{t,s}(x_t; 0), a coin
per row (bound to its rows: --diagonal-fraction splits them as any other batch), and is
reported with 1 call per step ("steps"), 2 ("self_conditioned_steps"), and 1 reading the step
before's estimate ("previous_estimate_steps", as flm.py samples), which
--self-condition-guidance W guides: z(x̂₁') + W (z(x̂₁') - z(0)), one batched call per step;
--prompt / --infill / --guidance / --block work as with a plain student.
"""

import json
import time
from argparse import Namespace, RawDescriptionHelpFormatter
from dataclasses import asdict, dataclass, fields, replace
from functools import partial
from pathlib import Path
from typing import Any, get_args

import torch
from tqdm import tqdm

import flowlm as fl
from flowlm import distill, train
from flowlm.backbones import DiT
from flowlm.data import tokenizer_from_state
from flowlm.data.tasks import TASKS, Task, TaskSettings, task_of
from flowlm.times import PairSampling

# ---------------------------------------------------------------------------- settings
# fmt: off
PRESETS: dict[str, dict[str, Any]] = {
    "corpus": dict(steps=300, lr=3e-4, warmup=20, ema_decay=0.99, samples=32),
    "alpha-repeat": dict(steps=12000, lr=1e-3, warmup=20, schedule="cosine", ema_decay=0.99,
                         diagonal_fraction=0.5, beta2=0.95, boundary_prob=0.5,
                         samples=256),  # boundary_prob, steps: results/alpha_repeat.md
    "markov": dict(steps=400, lr=1e-3, warmup=20, ema_decay=0.99, samples=128),
    "words": dict(steps=500, lr=1e-3, warmup=20, ema_decay=0.99, samples=256),
}
SMOKE = dict(steps=4, batch_size=8, warmup=1, samples=8, log_every=1, checkpoint_every=2)
PAPER_PRESETS = train.FMLM_PAPER_PRESETS  # the paper's settings, by the teacher's --preset
# fmt: on
METHODS = ("v2", "lagrangian", "eulerian", "self", "regression", "v1")
CHOICES = {
    "task": TASKS,
    "method": METHODS,
    "schedule": ("constant", "cosine"),
    "solver": ("euler", "heun"),
    "context": ("none", *train.TRAINING_CONTEXTS),  # prefix, spans, bernoulli
    "pair_sampling": get_args(PairSampling),
}
MODEL = (
    *(field.name for field in fields(TaskSettings)),
    "preset",
    "dim",
    "depth",
    "heads",
    "clock",
    "self_condition",
)
"""The teacher's settings: the student's network starts from the teacher's weights."""
BOUNDARY_PROB = {"v1-stage1": 1 / 64, "v1-stage2": 1 / 128}  # P(jump 0 -> 1); else 0.1
MIN_GAP = {"v1-stage1": 1e-6, "v1-stage2": 1e-5}  # the shortest jump s - t; else 1e-3
TEACHER_STEPS = (1, 8)  # the teacher's step counts reported beside the student's


@dataclass(frozen=True)
class Config(TaskSettings):  # the data flags, the teacher's (MODEL)
    """Everything that defines a distillation; saved in its checkpoints."""

    preset: str | None = None
    dim: int = 128
    depth: int = 4
    heads: int = 4
    clock: str = "token-accuracy"
    self_condition: bool = False  # the teacher's; its student is self-conditioned too
    soft_cap: float | None = None  # the student's logits C tanh(z / C); default: the teacher's
    dropout: float = 0.0
    method: str = "v2"
    teacher_steps: int = 8  # the regression target's rollout
    boundary_prob: float | None = None  # default: BOUNDARY_PROB
    pair_sampling: str = "gap-then-start"  # how jumps t -> s are drawn (fl.time_pairs)
    diagonal_fraction: float | None = None  # v2: rows on the diagonal only, the rest on jumps only
    steps: int = 300
    batch_size: int = 32
    lr: float = 3e-4
    beta2: float = 0.999  # AdamW's second-moment decay
    warmup: int = 20
    schedule: str = "constant"
    grad_clip: float = 1.0
    ema_decay: float = 0.99
    bf16: bool = False
    seed: int = 0
    log_every: int = 10
    checkpoint_every: int = 100
    sample_steps: tuple[int, ...] = (1, 2, 4)
    solver: str = "euler"  # the teacher's sampler in the report
    self_condition_guidance: float | None = None  # the student's z(x̂₁') + W (z(x̂₁') - z(0))
    churn: float = 0.0  # γ-sampling of the student's steps, in [0, 1): 0 is deterministic
    context: str = "none"  # distil with contexts (teacher and student see the same, t = s = 1)
    p_uncond: float = 0.1  # with a context: rows distilled with none
    samples: int = 32

    def check(self, world_size: int) -> None:
        """Raise ValueError naming the flag of the first setting that cannot work."""
        positive = "steps batch_size samples log_every checkpoint_every teacher_steps"
        train.check_settings(self, world_size, positive.split())  # and --lr, --p-uncond, ...
        fraction = self.diagonal_fraction
        if fraction is not None and not 0 <= fraction <= 1:
            raise ValueError(f"--diagonal-fraction must lie in [0, 1], got {fraction}")


def parse_command_line(argv: list[str] | None) -> tuple[Namespace, dict[str, Any]]:
    """The invocation's options, and the settings given on the command line (only those)."""
    parser = train.ArgumentParser(description=__doc__, formatter_class=RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", type=Path, required=True, help="an FLM checkpoint")
    train.add_run_flags(parser)  # --out (the student), --resume, --sample-only, --json, ...
    train.add_settings(parser, Config, CHOICES)  # --method, --steps, ...: override the preset
    given = vars(parser.parse_args(argv))
    options = train.run_flags(given)  # checked; what is left in given: the settings given
    options.teacher = given.pop("teacher")
    return options, given


def settle(options: Namespace, given: dict[str, Any], procs: train.Processes):
    """The settings, task, teacher's checkpoint and digest, and the student's saved state."""
    if not options.teacher.is_file():
        hint = f"train one with examples/flm.py --out {options.teacher}"
        raise FileNotFoundError(f"--teacher: no FLM checkpoint at {options.teacher}; {hint}")
    teacher = train.load_checkpoint(options.teacher, kind="flm")  # refuses damaged files
    digest = train.checkpoint_digest(options.teacher)
    advice = "the student is the teacher's network"
    teacher_config = asdict(Config()) | teacher["config"]  # a teacher older than a setting
    train.check_unchanged(given, teacher_config, MODEL, "the teacher's", advice)
    saved = train.saved_run(options, "fmlm", "student checkpoint")  # and refuses smoke mixes
    if saved is None:
        base = {name: teacher_config[name] for name in (*MODEL, "soft_cap")}
        base |= PRESETS[base["task"]] | PAPER_PRESETS.get(base["preset"], {})
        base |= (SMOKE | ({"bf16": False} if base["preset"] else {})) if options.smoke else {}
    else:
        if saved["teacher_digest"] != digest:
            raise ValueError(
                f"{options.out} was distilled from another teacher than the one now at "
                f"{options.teacher} (checksum {saved['teacher_digest'][:12]}, now {digest[:12]}): "
                "retrained? give another --out or delete it"
            )
        base = asdict(Config()) | saved["config"]
        train.check_unchanged(given, base, ("method", "soft_cap"), "the student's", "another --out")
        base |= {"sample_steps": tuple(base["sample_steps"])}
    config = replace(Config(**base), **given)
    config.check(procs.world_size)
    task = task_of(config, tokenizer_from_state(teacher["tokenizer"]))
    rows = max(config.batch_size // procs.world_size, config.samples)
    needed = train.transformer_step_bytes(rows, config.length, task.vocab_size, config.dim,
                                          2 * config.depth, config.heads)  # fmt: skip
    train.require_memory(needed, procs.device, f"this configuration ({config})")
    return config, task, teacher, digest, saved


# ---------------------------------------------------------------------------- data and reports
def draw_batch(task: Task, config: Config, stage: str, step: int, procs: train.Processes):
    """This process's rows of a step's batch: sequences, the noise's generator, time pairs.

    The generator is on the device: ``interpolant.noised(tokens, t, ..., generator=...)``
    draws the noise there, straight into x_t (after any context has set the times).
    """
    rows, device, rank = config.batch_size // procs.world_size, procs.device, procs.rank
    tokens = task.draw(rows, train.seeded_generator(config.seed, stage, step, rank)).to(device)
    generator = train.seeded_generator(config.seed, f"noise {stage}", step, rank, device=device)
    default = BOUNDARY_PROB.get(stage, 0.1)
    boundary = default if config.boundary_prob is None else config.boundary_prob
    strata = train.seeded_generator(config.seed, f"times {stage}", step)  # for the global batch
    pair = fl.time_pairs(rows, sampling=config.pair_sampling, boundary_prob=boundary,
                         min_gap=MIN_GAP.get(stage, 1e-3), rank=rank, world_size=procs.world_size,
                         generator=strata, device=device)  # fmt: skip
    return tokens, task.mask(tokens), generator, pair  # the mask: padding does not count (--lines)


def student_network(teacher: DiT, config: Config, stage: str) -> DiT:
    """The teacher's DiT plus a zero second time embedding (v1 stage 1: a zero output, g = 0)."""
    torch.manual_seed(train.derived_seed(config.seed, f"init {stage}"))
    vocab, device = teacher.vocab_size, teacher.output.weight.device
    c, zero = config, ["output"] if stage == "v1-stage1" else []
    extra = dict(dropout=c.dropout, self_conditioning=c.self_condition)
    network = DiT(vocab, c.dim, c.depth, c.heads, two_time=True, **extra).to(device)
    distill.init_student(network, teacher, zero=zero)
    if stage == "v1-stage1" and network.previous_embedding is not None:
        network.previous_embedding.requires_grad_(False)  # g reads no estimate (DDP: all used)
    return network


def sample_report(flow_map: fl.FlowMap, label: str, task: Task, config: Config, device: torch.device,
                  context: fl.Context | None = None, block: int | None = None,
                  churn_path: fl.Interpolant | None = None):  # fmt: skip
    """Per step count: NFE, entropy, the task's measures and the samples, from the same noise.

    ``context``: known tokens held at time 1; ``block``: that many positions at a time, in order;
    ``churn_path``: with --churn, γ-sampling along it (fresh noise seeded per step count).
    """
    generator = train.seeded_generator(config.seed, "sample", device=device)
    shape = (config.samples, task.length, task.vocab_size)
    noise = torch.randn(shape, generator=generator, device=device)
    report: dict[str, dict[str, Any]] = {}
    for n_steps in config.sample_steps:
        started = time.perf_counter()
        sampler = flow_map
        if churn_path is not None and config.churn > 0:  # jump past each grid time, renoise
            churn = train.seeded_generator(config.seed, "churn", n_steps, device=device)
            sampler = fl.GammaSampling(flow_map, churn_path, config.churn, generator=churn)
        trajectory = train.sample_rollout(sampler, noise, n_steps, context, block)
        seconds, tokens = time.perf_counter() - started, fl.decode(trajectory.x)
        where = f"{n_steps} step(s), {label}"  # NFE, entropy, the task's measures, the texts:
        report[str(n_steps)] = train.sample_measures(task, tokens, trajectory.nfe, where, seconds)
    return report


# ---------------------------------------------------------------------------- the run
def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Distil (or resume, or only sample) and return (with --json also write) the metrics."""
    options, given = parse_command_line(argv)
    torch.set_num_threads(options.threads)
    with train.processes() as procs:
        try:
            config, task, teacher_state, teacher_digest, saved = settle(options, given, procs)
        except (ValueError, OSError, ImportError) as error:  # one line: bad data or tokenizer
            train.fail(str(error))
        if procs.is_main and options.out is not None and not options.sample_only:
            for stale in train.remove_partial_files(options.out):
                print(f"removed {stale}, left by an interrupted checkpoint write")
        vocab, device = task.vocab_size, procs.device
        encode = task.tokenizer.encode  # --prompt / --infill: checked before training
        prompt = train.template_context(options, encode, task.length, config.samples, device)
        shape, sc = (config.dim, config.depth, config.heads), config.self_condition
        teacher_network = DiT(vocab, *shape, dropout=0.0, self_conditioning=sc)
        teacher_network.load_state_dict(teacher_state["ema"])  # the teacher's EMA weights
        teacher_network = teacher_network.to(device).eval().requires_grad_(False)
        teacher_net = train.soft_capped(teacher_network, teacher_state["config"].get("soft_cap"))
        teacher = fl.XPredictor(fl.WithOwnEstimate(teacher_net) if sc else teacher_net)
        clock = fl.Identity() if config.clock == "identity" else fl.TokenAccuracy(vocab)
        interpolant = fl.LinearInterpolant(reparam=clock).to(device)
        velocity = fl.XPredVelocity(teacher, interpolant)
        many_steps = fl.Substeps(fl.XPredMap(teacher, interpolant), config.teacher_steps)
        if procs.is_main:
            print(
                f"flowlm FMLM ({config.method}): {task.description}\nteacher {options.teacher} "
                f"(step {teacher_state['step']}), device {device} x {procs.world_size}, {config}"
            )

        stages = ["v1-stage1", "v1-stage2"] if config.method == "v1" else [config.method]
        checkpoint_state = saved or dict(kind="fmlm", smoke=options.smoke, config=asdict(config))
        checkpoint_state |= dict(teacher_digest=teacher_digest, tokenizer=task.tokenizer.state())
        checkpoint_state.setdefault("stages", {})
        result: dict[str, Any] = {"task": config.task, "method": config.method, "train_steps": 0}
        networks: dict[str, DiT] = {}
        for stage in stages:
            network = networks[stage] = student_network(teacher_network, config, stage)
            weighting = fl.LearnedTimeWeighting().to(device)  # trained by v1's stage 1 only
            parameters = [*network.parameters(), *weighting.parameters()]
            betas = (0.9, config.beta2)
            optimizer = torch.optim.AdamW(parameters, lr=config.lr, betas=betas, weight_decay=0.0)
            ema = train.EMA(network, config.ema_decay)
            start = 0
            if stage in checkpoint_state["stages"]:
                stage_state = checkpoint_state["stages"][stage]
                parts = dict(model=network, ema=ema, optimizer=optimizer, weighting=weighting)
                for name, part in parts.items():
                    part.load_state_dict(stage_state[name])
                start = stage_state["step"]
            elif options.sample_only:
                train.fail(f"--sample-only: {options.out} holds no {stage} student yet")
            wrapped = procs.wrap(network)  # DDP averages the gradients
            student_net = train.soft_capped(wrapped, config.soft_cap)
            student = fl.XPredMap(fl.XPredictor(student_net), interpolant, two_time=True)
            taylor = fl.TaylorMap(velocity, wrapped)  # v1 stage 1: x + d v + d² g / 2
            if stage == "v1-stage2":  # regress onto stage 1's frozen EMA Taylor map
                frozen_taylor = fl.TaylorMap(velocity, networks["v1-stage1"])
            train_loss: dict[str, float] = {}
            schedule = partial(train.learning_rate, peak=config.lr, warmup=config.warmup,
                               total=config.steps, schedule=config.schedule)  # fmt: skip
            started = time.perf_counter()
            network.train()
            todo = range(start, 0 if options.sample_only else config.steps)
            draw_context = train.TRAINING_CONTEXTS.get(config.context)  # None: --context none
            progress = tqdm(
                todo, stage, initial=start, total=config.steps, disable=not procs.is_main
            )
            for step in progress:
                seed, rank = config.seed, procs.rank
                torch.manual_seed(train.derived_seed(seed, "dropout", step, rank))
                tokens, mask, noise_generator, (t, s) = draw_batch(task, config, stage, step, procs)
                if draw_context is not None:  # teacher and student: t = s = 1 on known tokens
                    generator = train.seeded_generator(seed, "context", step, rank, device=device)
                    known = draw_context(tokens, p_uncond=config.p_uncond, generator=generator)
                    t, s = known.times(t), known.times(s)
                    mask = known.unknown if mask is None else mask & known.unknown
                x_t = interpolant.noised(tokens, t, vocab, generator=noise_generator)
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=config.bf16):
                    if sc and stage != "v1-stage1":  # per row: no estimate or δ_{t,s}(x_t; 0)
                        coins = train.seeded_generator(
                            seed, f"coins {stage}", step, rank, device=device
                        )
                        previous = fl.draw_previous(student_net, x_t, t, s, generator=coins)
                        bound = fl.XPredictor(fl.WithPrevious(student_net, previous))
                        student = fl.XPredMap(bound, interpolant, two_time=True)
                    if stage == "v2" and config.diagonal_fraction is not None:
                        generator = train.seeded_generator(seed, "split", step, rank, device=device)
                        split = fl.diagonal_split(len(x_t), config.diagonal_fraction,
                                                  generator=generator, device=device)  # fmt: skip
                        token_loss = fl.split_semigroup_kl_loss(student, teacher, x_t, t, s, split)
                    elif stage == "v2":
                        token_loss = distill.semigroup_kl_loss(student, teacher, x_t, t, s)
                    elif stage == "lagrangian":
                        token_loss = distill.lagrangian_kl_loss(student, teacher, x_t, t, s)
                    elif stage == "eulerian":
                        token_loss = distill.eulerian_kl_loss(student, teacher, x_t, t, s)
                    elif stage == "self":
                        token_loss = distill.self_semigroup_loss(student, tokens, x_t, t, s)
                    elif stage == "regression":
                        token_loss = distill.map_regression_kl_loss(student, many_steps, x_t, t, s)
                    elif stage == "v1-stage1":
                        token_loss = weighting(distill.taylor_semigroup_loss(taylor, x_t, t, s), t)
                    else:
                        token_loss = distill.map_regression_loss(student, frozen_taylor, x_t, t, s)
                    loss = fl.masked_mean(token_loss, mask)
                train.optimizer_step(optimizer, loss, parameters, schedule(step), config.grad_clip)
                ema.update(network)

                # Host reads only from here on, at log and checkpoint steps.
                done = step + 1
                last = done == config.steps
                every = config.checkpoint_every
                checkpoint = options.out is not None and (done % every == 0 or last)
                if done % config.log_every == 0 or checkpoint or last:
                    where = f"{stage} step {done}"
                    value = train.finite_loss(procs, loss, network, checkpoint, where)
                    train_loss[str(done)] = value
                if checkpoint and procs.is_main:
                    kept = dict(step=done, model=network.state_dict(), ema=ema.state_dict())
                    kept |= dict(optimizer=optimizer.state_dict(), weighting=weighting.state_dict())
                    checkpoint_state["stages"][stage] = kept
                    train.save_checkpoint(options.out, checkpoint_state)
            network.load_state_dict(ema.module.state_dict())  # sample (and stage 2) from the EMA
            network.eval()
            result[stage] = {"seconds": time.perf_counter() - started, "train_loss": train_loss}
            result["train_steps"] += start if options.sample_only else max(start, config.steps)

        if procs.is_main:
            network = train.soft_capped(networks[stages[-1]], config.soft_cap)
            if options.guidance is not None:  # z_c + w (z_c - z_u), one batched call per step
                network = fl.Guidance(network, options.guidance)
            student = fl.XPredMap(fl.XPredictor(network), interpolant, two_time=True)
            result |= train.conditioning_flags(options)  # --prompt, --infill, --guidance, --block
            known = dict(context=prompt, block=options.block)  # every report, the teacher's too
            report = partial(sample_report, task=task, device=device, **known)
            label, students = f"FMLM {config.method}", dict(config=config, churn_path=interpolant)
            result["steps"] = report(student, label, **students)  # self-conditioned: no estimate
            if sc:  # 2 calls per step: the student's first estimate, then the jump reading it
                own = fl.XPredMap(fl.XPredictor(fl.WithOwnEstimate(network)), interpolant, True)
                result["self_conditioned_steps"] = report(own, label + ", 2 calls", **students)
                guidance = config.self_condition_guidance  # 1 call: the step before's estimate
                passed = fl.SelfConditionedMap(
                    network, interpolant, two_time=True, guidance=guidance
                )
                passing = label + ", the step before's estimate"
                result["previous_estimate_steps"] = report(passed, passing, **students)
            if config.method == "v1":
                taylor = fl.TaylorMap(velocity, networks["v1-stage1"])
                result["stage1_steps"] = report(taylor, "v1 stage-1 Taylor map", config=config)
            euler = fl.XPredMap(teacher, interpolant)
            sampler = fl.Heun(velocity) if config.solver == "heun" else euler  # unguided
            if sc:  # its own sampler, the estimate threaded through Heun's stages too
                rule = fl.Heun if config.solver == "heun" else None
                sampler = fl.SelfConditionedMap(teacher_net, interpolant, solver=rule)
            teacher_config = replace(config, sample_steps=TEACHER_STEPS)
            label = f"teacher FLM {config.solver}"
            result["teacher_steps"] = report(sampler, label, config=teacher_config)
            if options.json is not None:
                train.atomic_write(options.json, json.dumps(result, indent=2).encode())
        return procs.share(result)


if __name__ == "__main__":
    main()
