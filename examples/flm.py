"""FLM, the flow language model: train x-prediction on the decoding-accuracy clock, then sample.

Trains a DiT to predict the clean one-hot sequence from a point of the linear noise-to-data
path, with cross-entropy, on the decoding-accuracy clock (paper §3), then samples with the
Euler sampler (§4) at a few step counts and reports NFE, entropy and the task's measures.

    python examples/flm.py                          # the King James Bible (main.py's FLM)
    python examples/flm.py --task alpha-repeat      # 26 letters repeated 8 times: valid rate
    python examples/flm.py --task markov            # a Markov chain: exact perplexity of samples
    python examples/flm.py --text my_books/         # your own .txt file or folder
    python examples/flm.py --tokenizer bpe:2048     # or PATH/tokenizer.json, hf:bert-base-uncased
    python examples/flm.py --dataset notes.jsonl --lines   # a `datasets` name or file, by row
    torchrun --nproc_per_node=8 examples/flm.py --preset lm1b --out lm1b.pt   # the paper's
        # LM1B run (--preset owt: OpenWebText); docs: the "Reproducing the paper" guide
    python examples/flm.py --smoke                  # seconds, for CI
    python examples/flm.py --out flm.pt --json flm.json --resume   # continue after a crash
    python examples/flm.py --out flm.pt --sample-only --sample-steps 1 4 16 --solver heun
    python examples/flm.py --context prefix --out flm.pt   # also learn to continue prompts
    python examples/flm.py --out flm.pt --sample-only --prompt "And God said"
    python examples/flm.py --out flm.pt --sample-only --infill "In the ____ God created"
    python examples/flm.py --out flm.pt --sample-only --prompt "And" --guidance 1 --block 8
    python examples/flm.py --self-condition         # the DiT also reads its previous estimate
    python examples/flm.py --out flm.pt --sample-only --self-condition-guidance 3   # z + 3 (z - z(0))
    python examples/flm.py --self-condition --context prefix --out sc.pt   # then --prompt, --solver heun
    python examples/flm.py --soft-cap 30            # logits 30 tanh(z / 30), training and sampling
    torchrun --nproc_per_node=2 examples/flm.py     # DDP: --batch-size is the global batch

Randomness: step k of process r draws its own rows (sequences and noise, the noise on the
device) from generators seeded by (seed, k, r); the times are stratified over the global batch
from a generator seeded by (seed, k). So a resumed run replays the uninterrupted one exactly,
and N processes train on a global batch with the same distribution as one process's (i.i.d.
rows, the same strata of times), not on the same numbers (so are self-conditioning's coins).
Self-conditioning samples on the state [x, x̂₁'] (its Euler step, or --solver's with the
estimate threaded through the stages), prompts held one-hot in both halves; validation reads its
two-call estimate. Flags override the task's preset, or
with --resume / --sample-only the settings saved in the checkpoint. Checkpoints (model, EMA,
optimizer, step, the tokenizer's state, settings) are replaced atomically and carry a
checksum; --resume and --sample-only reuse the saved tokenizer (no retraining, no download).
"""

import json
import time
from argparse import Namespace, RawDescriptionHelpFormatter
from dataclasses import asdict, dataclass, replace
from functools import partial
from typing import Any

import torch
from tqdm import tqdm

import flowlm as fl
from flowlm import train
from flowlm.backbones import DiT
from flowlm.data import tokenizer_from_state
from flowlm.data.tasks import TASKS, Task, TaskSettings, task_of

# ---------------------------------------------------------------------------- settings
# fmt: off
PRESETS: dict[str, dict[str, Any]] = {
    "corpus": dict(length=64, dim=128, depth=4, heads=4, steps=2500),
    "alpha-repeat": dict(length=8, dim=128, depth=2, heads=4, steps=3000, batch_size=64,
                         lr=1e-3, schedule="cosine", ema_decay=0.99, eval_every=200,
                         samples=256),  # examples/fmlm.py's alpha-repeat teacher; depth 2:
    # results/alpha_repeat.md (as good as depth 4 in 2-8 steps for 55 % of its CPU time, and
    # its student costs about two thirds as much per step)
    "markov": dict(length=32, dim=64, depth=2, heads=2, steps=1500, batch_size=64,
                   ema_decay=0.995, samples=128),
    "words": dict(length=8, dim=64, depth=2, heads=2, steps=1500, batch_size=128, lr=3e-3,
                  warmup=50, ema_decay=0.995, samples=256),  # lr: docs/guides/study.md
}
SMOKE = dict(dim=32, depth=1, heads=2, steps=8, batch_size=8, warmup=2, samples=8, log_every=1,
             eval_every=4, sample_every=4, checkpoint_every=4)
PAPER_PRESETS = train.FLM_PAPER_PRESETS  # the paper's LM1B and OpenWebText runs (--preset)
PAPER_SMOKE = dict(limit=400, bf16=False)  # --smoke of a paper preset: 400 rows, fp32 on CPU
# fmt: on
CHOICES = {
    "task": TASKS,
    "preset": tuple(PAPER_PRESETS),
    "clock": ("token-accuracy", "identity"),
    "schedule": ("constant", "cosine"),
    "solver": ("euler", "midpoint", "heun"),
    "context": ("none", *train.TRAINING_CONTEXTS),  # prefix, spans, bernoulli
}
MODEL = ("task", "text", "preset", "tokenizer", "lines", "dataset", "length", "dim", "depth",
         "heads", "clock", "self_condition", "soft_cap")  # fmt: skip
"""What a checkpoint's network is: flags that contradict it are refused on --resume."""
SHOWN_SAMPLES = 3
VALIDATION_TIMES = (0.1, 0.3, 0.5, 0.7, 0.9)


@dataclass(frozen=True)
class Config(TaskSettings):  # --task, --text, --tokenizer, --dataset, --length, ...
    """Everything that defines a run; saved in its checkpoints and restored on --resume."""

    preset: str | None = None  # a paper run (lm1b, owt): its model, data and optimizer
    dim: int = 128  # DiT width, blocks and heads
    depth: int = 4
    heads: int = 4
    dropout: float = 0.0
    clock: str = "token-accuracy"  # the time reparameterization (identity: an ablation)
    self_condition: bool = False  # the DiT also reads its previous estimate x̂₁' (half the rows)
    self_condition_guidance: float | None = None  # sampling: z(x̂₁') + W (z(x̂₁') - z(0))
    soft_cap: float | None = None  # logits C tanh(z / C), in training and sampling
    steps: int = 1000
    batch_size: int = 32  # global: split over the processes
    lr: float = 3e-4
    beta2: float = 0.999  # AdamW's second-moment decay
    warmup: int = 100
    schedule: str = "constant"
    grad_clip: float = 1.0
    ema_decay: float = 0.998
    bf16: bool = False  # bfloat16 autocast for training; sampling stays fp32
    seed: int = 0
    log_every: int = 10
    eval_every: int = 250
    sample_every: int = 500
    checkpoint_every: int = 500
    sample_steps: tuple[int, ...] = (1, 2, 4, 8)
    solver: str = "euler"
    context: str = "none"  # training contexts (known tokens at time 1): prefix, spans, bernoulli
    p_uncond: float = 0.1  # with a context: rows trained with none (the unconditional model)
    samples: int = 32  # per step count in the final report

    def check(self, world_size: int) -> None:
        """Raise ValueError naming the flag of the first setting that cannot work."""
        positive = "length dim depth heads steps batch_size samples log_every eval_every sample_every checkpoint_every"
        train.check_settings(self, world_size, positive.split())  # and --lr, --p-uncond, ...
        if self.dim % self.heads or (self.dim // self.heads) % 2:
            raise ValueError(
                f"--dim / --heads must be an even number, got {self.dim} / {self.heads}"
            )


def parse_command_line(argv: list[str] | None) -> tuple[Namespace, dict[str, Any]]:
    """The invocation's options, and the run settings given on the command line (only those)."""
    parser = train.ArgumentParser(description=__doc__, formatter_class=RawDescriptionHelpFormatter)
    train.add_run_flags(parser)  # --out, --resume, --sample-only, --json, --smoke, --prompt, ...
    train.add_settings(parser, Config, CHOICES)  # --task, --length, ...: override the preset
    given = vars(parser.parse_args(argv))
    return train.run_flags(given), given  # the flags checked, and the settings given


def settle(options: Namespace, given: dict[str, Any], procs: train.Processes):
    """The run's settings, task and saved state (or None); ValueError on a bad input."""
    saved = train.saved_run(options, kind="flm")  # refuses damaged files and smoke/real mixes
    if saved is None:
        name, paper = given.get("task", Config.task), given.get("preset")
        preset = PRESETS[name] | (PAPER_PRESETS[paper] if paper else {})
        preset |= (SMOKE | (PAPER_SMOKE if paper else {})) if options.smoke else {}
        config = replace(Config(task=name, **preset), **given)
    else:
        advice = "drop it or give another --out"
        saved_config = asdict(Config()) | saved["config"]  # a checkpoint older than a setting
        train.check_unchanged(given, saved_config, MODEL, "the checkpoint's", advice)
        sample_steps = tuple(saved_config["sample_steps"])
        config = replace(Config(**saved_config | {"sample_steps": sample_steps}), **given)
    config.check(procs.world_size)
    task = task_of(config, None if saved is None else tokenizer_from_state(saved["tokenizer"]))
    rows = max(config.batch_size // procs.world_size, config.samples)
    needed = train.transformer_step_bytes(
        rows, config.length, task.vocab_size, config.dim, config.depth, config.heads
    )
    train.require_memory(needed, procs.device, f"this configuration ({config})")
    return config, task, saved


# ---------------------------------------------------------------------------- data and samples
def draw_batch(task: Task, config: Config, step: int, procs: train.Processes):
    """This process's rows of step ``step``'s batch: sequences, the noise's generator, times.

    The generator is on the device: ``interpolant.noised(tokens, t, ..., generator=...)``
    draws the noise there, straight into x_t (after any context has set the times).
    """
    rows, device, rank = config.batch_size // procs.world_size, procs.device, procs.rank
    tokens = task.draw(rows, train.seeded_generator(config.seed, "data", step, rank)).to(device)
    mask = task.mask(tokens)  # padding does not count (--lines)
    noise_generator = train.seeded_generator(config.seed, "noise", step, rank, device=device)
    strata = train.seeded_generator(config.seed, "times", step)  # one for the global batch
    t = fl.uniform_times(rows, rank=rank, world_size=procs.world_size, generator=strata)
    return tokens, mask, noise_generator, t.to(device)


def make_sampler(
    config: Config, network: torch.nn.Module, interpolant: fl.Interpolant
) -> fl.FlowMap:
    """FLM's Euler sampler, or a second-order ODE solver (self-conditioned: on [x, x̂₁'])."""
    rule = {"midpoint": fl.Midpoint, "heun": fl.Heun}.get(config.solver)  # None: Euler
    if config.self_condition:  # each call reads the x̂₁ of the call before, at no extra call
        guidance = config.self_condition_guidance
        return fl.SelfConditionedMap(network, interpolant, guidance=guidance, solver=rule)
    predictor = fl.XPredictor(network)
    if rule is None:
        return fl.XPredMap(predictor, interpolant)  # x + (γ_s - γ_t)(x̂₁ - x)/(1 - γ_t)
    return rule(fl.XPredVelocity(predictor, interpolant))


def sample(flow_map: fl.FlowMap, n_steps: int, count: int, task: Task, config: Config,
           device: torch.device, context: fl.Context | None = None, block: int | None = None,
           ) -> fl.Trajectory:  # fmt: skip
    """``count`` samples in ``n_steps`` steps, from the same starting noise at every call.

    ``context``: known tokens held at time 1; ``block``: generate blocks of that many
    positions in order, after the known prefix (one rollout per block).
    """
    generator = train.seeded_generator(config.seed, "sample", device=device)
    noise = torch.randn((count, task.length, task.vocab_size), generator=generator, device=device)
    return train.sample_rollout(flow_map, noise, n_steps, context, block)  # self-conditioned too


def sample_report(flow_map: fl.FlowMap, label: str, task: Task, config: Config, device: torch.device,
                  context: fl.Context | None = None, block: int | None = None):  # fmt: skip
    """Per step count: NFE, mean entropy, the task's measures and every decoded sample."""
    report: dict[str, dict[str, Any]] = {}
    for n_steps in config.sample_steps:
        started = time.perf_counter()
        trajectory = sample(flow_map, n_steps, config.samples, task, config, device, context, block)
        seconds, tokens = time.perf_counter() - started, fl.decode(trajectory.x)
        where = f"{n_steps} step(s), {label}"  # NFE, entropy, the task's measures, the texts:
        report[str(n_steps)] = train.sample_measures(task, tokens, trajectory.nfe, where, seconds)
    return report


@torch.no_grad()
def validation_loss(predictor: fl.XPredictor, interpolant: fl.Interpolant, task: Task,
                    config: Config, device: torch.device) -> float:  # fmt: skip
    """Cross-entropy on fixed sequences and noise, averaged over VALIDATION_TIMES (not a bound)."""
    tokens = task.validation.to(device)
    losses = []
    for i, time_value in enumerate(VALIDATION_TIMES):
        generator = train.seeded_generator(config.seed, "validation", i, device=device)
        t = torch.full((len(tokens),), time_value, device=device)
        x_t = interpolant.noised(tokens, t, task.vocab_size, generator=generator)
        logits = predictor.logits(x_t, t)
        losses.append(fl.masked_mean(fl.cross_entropy(logits, tokens), task.mask(tokens)))
    return torch.stack(losses).mean().item()


# ---------------------------------------------------------------------------- the run
def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Train (or resume, or only sample) and return (with --json also write) the metrics."""
    options, given = parse_command_line(argv)
    torch.set_num_threads(options.threads)
    with train.processes() as procs:
        try:
            config, task, saved = settle(options, given, procs)
        except (ValueError, OSError, ImportError) as error:  # one line: bad data or tokenizer
            train.fail(str(error))
        if procs.is_main and options.out is not None:
            for stale in train.remove_partial_files(options.out):
                print(f"removed {stale}, left by an interrupted checkpoint write")
        device, vocab = procs.device, task.vocab_size
        encode = task.tokenizer.encode  # --prompt / --infill: checked before training
        prompt = train.template_context(options, encode, task.length, config.samples, device)
        torch.manual_seed(config.seed)  # the same initial weights on every process
        shape = (config.dim, config.depth, config.heads)  # width, blocks, heads
        inputs = dict(dropout=config.dropout, self_conditioning=config.self_condition)
        backbone = DiT(vocab, *shape, **inputs).to(device)
        clock = fl.Identity() if config.clock == "identity" else fl.TokenAccuracy(vocab)
        interpolant = fl.LinearInterpolant(reparam=clock).to(device)
        ema = train.EMA(backbone, config.ema_decay)  # validation, previews and samples use the EMA
        betas = (0.9, config.beta2)
        optimizer = torch.optim.AdamW(
            backbone.parameters(), lr=config.lr, betas=betas, weight_decay=0.0
        )
        start = 0 if saved is None else saved["step"]
        if saved is not None:
            for name, part in dict(model=backbone, ema=ema, optimizer=optimizer).items():
                part.load_state_dict(saved[name])
        if procs.is_main:
            parameters = sum(p.numel() for p in backbone.parameters())
            print(
                f"flowlm FLM: {task.description}\n{procs.world_size} process(es) on {device}, {parameters:,} parameters, {config}"
            )
            print(f"restored step {start} from {options.out}" if saved else "new run")

        result: dict[str, Any] = {"task": config.task, "train_steps": start}
        if not options.sample_only:
            cap = config.soft_cap  # None: the logits as they are
            network = train.soft_capped(procs.wrap(backbone), cap)  # DDP averages the gradients
            predictor, averaged = fl.XPredictor(network), train.soft_capped(ema.module, cap)
            own = fl.WithOwnEstimate(averaged) if config.self_condition else averaged
            validated = fl.XPredictor(own)  # self-conditioned: its two-call estimate
            train_loss, validation = {}, {}
            schedule = partial(train.learning_rate, peak=config.lr, warmup=config.warmup,
                               total=config.steps, schedule=config.schedule)  # fmt: skip
            backbone.train()
            started = time.perf_counter()
            todo = range(start, config.steps)
            draw_context = train.TRAINING_CONTEXTS.get(config.context)  # None: --context none
            progress = tqdm(todo, "FLM", initial=start, disable=not procs.is_main)
            for step in progress:
                seed, rank = config.seed, procs.rank
                torch.manual_seed(train.derived_seed(seed, "dropout", step, rank))
                tokens, mask, noise_generator, t = draw_batch(task, config, step, procs)
                if draw_context is not None:  # known tokens at time 1, the loss on the others
                    generator = train.seeded_generator(seed, "context", step, rank, device=device)
                    known = draw_context(tokens, p_uncond=config.p_uncond, generator=generator)
                    t = known.times(t)
                    mask = known.unknown if mask is None else mask & known.unknown
                x_t = interpolant.noised(tokens, t, vocab, generator=noise_generator)
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=config.bf16):
                    if config.self_condition:  # half the rows read sg(x̂₁(x_t, t, 0)): +1 call
                        coins = train.seeded_generator(seed, "coins", step, rank, device=device)
                        logits = fl.self_conditioned_logits(network, x_t, t, generator=coins)
                    else:
                        logits = predictor.logits(x_t, t)
                    loss = fl.masked_mean(fl.cross_entropy(logits, tokens), mask)
                lr = schedule(step)
                train.optimizer_step(
                    optimizer, loss, [*backbone.parameters()], lr, config.grad_clip
                )
                ema.update(backbone)

                # Host reads only from here on, at log, eval, sample and checkpoint steps.
                done = step + 1
                last = done == config.steps
                every = config.checkpoint_every
                checkpoint = options.out is not None and (done % every == 0 or last)
                if done % config.log_every == 0 or checkpoint or last:
                    value = train.finite_loss(procs, loss, backbone, checkpoint, f"step {done}")
                    train_loss[str(done)] = value
                    progress.set_postfix(loss=f"{value:.4f}")
                if not procs.is_main:
                    continue
                if done % config.eval_every == 0 or last:
                    value = validation_loss(validated, interpolant, task, config, device)
                    validation[str(done)] = value
                    tqdm.write(f"step {done}: validation cross-entropy (EMA) {value:.4f}")
                if done % config.sample_every == 0 and not last:
                    sampler = make_sampler(config, averaged, interpolant)
                    n_steps = max(config.sample_steps)
                    trajectory = sample(sampler, n_steps, SHOWN_SAMPLES, task, config, device)
                    texts = task.decode(fl.decode(trajectory.x).cpu())
                    tqdm.write(
                        f"step {done}: samples (EMA)" + "".join(f"\n    {t!r}" for t in texts)
                    )
                if checkpoint:
                    state = dict(kind="flm", smoke=options.smoke, step=done, config=asdict(config))
                    state |= dict(tokenizer=task.tokenizer.state(), model=backbone.state_dict())
                    state |= dict(ema=ema.state_dict(), optimizer=optimizer.state_dict())
                    train.save_checkpoint(options.out, state)
            progress.close()
            seconds = time.perf_counter() - started
            if procs.is_main and config.steps > start:
                print(f"trained steps {start + 1}..{config.steps} in {seconds:.1f} s")
            result |= {"train_steps": max(start, config.steps), "train_seconds": seconds}
            result |= {"train_loss": train_loss, "validation": validation}
        if procs.is_main:
            network = train.soft_capped(ema.module, config.soft_cap)
            if options.guidance is not None:  # z_c + w (z_c - z_u), one batched call per step
                network = fl.Guidance(network, options.guidance)
            sampler = make_sampler(config, network, interpolant)
            result |= {"solver": config.solver} | train.conditioning_flags(options)  # --prompt, ...
            result["steps"] = sample_report(
                sampler, f"FLM {config.solver}", task, config, device, prompt, options.block
            )
            if options.json is not None:
                train.atomic_write(options.json, json.dumps(result, indent=2).encode())
        return procs.share(result)


if __name__ == "__main__":
    main()
