"""FMLM, the flow-map language model: distil an FLM checkpoint into a few-step (one-step) sampler.

Loads an FLM checkpoint written by examples/flm.py, trains a two-time student with one of the
flow-map distillation objectives of `flowlm.distill`, then samples at 1, 2, 4, ... steps and
reports NFE, entropy and the task's quality measure next to the teacher's 1- and 8-step FLM.

    python examples/flm.py --out runs/flm.pt && python examples/fmlm.py --teacher runs/flm.pt
    python examples/fmlm.py --teacher runs/flm.pt --method lagrangian --out runs/fmlm.pt
    python examples/fmlm.py --teacher runs/flm.pt --smoke            # seconds, for CI

Methods (METHOD.md §6-7), each one line of `flowlm.distill`:

- ``v2``: semigroup KL on the two-time denoiser + KL tie of its diagonal to the teacher.
- ``lagrangian`` / ``eulerian``: one JVP per step, targets in logit space.
- ``self``: semigroup KL + cross-entropy of the diagonal to data (no teacher in the loss).
- ``regression``: KL of the student's jumps to the teacher's ``--teacher-steps``-step rollout.
- ``v1``: stage 1 trains a Taylor correction g (2 NFE per step) by semigroup
  self-distillation; stage 2 regresses a one-network student onto that frozen map.

The student is the teacher's DiT plus a second time embedding that starts at zero, so before
training it *is* the teacher's Euler step. ``--steps`` counts distillation steps (per stage).
"""

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from common import (
    Config,
    Distributed,
    Options,
    Task,
    build_backbone,
    build_interpolant,
    build_task,
    check_vocabulary,
    command_line_parser,
    derived_seed,
    describe_run,
    distributed,
    draw_training_data,
    load_checkpoint,
    make_ema,
    optimizer_step,
    parse_command_line,
    restore_training_state,
    sample_report,
    save_checkpoint,
    seeded_generator,
    training_state,
    write_json,
)
from torch import nn
from tqdm import tqdm

import flowlm as fl
from flowlm import distill
from flowlm.backbones import DiT
from flowlm.data import CharTokenizer

DEFAULT_THREADS = 1
METHODS = ("v2", "lagrangian", "eulerian", "self", "regression", "v1")
BOUNDARY_PROB = {"v1-stage1": 1 / 64, "v1-stage2": 1 / 128}
"""Probability of the whole-path jump (0, 1) per example; METHOD.md's values for v1."""
DEFAULT_BOUNDARY_PROB = 0.1
"""For the other methods: more one-step jumps than v1's 1/64 speeds up one-step quality."""
MIN_GAP = {"v1-stage1": 1e-6, "v1-stage2": 1e-5}
DEFAULT_MIN_GAP = 1e-3
TEACHER_STEPS = (1, 8)
"""The teacher's step counts reported beside the student's."""

PRESETS: dict[str, dict[str, Any]] = {
    "corpus": {"steps": 300, "lr": 3e-4, "warmup": 20, "ema_decay": 0.99, "samples": 32},
    "alpha-repeat": {
        "steps": 3000,
        "lr": 1e-3,
        "warmup": 20,
        "schedule": "cosine",
        "ema_decay": 0.99,
        "samples": 256,
    },
    "markov": {"steps": 400, "lr": 1e-3, "warmup": 20, "ema_decay": 0.99, "samples": 128},
}
SMOKE: dict[str, Any] = {
    "steps": 4,
    "batch_size": 8,
    "warmup": 1,
    "samples": 8,
    "log_every": 1,
    "eval_every": 2,
    "sample_every": 4,
    "checkpoint_every": 2,
}


@dataclass(frozen=True)
class Method:
    """What the distillation is: the objective and its time-pair distribution."""

    name: str = "v2"
    teacher: str = ""
    boundary_prob: float | None = None
    teacher_steps: int = 8


Loss = Callable[[fl.Tokens, fl.State, fl.Time, fl.Time], fl.TokenLoss]
"""A distillation objective on a batch: (tokens, x_t, t, s) -> per-token loss."""


@dataclass
class Stage:
    """One network trained by one objective; v1 has two stages, the other methods one."""

    name: str
    network: DiT
    extra: nn.Module | None
    loss: Callable[[nn.Module], Loss]
    """Given the (possibly DDP-wrapped) network, the objective."""


def student_network(teacher: DiT, config: Config, vocab_size: int, zero_output: bool) -> DiT:
    """The teacher's DiT with a second time embedding (zero at init), from the teacher's weights."""
    network = build_backbone(config, vocab_size, two_time=True).to(teacher.output.weight.device)
    distill.init_student(network, teacher, zero=["output"] if zero_output else [])
    return network


def one_network_loss(
    name: str, student: fl.XPredMap, teacher: fl.XPredictor, teacher_steps: int
) -> Loss:
    """The objective of a one-network method: one line of `flowlm.distill` each."""
    many_step_teacher = fl.Substeps(fl.XPredMap(teacher, student.interpolant), teacher_steps)

    def loss(tokens: fl.Tokens, x_t: fl.State, t: fl.Time, s: fl.Time) -> fl.TokenLoss:
        match name:
            case "v2":
                return distill.semigroup_kl_loss(student, teacher, x_t, t, s)
            case "lagrangian":
                return distill.lagrangian_kl_loss(student, teacher, x_t, t, s)
            case "eulerian":
                return distill.eulerian_kl_loss(student, teacher, x_t, t, s)
            case "self":
                return distill.self_semigroup_loss(student, tokens, x_t, t, s)
            case _:
                return distill.map_regression_kl_loss(student, many_step_teacher, x_t, t, s)

    return loss


def build_stages(
    method: Method, config: Config, teacher: DiT, interpolant: fl.Interpolant, vocab_size: int
) -> list[Stage]:
    """The networks and objectives of ``method``."""
    teacher_predictor = fl.XPredictor(teacher)

    def student_map(network: nn.Module) -> fl.XPredMap:
        return fl.XPredMap(fl.XPredictor(network), interpolant, two_time=True)

    if method.name != "v1":
        network = student_network(teacher, config, vocab_size, zero_output=False)

        def objective(net: nn.Module) -> Loss:
            return one_network_loss(
                method.name, student_map(net), teacher_predictor, method.teacher_steps
            )

        return [Stage(method.name, network, None, objective)]

    velocity = fl.XPredVelocity(teacher_predictor, interpolant)
    correction = student_network(teacher, config, vocab_size, zero_output=True)
    weighting = fl.LearnedTimeWeighting().to(teacher.output.weight.device)
    frozen_taylor = fl.TaylorMap(velocity, correction)  # stage 2 reads stage 1's EMA weights

    def taylor_objective(net: nn.Module) -> Loss:
        taylor = fl.TaylorMap(velocity, net)
        return lambda tokens, x_t, t, s: weighting(
            distill.taylor_semigroup_loss(taylor, x_t, t, s), t
        )

    def regression_objective(net: nn.Module) -> Loss:
        return lambda tokens, x_t, t, s: distill.map_regression_loss(
            student_map(net), frozen_taylor, x_t, t, s
        )

    student = student_network(teacher, config, vocab_size, zero_output=False)
    return [
        Stage("v1-stage1", correction, weighting, taylor_objective),
        Stage("v1-stage2", student, None, regression_objective),
    ]


def train_stage(
    stage: Stage,
    config: Config,
    method: Method,
    options: Options,
    task: Task,
    interpolant: fl.Interpolant,
    processes: Distributed,
    saved: dict[str, Any] | None,
) -> dict[str, Any]:
    """Distil ``stage.network`` for ``config.steps`` steps; return the logged losses."""
    parameters = list(stage.network.parameters())
    if stage.extra is not None:
        parameters += list(stage.extra.parameters())
    optimizer = torch.optim.AdamW(parameters, lr=config.lr, weight_decay=0.0)
    ema = make_ema(stage.network, config.ema_decay)
    start = 0
    if saved is not None and stage.name in saved["stages"]:
        stage_state = saved["stages"][stage.name]
        start = restore_training_state(stage_state, stage.network, ema, optimizer)
        if stage.extra is not None:
            stage.extra.load_state_dict(stage_state["extra"])
    loss_of = stage.loss(processes.wrap(stage.network))
    boundary_prob = BOUNDARY_PROB.get(stage.name, DEFAULT_BOUNDARY_PROB)
    if method.boundary_prob is not None:
        boundary_prob = method.boundary_prob
    min_gap = MIN_GAP.get(stage.name, DEFAULT_MIN_GAP)
    train_loss: dict[str, float] = {}
    stage.network.train()
    started = time.perf_counter()
    progress = tqdm(
        range(start, config.steps),
        desc=stage.name,
        initial=start,
        total=config.steps,
        disable=not processes.is_main,
    )
    for step in progress:
        generator = seeded_generator(config.seed, stage.name, step)
        torch.manual_seed(derived_seed(config.seed, "dropout", step, processes.rank))
        tokens, noise = draw_training_data(task, config.batch_size, generator, processes)
        pair = fl.time_pairs(
            len(tokens),
            boundary_prob=boundary_prob,
            min_gap=min_gap,
            rank=processes.rank,
            world_size=processes.world_size,
            generator=generator,
            device=processes.device,
        )
        x_t = interpolant.sample(noise, fl.one_hot(tokens, task.vocab_size), pair.t)
        with torch.autocast(processes.device.type, dtype=torch.bfloat16, enabled=config.bf16):
            loss = fl.masked_mean(loss_of(tokens, x_t, pair.t, pair.s))

        mean_loss = optimizer_step(
            loss, optimizer, parameters, ema, stage.network, step, config, processes
        )

        done = step + 1
        if done % config.log_every == 0:
            train_loss[str(done)] = mean_loss.item()
            progress.set_postfix(loss=f"{train_loss[str(done)]:.4f}")
        if processes.is_main and options.out is not None:
            if done % config.checkpoint_every == 0 or done == config.steps:
                state = training_state(done, stage.network, ema, optimizer, task.tokenizer, config)
                if stage.extra is not None:  # e.g. v1's learned time weighting
                    state["extra"] = stage.extra.state_dict()
                stages = {} if saved is None else dict(saved["stages"])
                saved = {"stages": stages | {stage.name: state}, "method": asdict(method)}
                save_checkpoint(options.out, saved)
    progress.close()
    stage.network.load_state_dict(ema.module.state_dict())  # sample (and stage 2) from the EMA
    stage.network.eval()
    seconds = time.perf_counter() - started
    if processes.is_main and config.steps > start:
        rate = (config.steps - start) / seconds
        print(f"{stage.name}: {config.steps - start} steps in {seconds:.1f} s ({rate:.2f} steps/s)")
    return {"seconds": seconds, "train_loss": train_loss, "checkpoint": saved}


def load_teacher(path: Path, device: torch.device) -> tuple[DiT, Config, dict[str, Any]]:
    """The FLM's EMA network, frozen, its settings and its checkpoint."""
    if not path.is_file():
        raise FileNotFoundError(
            f"--teacher: no FLM checkpoint at {path}; train one with examples/flm.py --out {path}"
        )
    checkpoint = load_checkpoint(path)
    if "ema" not in checkpoint:
        raise ValueError(
            f"--teacher: {path} is not an FLM checkpoint (examples/flm.py --out writes those)"
        )
    config = Config(**checkpoint["config"])
    vocab_size = CharTokenizer.from_state_dict(checkpoint["tokenizer"]).vocab_size
    teacher = build_backbone(config, vocab_size)
    ema = make_ema(teacher, config.ema_decay)
    ema.load_state_dict(checkpoint["ema"])
    network = ema.module.to(device).eval().requires_grad_(False)
    return network, config, checkpoint


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the example; return (and with ``--json`` write) the final metrics."""
    parser = command_line_parser(__doc__, DEFAULT_THREADS)
    parser.add_argument("--teacher", type=Path, required=True, help="an FLM checkpoint")
    parser.add_argument("--method", choices=METHODS, default="v2")
    parser.add_argument("--boundary-prob", type=float, default=None, help="P(jump is (0, 1))")
    parser.add_argument("--teacher-steps", type=int, default=8, help="regression's teacher")
    options, given = parse_command_line(parser, argv)
    method = Method(
        name=given.pop("method"),
        teacher=str(given.pop("teacher")),
        boundary_prob=given.pop("boundary_prob"),
        teacher_steps=given.pop("teacher_steps"),
    )
    torch.set_num_threads(options.threads)
    saved = None
    if options.out is not None and options.resume and options.out.exists():
        saved = load_checkpoint(options.out)

    with distributed() as processes:
        teacher, teacher_config, teacher_checkpoint = load_teacher(
            Path(method.teacher), processes.device
        )
        preset = PRESETS[teacher_config.task] | (SMOKE if options.smoke else {})
        config = replace(teacher_config, **{"sample_steps": (1, 2, 4)} | preset | given)
        task = build_task(config)
        check_vocabulary(teacher_checkpoint, task.tokenizer, Path(method.teacher))
        interpolant = build_interpolant(config, task.vocab_size).to(processes.device)
        torch.manual_seed(config.seed)
        stages = build_stages(method, config, teacher, interpolant, task.vocab_size)
        if processes.is_main:
            print(
                describe_run(
                    f"flowlm FMLM ({method.name})",
                    config,
                    options,
                    processes,
                    task,
                    stages[-1].network,
                )
            )
            print(f"teacher: {method.teacher} (FLM, {teacher_checkpoint['step']} steps)")

        result: dict[str, Any] = {"task": config.task, "method": method.name, "train_steps": 0}
        for stage in stages:
            report = train_stage(
                stage, config, method, options, task, interpolant, processes, saved
            )
            saved = report.pop("checkpoint")
            result[stage.name] = report
            result["train_steps"] += config.steps
        if processes.is_main:
            student = fl.XPredMap(fl.XPredictor(stages[-1].network), interpolant, two_time=True)
            label = f"FMLM {method.name}"
            result["steps"] = sample_report(student, label, task, config, processes.device)
            if method.name == "v1":
                taylor = fl.TaylorMap(
                    fl.XPredVelocity(fl.XPredictor(teacher), interpolant), stages[0].network
                )
                label = "v1 stage-1 Taylor map"
                result["stage1_steps"] = sample_report(
                    taylor, label, task, config, processes.device
                )
            teacher_map = fl.XPredMap(fl.XPredictor(teacher), interpolant)
            teacher_config = replace(config, sample_steps=TEACHER_STEPS)
            result["teacher_steps"] = sample_report(
                teacher_map, "teacher FLM euler", task, teacher_config, processes.device
            )
            if options.json is not None:
                write_json(options.json, result)
        return processes.share(result)


if __name__ == "__main__":
    main()
