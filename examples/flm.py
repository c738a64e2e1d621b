"""FLM, the flow language model: the reference assembly of flowlm's components.

Trains x-prediction with cross-entropy on a linear noise-to-one-hot path run on the
decoding-accuracy clock (METHOD.md §3), then samples with the Euler sampler (§4) at a few
step counts and reports NFE, entropy and the task's quality measure.

    python examples/flm.py                          # the King James Bible, ~8 min on 2 cores
    python examples/flm.py --task alpha-repeat      # 26 letters repeated 8 times: valid rate
    python examples/flm.py --task markov            # a Markov chain: exact perplexity of samples
    python examples/flm.py --text my_books/         # your own .txt file or folder
    python examples/flm.py --smoke                  # seconds, for CI
    python examples/flm.py --out flm.pt --json flm.json --resume   # continue after a crash
    python examples/flm.py --out flm.pt --sample-only --sample-steps 1 4 16 --solver heun
    torchrun --nproc_per_node=2 examples/flm.py     # the same run on 2 processes (DDP)

``--batch-size`` is the global batch: N processes train on exactly the batches of one process.
Flags override the task's preset; with ``--resume`` or ``--sample-only`` they override the
settings saved in the checkpoint. Checkpoints hold the model, its EMA, the optimizer, the step,
the vocabulary and the settings, and are replaced atomically.
"""

import time
from dataclasses import replace
from typing import Any

import torch
from common import (
    SHOWN_SAMPLES,
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
    sample_noise,
    sample_report,
    save_checkpoint,
    seeded_generator,
    training_state,
    validation_loss,
    write_json,
)
from torch.optim.swa_utils import AveragedModel
from tqdm import tqdm

import flowlm as fl
from flowlm.backbones import DiT

DEFAULT_THREADS = 1
"""Measured on a 2-core CPU, corpus preset, 20 training steps: 1 thread 5.1 steps/s and
2 threads 2.1 steps/s at load average 0.8-1.5; with other jobs running (load 2-4), 1 thread
3.3-5.2 and 2 threads 0.3-0.9 steps/s. Under torchrun, each process takes one core."""

# Corpus: 2,500 steps take about 8 min at 5.1 steps/s (12.5 min measured at load average 3);
# samples go from letter soup (step 500) to words such as "the", "and", "they" (step 2,500).
# Alpha-repeat: valid rate 0.97-0.99 at 8 Euler steps for seeds 0-2, in 20-30 s of training.
# Markov: exact perplexity of 8-step samples about 15 against 8.7 for the data, in about 2 min.

PRESETS: dict[str, dict[str, Any]] = {
    "corpus": {
        "length": 64,
        "dim": 128,
        "depth": 4,
        "heads": 4,
        "steps": 2500,
        "batch_size": 32,
        "ema_decay": 0.998,
        "samples": 32,
    },
    "alpha-repeat": {
        "length": 8,
        "dim": 64,
        "depth": 2,
        "heads": 2,
        "steps": 800,
        "batch_size": 64,
        "ema_decay": 0.99,
        "eval_every": 200,
        "sample_every": 400,
        "samples": 256,
    },
    "markov": {
        "length": 32,
        "dim": 64,
        "depth": 2,
        "heads": 2,
        "steps": 1500,
        "batch_size": 64,
        "ema_decay": 0.995,
        "samples": 128,
    },
}
SMOKE: dict[str, Any] = {
    "dim": 32,
    "depth": 1,
    "heads": 2,
    "steps": 8,
    "batch_size": 8,
    "warmup": 2,
    "samples": 8,
    "log_every": 1,
    "eval_every": 4,
    "sample_every": 4,
    "checkpoint_every": 4,
}


def make_sampler(solver: str, predictor: fl.XPredictor, interpolant: fl.Interpolant) -> fl.FlowMap:
    """FLM's Euler sampler, or a second-order ODE solver on the x-prediction velocity."""
    if solver == "euler":
        return fl.XPredMap(predictor, interpolant)  # x + (γ_s - γ_t)(x̂₁ - x)/(1 - γ_t)
    velocity = fl.XPredVelocity(predictor, interpolant)
    return fl.Midpoint(velocity) if solver == "midpoint" else fl.Heun(velocity)


def train(
    config: Config,
    options: Options,
    task: Task,
    backbone: DiT,
    interpolant: fl.Interpolant,
    ema: AveragedModel,
    optimizer: torch.optim.Optimizer,
    start: int,
    processes: Distributed,
) -> dict[str, Any]:
    """Train from step ``start`` to ``config.steps``; return the logged losses."""
    predictor = fl.XPredictor(processes.wrap(backbone))  # DDP averages the gradients
    averaged = fl.XPredictor(ema.module)  # validation and previews use the EMA weights
    validation_tokens = task.validation.to(processes.device)
    parameters = list(backbone.parameters())
    train_loss: dict[str, float] = {}
    validation: dict[str, float] = {}
    backbone.train()
    started = time.perf_counter()
    progress = tqdm(
        range(start, config.steps),
        desc="FLM",
        initial=start,
        total=config.steps,
        disable=not processes.is_main,
    )
    for step in progress:
        # Every random draw depends on (seed, step) only: identical on every process and on
        # resumption. Each process keeps its rows of the global batch and its strata of times.
        generator = seeded_generator(config.seed, "train", step)
        torch.manual_seed(derived_seed(config.seed, "dropout", step, processes.rank))
        tokens, noise = draw_training_data(task, config.batch_size, generator, processes)
        t = fl.uniform_times(
            len(tokens),
            rank=processes.rank,
            world_size=processes.world_size,
            generator=generator,
            device=processes.device,
        )
        x_t = interpolant.sample(noise, fl.one_hot(tokens, task.vocab_size), t)
        with torch.autocast(processes.device.type, dtype=torch.bfloat16, enabled=config.bf16):
            loss = fl.masked_mean(fl.cross_entropy(predictor.logits(x_t, t), tokens))

        mean_loss = optimizer_step(
            loss, optimizer, parameters, ema, backbone, step, config, processes
        )

        done = step + 1
        last = done == config.steps
        if done % config.log_every == 0:
            train_loss[str(done)] = mean_loss.item()
            progress.set_postfix(loss=f"{train_loss[str(done)]:.4f}")
        if not processes.is_main:
            continue
        if done % config.eval_every == 0 or last:
            validation[str(done)] = validation_loss(
                averaged.logits, interpolant, validation_tokens, task.vocab_size, config.seed
            )
            tqdm.write(f"step {done}: validation cross-entropy (EMA) {validation[str(done)]:.4f}")
        if done % config.sample_every == 0 and not last:
            n_steps = max(config.sample_steps)
            start_noise = sample_noise(config, task, SHOWN_SAMPLES, processes.device)
            sampler = make_sampler(config.solver, averaged, interpolant)
            samples = fl.decode(fl.rollout(sampler, start_noise, fl.time_grid(n_steps)).x)
            tqdm.write(f"step {done}: samples (EMA, {n_steps} {config.solver} steps)")
            for text in task.decode(samples.cpu()):
                tqdm.write(f"    {text!r}")
        if options.out is not None and (done % config.checkpoint_every == 0 or last):
            state = training_state(done, backbone, ema, optimizer, task.tokenizer, config)
            save_checkpoint(options.out, state)
    progress.close()
    seconds = time.perf_counter() - started
    if processes.is_main and config.steps > start:
        rate = (config.steps - start) / seconds
        print(f"trained steps {start + 1}..{config.steps} in {seconds:.1f} s ({rate:.2f} steps/s)")
    return {"train_seconds": seconds, "train_loss": train_loss, "validation": validation}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the example; return (and with ``--json`` write) the final metrics."""
    options, given = parse_command_line(command_line_parser(__doc__, DEFAULT_THREADS), argv)
    torch.set_num_threads(options.threads)
    saved = None
    if options.out is not None and (options.resume or options.sample_only):
        if options.out.exists():
            saved = load_checkpoint(options.out)
        elif options.sample_only:
            raise FileNotFoundError(f"--sample-only: no checkpoint at {options.out}")
    if saved is None:
        task_name = given.get("task", Config.task)
        base = Config(task=task_name, **PRESETS[task_name] | (SMOKE if options.smoke else {}))
    else:
        base = Config(**saved["config"])
    config = replace(base, **given)

    with distributed() as processes:
        task = build_task(config)
        if saved is not None:
            check_vocabulary(saved, task.tokenizer, options.out)
        torch.manual_seed(config.seed)
        backbone = build_backbone(config, task.vocab_size).to(processes.device)
        interpolant = build_interpolant(config, task.vocab_size).to(processes.device)
        ema = make_ema(backbone, config.ema_decay)
        optimizer = torch.optim.AdamW(backbone.parameters(), lr=config.lr, weight_decay=0.0)
        step = 0 if saved is None else restore_training_state(saved, backbone, ema, optimizer)
        if processes.is_main:
            print(describe_run("flowlm FLM", config, options, processes, task, backbone))
            if saved is not None:
                print(f"restored step {step} from {options.out}")

        result: dict[str, Any] = {"task": config.task, "train_steps": step}
        if not options.sample_only:
            result |= train(
                config, options, task, backbone, interpolant, ema, optimizer, step, processes
            )
            result["train_steps"] = max(step, config.steps)
        if processes.is_main:
            sampler = make_sampler(config.solver, fl.XPredictor(ema.module), interpolant)
            result["solver"] = config.solver
            label = f"FLM {config.solver}"
            result["steps"] = sample_report(sampler, label, task, config, processes.device)
            if options.json is not None:
                write_json(options.json, result)
        return processes.share(result)


if __name__ == "__main__":
    main()
