"""What makes FLM learn slowly at this scale: one lever at a time, at equal CPU cost.

Every arm is the baseline FLM recipe with one lever changed. Levers: self-conditioning, the
density of the training times (stratified, i.i.d. or logit-normal), the clock (decoding
accuracy or identity), the loss weighting (none or learned), the logit soft-cap, the learning
rate and its schedule, width against depth at (about) equal parameters, and the EMA decay.

Budget: the baseline trains for a fixed number of steps, and an arm for that number divided
by the CPU cost of its step relative to the baseline's, so that every arm does the same CPU
work (self-conditioning's second call or a deeper network buys fewer steps). The relative
costs are medians of short timed bursts of training steps, interleaved across the arms
(`harness.time_interleaved`: thread CPU seconds on one torch thread), measured once per part
and kept in ``cache/study-<part>-costs-<key>.json``; a lever that changes no computation
(learning rate, schedule, EMA decay, seed) costs exactly the baseline's. Unlike training
"until N CPU seconds", this budget does not depend on the machine's load while an arm
trained (load inflates process CPU seconds: the same job took 95 CPU-s at load 2 and 254 at
load 8). MDLM and the autoregressive model get the baseline's budget by the same measured
ratio; FMLM students distil for a fixed number of steps. Every row records the steps and
the process CPU seconds actually spent.

Seeds: the baseline trains at every seed of ``Part.seeds``, and so do the arms named in
``Part.seeded_arms`` and up to ``Part.more_seeded`` other arms whose first seed beats the
baseline's mean by more than the baseline's seed spread (max - min over its seeds). An arm
*moves* FLM at a step count only when its mean is beyond the baseline's mean by more than
that spread. The seed changes the initialization and the batches, not the sampling noise.

Two tasks (`flowlm.data.tasks`):

- ``words``: one word of the King James Bible per sequence (lowercase letters, drawn by
  frequency, L = 8, padded), scored by the fraction of samples that are real words and the
  number of distinct ones, against the data's for as many samples.
- ``corpus``: character-level windows of the King James Bible (L = 32, like
  ``benchmarks/quality.py --preset quick``), scored by the judge's perplexity
  (``benchmarks/judge.py``) and the unigram entropy.

Each part has two sections. ``arms``: every arm's FLM, sampled with the Euler map at 8 and
128 steps; one-step FMLM students (v2: semigroup KL, one stage) of the baseline (at every
seed of ``Part.reference_seeds``) and of the best arms; MDLM (8 and 128 steps, at the
reference seeds) and an autoregressive model. ``trend``: the trend arms' FLM, their FMLM
(distillation steps scaled alike) and MDLM at the multiples ``Part.trend`` of the budget,
which with the ``arms`` section's x1 give the gap to the targets at three budgets.

Usage:
    python benchmarks/study.py --part words --plot docs/assets/study.png
    python benchmarks/study.py --part corpus --section arms --plot docs/assets/study.png
    python benchmarks/study.py --part corpus --section trend --plot docs/assets/study.png
    python benchmarks/study.py --part report --plot docs/assets/study.png   # tables only
    python benchmarks/study.py --quick --out-dir /tmp/study                 # seconds

Sections may run at the same time (two processes; start the second once the first has
written its costs file). Each writes ``<out-dir>/cache/study-<part>-<section>.json`` after
every model (a crash loses at most the model in training) and, at its end, rebuilds
``<out-dir>/study.json`` (every row, the settings, the costs, the seed summaries, the targets
and the machine's load), ``study.md`` (the tables and the verdicts) and the plot from the
sections done so far. Trained models are cached in ``<out-dir>/cache/`` under a hash of
their settings and reused by later runs, and a rerun of a section reuses the rows of the
models it already sampled when only the choice of models (`SELECTION`) changed.
"""

import argparse
import dataclasses
import json
import math
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from itertools import count
from pathlib import Path
from typing import Any

import judge as judge_module
import torch
from autoregressive import build_model, generate
from harness import (
    Sampler,
    TokenObjective,
    TrainingSettings,
    flow_sampler,
    load_average,
    load_corpus,
    machine_context,
    parse_flags,
    print_verdicts,
    seeded_generator,
    settings_key,
    time_interleaved,
    verdict,
    write_results,
)
from matplotlib.figure import Figure
from mdlm import MaskedDiffusion
from quality import Scorer, jump_objective
from torch import Tensor, nn

import flowlm as fl
from flowlm import distill
from flowlm.backbones import CausalTransformer, DiT
from flowlm.data.tasks import build_task
from flowlm.train import EMA

PARTS = ("words", "corpus")
SECTIONS = ("arms", "trend")
SOFT_CAP = 30.0
"""The authors' logit soft-cap, $30\\tanh(z/30)$."""
DISTILL_LR = 5e-4
DISTILL_EMA = 0.99
DISTILL_WARMUP = 20
DISTINCT_SHARE = 0.5
"""The words target: at least this share of the distinct words of as many data samples."""
LOSS_AVERAGE = 0.02
"""Weight of each step's loss in the running average reported for a run."""
COST_NEUTRAL = frozenset({"lr", "warmup", "schedule", "ema_decay", "seed"})
"""Recipe fields that change no computation of a training step: their arms cost exactly the
baseline's."""


# -- recipes and arms -------------------------------------------------------------------------


@dataclass(frozen=True)
class Recipe:
    """An FLM training recipe: the backbone, the optimizer and the levers of the study.

    Attributes:
        dim, depth, heads: the DiT's size.
        batch_size: sequences per step.
        lr, warmup, schedule: AdamW's peak rate, linear warm-up steps, then constant or
            cosine decay to 0 at the run's last step.
        ema_decay: the weights sampled are an EMA of this decay.
        clock: ``token-accuracy`` (FLM's) or ``identity`` (uniform in path time).
        times: training-time density: ``stratified`` uniform, ``iid`` uniform, or
            ``logit-normal`` (sigmoid of a standard normal: mid accuracies).
        weighting: ``none`` or ``learned`` (`flowlm.LearnedTimeWeighting`).
        soft_cap: the logit soft-cap $c$ of $c\\tanh(z/c)$, or ``None``.
        self_conditioning: train and sample with the previous estimate as an input.
        seed: initialization and batches.
    """

    dim: int
    depth: int
    heads: int
    batch_size: int
    lr: float = 1e-3
    warmup: int = 50
    schedule: str = "constant"
    ema_decay: float = 0.995
    clock: str = "token-accuracy"
    times: str = "stratified"
    weighting: str = "none"
    soft_cap: float | None = None
    self_conditioning: bool = False
    seed: int = 0

    def learning_rate(self, step: int, steps: int) -> float:
        """The rate of (0-based) ``step`` of a run of ``steps``: warm-up, then the schedule."""
        if step < self.warmup:
            return self.lr * (step + 1) / self.warmup
        if self.schedule == "constant":
            return self.lr
        done = (step - self.warmup + 1) / max(1, steps - self.warmup)
        return self.lr * 0.5 * (1.0 + math.cos(math.pi * min(done, 1.0)))


@dataclass(frozen=True)
class Arm:
    """The baseline with one lever changed: ``name``, the ``lever`` and the recipe's changes."""

    name: str
    lever: str
    changes: dict[str, Any] = field(default_factory=dict[str, Any])

    @property
    def cost_neutral(self) -> bool:
        """Whether the change leaves every training step's computation as the baseline's."""
        return set(self.changes) <= COST_NEUTRAL


BASELINE = Arm("baseline", "baseline")
LEVER_ARMS = (
    Arm("self-conditioning", "self-conditioning", {"self_conditioning": True}),
    Arm("i.i.d. times", "time density", {"times": "iid"}),
    Arm("logit-normal times", "time density", {"times": "logit-normal"}),
    Arm("identity clock", "clock", {"clock": "identity"}),
    Arm("learned weighting", "loss weighting", {"weighting": "learned"}),
    Arm("soft-cap 30", "soft-cap", {"soft_cap": SOFT_CAP}),
    Arm("lr 3e-3", "learning rate", {"lr": 3e-3}),
    Arm("cosine schedule", "schedule", {"schedule": "cosine"}),
    Arm("EMA 0.999", "EMA", {"ema_decay": 0.999}),
)
WORD_ARMS = (
    BASELINE,
    *LEVER_ARMS,
    Arm("depth 4, width 48", "width vs depth", {"dim": 48, "depth": 4}),
)
CORPUS_ARMS = (
    BASELINE,
    *LEVER_ARMS,
    Arm("depth 6, width 64", "width vs depth", {"dim": 64, "depth": 6}),
)


@dataclass(frozen=True)
class Part:
    """One task of the study and its budgets.

    Attributes:
        task: ``words`` or ``corpus``.
        length: positions per sequence.
        baseline: the recipe every arm changes one lever of.
        arms: the arms (the first is the baseline).
        steps: the baseline's training steps at budget x1 (an arm's: this over its relative
            cost; MDLM's and AR's alike).
        distill_steps: steps of each FMLM distillation at budget x1.
        samples: samples per cell.
        seeds: the baseline's seeds (the first is every arm's).
        seeded_arms: arms trained at every seed whatever their first seed gives.
        more_seeded: at most this many other arms get every seed when their first seed beats
            the baseline by more than its seed spread.
        reference_seeds: seeds of the baseline's FMLM students and of MDLM.
        distilled: best arms distilled besides the baseline (those ahead of it).
        flm_steps, mdlm_steps, fmlm_steps: step counts sampled.
        trend: multiples of the budget besides x1 for the trend.
        trend_arms: the FLM arms (and their FMLM) of the trend.
        cost_repeats: timed bursts per arm when measuring the relative costs.
    """

    task: str
    length: int
    baseline: Recipe
    arms: tuple[Arm, ...]
    steps: int
    distill_steps: int
    samples: int
    seeds: tuple[int, ...] = (0, 1, 2)
    seeded_arms: tuple[str, ...] = ()
    more_seeded: int = 1
    reference_seeds: tuple[int, ...] = (0,)
    distilled: int = 1
    flm_steps: tuple[int, ...] = (8, 128)
    mdlm_steps: tuple[int, ...] = (8, 128)
    fmlm_steps: tuple[int, ...] = (1, 2, 4)
    trend: tuple[float, ...] = (0.5, 2.0)
    trend_arms: tuple[str, ...] = (BASELINE.name,)
    cost_repeats: int = 9


PARTS_OF_RUN: dict[str, Part] = {
    "words": Part(
        task="words",
        length=8,
        baseline=Recipe(dim=64, depth=2, heads=2, batch_size=128),
        arms=WORD_ARMS,
        steps=600,
        distill_steps=200,
        samples=512,
        seeded_arms=("lr 3e-3",),
        more_seeded=1,
        reference_seeds=(0, 1, 2),
        distilled=1,
    ),
    "corpus": Part(
        task="corpus",
        length=32,
        baseline=Recipe(dim=96, depth=3, heads=4, batch_size=32),
        arms=CORPUS_ARMS,
        steps=500,
        distill_steps=170,
        samples=128,
        more_seeded=1,
        distilled=1,
    ),
}
QUICK_PARTS: dict[str, Part] = {
    task: replace(
        PARTS_OF_RUN[task],
        length=8,
        baseline=Recipe(dim=16, depth=1, heads=2, batch_size=8, warmup=2),
        arms=(
            *(arm for arm in PARTS_OF_RUN[task].arms if arm.lever != "width vs depth"),
            Arm("depth 2, width 12", "width vs depth", {"dim": 12, "depth": 2}),
        ),
        steps=6,
        distill_steps=4,
        samples=16,
        seeds=(0, 1),
        more_seeded=1,
        reference_seeds=(0, 1) if task == "words" else (0,),
        distilled=1,
        flm_steps=(2, 8),
        mdlm_steps=(2, 8),
        fmlm_steps=(1,),
        cost_repeats=3,
    )
    for task in PARTS
}


# -- data -------------------------------------------------------------------------------------

Draw = Callable[[int, torch.Generator], fl.Tokens]
Score = Callable[[fl.Tokens], dict[str, float]]


@dataclass(frozen=True)
class Data:
    """A part's training draws, loss mask, scorer and data samples."""

    vocab_size: int
    length: int
    draw: Draw
    mask: Callable[[fl.Tokens], fl.TokenMask | None]
    score: Score
    decode: Callable[[fl.Tokens], list[str]]
    data_samples: fl.Tokens
    judge: dict[str, Any] | None = None


def words_data(part: Part, seed: int) -> Data:
    """The words task; its data row is as many fresh draws as there are samples."""
    task = build_task("words", part.length)
    samples = task.draw(part.samples, seeded_generator(seed, "study-data"))
    return Data(
        task.vocab_size, part.length, task.draw, task.mask, task.quality, task.decode, samples
    )


def corpus_data(part: Part, cache: Path, quick: bool) -> Data:
    """Windows of the training books, scored by the judge; data: the held-out books."""
    corpus = load_corpus()
    settings = judge_module.JUDGES["smoke" if quick else "quick"]
    if settings.length != part.length:
        raise ValueError("the judge must be trained on windows of the samples' length")
    judge = judge_module.load_or_train(settings, corpus, cache)
    report: dict[str, Any] = judge_module.held_out_report(judge, corpus, part.length)
    report["config"] = dataclasses.asdict(settings)
    scorer = Scorer(judge, corpus)

    def score(tokens: fl.Tokens) -> dict[str, float]:
        scored = scorer(tokens)
        return {key: float(scored[key]) for key in ("judge_ppl", "entropy", "distinct_2")}

    def draw(batch_size: int, generator: torch.Generator) -> fl.Tokens:
        return corpus.sample_windows("train", batch_size, part.length, generator)

    samples = corpus.fixed_windows("validation", part.length, count=part.samples)
    vocab_size = corpus.tokenizer.vocab_size
    decode = corpus.tokenizer.decode_batch
    return Data(vocab_size, part.length, draw, lambda _: None, score, decode, samples, report)


# -- training for a number of steps -----------------------------------------------------------


@dataclass(frozen=True)
class Training:
    """What to train: the modules (every parameter trained), the loss of a batch, the recipe
    (optimizer, EMA, seed) and the settings that name its checkpoint."""

    modules: nn.Module
    objective: TokenObjective
    recipe: Recipe
    key: dict[str, Any]


@dataclass(frozen=True)
class Trained:
    """A model trained for some steps: its EMA weights' module and what the run spent."""

    module: nn.Module
    steps: int
    cpu_seconds: float
    loss: float


class Trainer:
    """One AdamW step at a time of a `Training` run of ``steps`` steps (for the schedule).

    Step ``k`` draws its batch, then whatever the objective draws, from
    ``seeded_generator(recipe.seed, "study", k)``: every arm of a seed sees the same batches
    in the same order. Gradients are clipped to norm 1 and the EMA (`flowlm.train.EMA`)
    follows every step. A step reads nothing on the host.
    """

    def __init__(self, training: Training, data: Data, steps: int) -> None:
        self.training, self.data, self.steps = training, data, steps
        self.parameters = [p for p in training.modules.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.parameters, lr=training.recipe.lr, weight_decay=0.0)
        self.ema = EMA(training.modules, training.recipe.ema_decay)
        training.modules.train()

    def step(self, k: int) -> Tensor:
        """Step ``k``; returns its loss (detached, on the model's device)."""
        recipe = self.training.recipe
        generator = seeded_generator(recipe.seed, "study", k)
        loss = self.training.objective(self.data.draw(recipe.batch_size, generator), generator)
        for group in self.optimizer.param_groups:
            group["lr"] = recipe.learning_rate(k, self.steps)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.parameters, 1.0)
        self.optimizer.step()
        self.ema.update(self.training.modules)
        return loss.detach()


def train(training: Training, data: Data, steps: int, cache: Path, label: str) -> Trained:
    """Train for ``steps`` steps (`Trainer`), or load the checkpoint of equal settings.

    The running loss (an exponential average of weight `LOSS_AVERAGE`) is read once, at the
    end; a non-finite loss or weight is an error and writes no checkpoint. Returns the EMA of
    the weights in eval mode and the process CPU seconds the run spent.
    """
    if steps < 1:
        raise ValueError(f"{label}: need at least one training step, got {steps}")
    path = (
        cache / f"study-{training.key['kind']}-{settings_key(training.key | {'steps': steps})}.pt"
    )
    trainer = Trainer(training, data, steps)
    if path.exists():
        state = torch.load(path, map_location="cpu", weights_only=True)
        trainer.ema.module.load_state_dict(state["ema"])
        print(f"   {label}: cached ({state['steps']} steps)", flush=True)
        return Trained(
            trainer.ema.module.eval(), state["steps"], state["cpu_seconds"], state["loss"]
        )
    running = torch.zeros(())
    start = time.process_time()
    for k in range(steps):
        running = torch.lerp(running, trainer.step(k), 1.0 if k == 0 else LOSS_AVERAGE)
    spent = time.process_time() - start
    final = running.item()
    weights = trainer.ema.module.state_dict()
    if not (math.isfinite(final) and all(bool(w.isfinite().all()) for w in weights.values())):
        raise FloatingPointError(f"{label}: non-finite loss {final} or weights after {steps} steps")
    print(f"   {label}: {steps} steps in {spent:.1f} CPU s, loss {final:.4f}", flush=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"ema": weights, "steps": steps, "cpu_seconds": spent, "loss": final}, path)
    return Trained(trainer.ema.module.eval(), steps, spent, final)


# -- FLM --------------------------------------------------------------------------------------


def interpolant_of(recipe: Recipe, vocab_size: int) -> fl.LinearInterpolant:
    """FLM's linear path on the recipe's clock."""
    if recipe.clock == "token-accuracy":
        return fl.LinearInterpolant(reparam=fl.TokenAccuracy(vocab_size))
    if recipe.clock == "identity":
        return fl.LinearInterpolant(reparam=fl.Identity())
    raise ValueError(f"unknown clock {recipe.clock!r}")


def training_times(recipe: Recipe, batch_size: int, generator: torch.Generator) -> fl.Time:
    """Model times of a batch from the recipe's density."""
    if recipe.times == "stratified":
        return fl.uniform_times(batch_size, generator=generator)
    if recipe.times == "iid":
        return fl.uniform_times(batch_size, stratified=False, generator=generator)
    if recipe.times == "logit-normal":
        return torch.sigmoid(torch.randn(batch_size, generator=generator))
    raise ValueError(f"unknown time density {recipe.times!r}")


def capped(network: nn.Module, recipe: Recipe) -> nn.Module:
    """The network, soft-capped when the recipe says so."""
    return network if recipe.soft_cap is None else fl.SoftCapped(network, recipe.soft_cap)


def flm_network(recipe: Recipe, vocab_size: int, two_time: bool = False) -> DiT:
    """The recipe's DiT (seeded)."""
    torch.manual_seed(recipe.seed)
    return DiT(
        vocab_size,
        dim=recipe.dim,
        depth=recipe.depth,
        heads=recipe.heads,
        two_time=two_time,
        dropout=0.0,
        self_conditioning=recipe.self_conditioning,
    )


def flm_training(recipe: Recipe, data: Data) -> Training:
    """FLM with the recipe's levers: CE of the x-prediction at x_t, masked by the task."""
    if recipe.self_conditioning and recipe.soft_cap is not None:
        raise ValueError(
            "the study changes one lever at a time: no soft-cap with self-conditioning"
        )
    vocab_size = data.vocab_size
    network = flm_network(recipe, vocab_size)
    interpolant = interpolant_of(recipe, vocab_size)
    backbone = capped(network, recipe)
    weighting = fl.LearnedTimeWeighting() if recipe.weighting == "learned" else None
    modules = nn.ModuleDict({"network": network})
    if weighting is not None:
        modules["weighting"] = weighting

    def objective(tokens: fl.Tokens, generator: torch.Generator) -> Tensor:
        x1 = fl.one_hot(tokens, vocab_size)
        t = training_times(recipe, len(tokens), generator)
        x_t = interpolant.sample(torch.randn(x1.shape, generator=generator), x1, t)
        if recipe.self_conditioning:
            logits = fl.self_conditioned_logits(network, x_t, t, generator=generator)
        else:
            logits = fl.XPredictor(backbone).logits(x_t, t)
        loss = fl.cross_entropy(logits, tokens)
        return fl.masked_mean(loss if weighting is None else weighting(loss, t), data.mask(tokens))

    key = {"kind": "flm", "recipe": dataclasses.asdict(recipe)}
    key |= {"length": data.length, "vocab_size": vocab_size}
    return Training(modules, objective, recipe, key)


def flm_sampler(trained: Trained, recipe: Recipe, vocab_size: int, noise: fl.State) -> Sampler:
    """The Euler map of a trained FLM from fixed noise (self-conditioned: on the lifted state)."""
    network = trained.module.get_submodule("network").requires_grad_(False)
    interpolant = interpolant_of(recipe, vocab_size)
    if not recipe.self_conditioning:
        flow_map = fl.XPredMap(fl.XPredictor(capped(network, recipe)), interpolant)
        return flow_sampler(flow_map, noise)
    self_conditioned = fl.SelfConditionedMap(network, interpolant)

    def sample(n_steps: int) -> tuple[fl.Tokens, int]:
        trajectory = fl.rollout(self_conditioned, fl.lift_state(noise), fl.time_grid(n_steps))
        return fl.decode(fl.split_state(trajectory.x).x), trajectory.nfe

    return sample


class SelfConditionedTeacher(nn.Module):
    """A self-conditioned FLM as a plain backbone: it estimates, then reads its estimate.

    ``f(x, t, previous=softmax(f(x, t)))``: two calls, the denoiser its sampler converges to.
    """

    def __init__(self, network: DiT) -> None:
        super().__init__()
        self.network = network

    def forward(self, x_t: fl.State, t: fl.Time) -> fl.Logits:
        estimate = torch.softmax(self.network(x_t, t), dim=-1)
        return self.network(x_t, t, previous=estimate)


def fmlm_training(teacher_run: Trained, recipe: Recipe, data: Data) -> Training:
    """A one-stage v2 FMLM student (semigroup KL to the teacher).

    The student is the teacher's DiT with a second time embedding starting at zero
    (`flowlm.distill.init_student`), soft-capped like its teacher; a self-conditioned
    teacher is read as `SelfConditionedTeacher` and its student sees zeros as the estimate.
    Pairs: `flowlm.time_pairs` with the whole-path jump at probability 0.1 (as
    ``benchmarks/quality.py``). AdamW at `DISTILL_LR`, EMA `DISTILL_EMA`.
    """
    vocab_size = data.vocab_size
    teacher = teacher_run.module.get_submodule("network").requires_grad_(False)
    if not isinstance(teacher, DiT):
        raise TypeError(f"expected a DiT teacher, got {type(teacher).__name__}")
    interpolant = interpolant_of(recipe, vocab_size)
    if recipe.self_conditioning:
        teacher_predictor = fl.XPredictor(SelfConditionedTeacher(teacher))
    else:
        teacher_predictor = fl.XPredictor(capped(teacher, recipe))
    student = flm_network(recipe, vocab_size, two_time=True)
    distill.init_student(student, teacher)
    student_map = student_flow_map(student, recipe, interpolant)

    def loss(tokens: fl.Tokens, x_t: fl.State, t: fl.Time, s: fl.Time) -> fl.TokenLoss:
        return distill.semigroup_kl_loss(student_map, teacher_predictor, x_t, t, s)

    distil_recipe = replace(
        recipe, lr=DISTILL_LR, warmup=DISTILL_WARMUP, schedule="constant", ema_decay=DISTILL_EMA
    )
    key = {"kind": "fmlm-v2", "recipe": dataclasses.asdict(recipe), "length": data.length}
    key |= {"teacher_steps": teacher_run.steps, "teacher_loss": teacher_run.loss}
    objective = jump_objective("v2", loss, vocab_size)
    return Training(nn.ModuleDict({"network": student}), objective, distil_recipe, key)


def student_flow_map(
    student: DiT, recipe: Recipe, interpolant: fl.LinearInterpolant
) -> fl.XPredMap:
    """The two-time flow map of a student (of a self-conditioned teacher: zeros as estimate)."""
    backbone = (
        fl.WithPrevious(student, None) if recipe.self_conditioning else capped(student, recipe)
    )
    return fl.XPredMap(fl.XPredictor(backbone), interpolant, two_time=True)


# -- baselines --------------------------------------------------------------------------------


def mdlm_training(recipe: Recipe, data: Data) -> Training:
    """MDLM (``benchmarks/mdlm.py``) with the baseline's backbone and optimizer."""
    torch.manual_seed(recipe.seed)
    backbone = DiT(
        data.vocab_size + 1, dim=recipe.dim, depth=recipe.depth, heads=recipe.heads, dropout=0.0
    )
    model = MaskedDiffusion(backbone, data.vocab_size)
    key = {"kind": "mdlm", "recipe": dataclasses.asdict(recipe)}
    key |= {"length": data.length, "vocab_size": data.vocab_size}
    return Training(model, model.loss, recipe, key)


def ar_training(recipe: Recipe, data: Data) -> Training:
    """The autoregressive baseline, next-token CE (masked like FLM's loss)."""
    torch.manual_seed(recipe.seed)
    size = TrainingSettings(
        length=data.length, dim=recipe.dim, depth=recipe.depth, heads=recipe.heads
    )
    model = build_model(size, data.vocab_size)

    def objective(tokens: fl.Tokens, generator: torch.Generator) -> Tensor:
        return fl.masked_mean(model.token_nll(tokens), data.mask(tokens))

    key = {"kind": "ar", "recipe": dataclasses.asdict(recipe)}
    key |= {"length": data.length, "vocab_size": data.vocab_size}
    return Training(model, objective, recipe, key)


# -- equal CPU cost ---------------------------------------------------------------------------

REFERENCES = ("MDLM", "AR")


def step_trainings(part: Part, data: Data) -> dict[str, Callable[[], Training]]:
    """The trainings whose step cost is measured: the baseline, every arm that changes the
    computation, MDLM and AR (as builders: each is made fresh where it is timed)."""
    trainings: dict[str, Callable[[], Training]] = {}
    for arm in part.arms:
        if arm is part.arms[0] or not arm.cost_neutral:
            recipe = replace(part.baseline, **arm.changes)
            trainings[arm.name] = lambda recipe=recipe: flm_training(recipe, data)
    trainings["MDLM"] = lambda: mdlm_training(part.baseline, data)
    trainings["AR"] = lambda: ar_training(part.baseline, data)
    return trainings


def measure_costs(part: Part, data: Data, cache: Path) -> dict[str, Any]:
    """Each training's CPU cost per step relative to the baseline's; or the cached figures.

    Every training takes ``part.cost_repeats`` timed bursts of 4 steps (after 2 untimed),
    interleaved in shuffled order so they share the machine's state
    (`harness.time_interleaved`); the cost is the median thread CPU seconds per step, and the
    ratio is to the baseline's. Cost-neutral arms are not timed: their ratio is 1.
    """
    key = {"task": part.task, "length": part.length, "baseline": dataclasses.asdict(part.baseline)}
    key |= {"arms": [dataclasses.asdict(arm) for arm in part.arms], "repeats": part.cost_repeats}
    path = cache / f"study-{part.task}-costs-{settings_key(key)}.json"
    if path.exists():
        return json.loads(path.read_text())
    load_start = load_average()
    steps: dict[str, Callable[[], object]] = {}
    for name, build in step_trainings(part, data).items():
        trainer, counter = Trainer(build(), data, part.steps), count()
        steps[name] = lambda trainer=trainer, counter=counter: trainer.step(next(counter))
    timings = time_interleaved(steps, part.cost_repeats, calls=4, warmup=2)
    baseline = timings[part.arms[0].name].cpu_median
    costs: dict[str, Any] = {
        "seconds_per_step": {name: timing.cpu_median for name, timing in timings.items()},
        "relative": {name: timing.cpu_median / baseline for name, timing in timings.items()},
        "load_average_start": load_start,
        "load_average_end": load_average(),
    }
    costs["relative"] |= {arm.name: 1.0 for arm in part.arms if arm.cost_neutral}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(costs, indent=2) + "\n")
    print(f"   relative step costs: {costs['relative']}", flush=True)
    return costs


def budget_steps(baseline_steps: int, relative_cost: float) -> int:
    """The steps of a training whose step costs ``relative_cost`` baselines' at an equal
    budget: ``baseline_steps / relative_cost``, rounded, at least 1."""
    if not relative_cost > 0:
        raise ValueError(f"a relative cost must be positive, got {relative_cost}")
    return max(1, round(baseline_steps / relative_cost))


# -- sampling, scoring and running a part -----------------------------------------------------

METRICS = ("real_words", "distinct_words", "judge_ppl", "entropy", "distinct_ratio")
MEASURE = {"words": "real_words", "corpus": "judge_ppl"}
"""The measure an arm is read by: the real-word rate (higher is better) or the judge's
perplexity (lower is better)."""


SELECTION = ("seeds", "seeded_arms", "more_seeded", "reference_seeds", "distilled", "trend")
"""Part settings that choose which models run, not how one is trained or sampled."""


def finished_rows(
    out: Path, part: Part, noise_seed: int
) -> dict[tuple[Any, ...], list[dict[str, Any]]]:
    """The rows an earlier run of this section wrote, by model, when they are this run's:
    the same noise and every setting equal but the `SELECTION`; else none."""
    if not out.exists():
        return {}
    earlier = json.loads(out.read_text())
    settings = json.loads(json.dumps(dataclasses.asdict(part)))
    if earlier["noise_seed"] != noise_seed or any(
        earlier["settings"][key] != value for key, value in settings.items() if key not in SELECTION
    ):
        return {}
    done: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for row in earlier["rows"]:
        done.setdefault(model_of(row), []).append(row)
    return done


def model_of(row: dict[str, Any]) -> tuple[Any, ...]:
    """What names a row's model: its kind, arm, seed, budget and training steps."""
    trained = row.get("train_steps", row.get("distill_steps"))
    return (row["model"], row["arm"], row["seed"], row["multiple"], trained)


def sample_rows(
    data: Data, sampler: Sampler, steps: tuple[int, ...], common: dict[str, Any]
) -> list[dict[str, Any]]:
    """Sample at each step count, score, and return one row per step count."""
    rows: list[dict[str, Any]] = []
    for n_steps in steps:
        start = time.process_time()
        tokens, nfe = sampler(n_steps)
        seconds = time.process_time() - start
        row = common | {"steps": n_steps, "nfe": nfe, "sample_cpu_seconds": seconds}
        row |= data.score(tokens) | {"examples": data.decode(tokens[:4])}
        shown = {key: round(value, 4) for key, value in row.items() if key in METRICS}
        print(
            f"   {common['model']} {common['arm']} seed {common['seed']} x{common['multiple']:g} "
            f"{n_steps} step(s): {shown}",
            flush=True,
        )
        rows.append(row)
    return rows


def training_fields(trained: Trained, relative_cost: float) -> dict[str, Any]:
    return {
        "relative_cost": relative_cost,
        "train_steps": trained.steps,
        "train_cpu_seconds": trained.cpu_seconds,
        "final_loss": trained.loss,
    }


def quality_of(rows: list[dict[str, Any]], task: str) -> float:
    """How good FLM rows are (higher is better): the mean over the rows of the real-word rate
    (words) or of minus the log judge perplexity (corpus)."""
    if task == "words":
        return statistics.fmean(row["real_words"] for row in rows)
    return -statistics.fmean(math.log(row["judge_ppl"]) for row in rows)


def flm_rows(rows: list[dict[str, Any]], arm: str, multiple: float = 1.0) -> list[dict[str, Any]]:
    return [
        r for r in rows if r["model"] == "FLM" and r["arm"] == arm and r["multiple"] == multiple
    ]


def seed_qualities(rows: list[dict[str, Any]], arm: str, task: str) -> list[float]:
    """`quality_of` each seed of an arm's FLM at budget x1."""
    mine = flm_rows(rows, arm)
    seeds = sorted({r["seed"] for r in mine})
    return [quality_of([r for r in mine if r["seed"] == s], task) for s in seeds]


class PartRun:
    """Trains, samples and scores the models of one part; every row goes to ``rows`` and the
    section's file is rewritten after each model."""

    def __init__(self, part: Part, seed: int, cache: Path, quick: bool, out: Path) -> None:
        self.part, self.seed, self.cache, self.out = part, seed, cache, out
        self.started, self.load_start = time.process_time(), load_average()
        print(f"study part {part.task}: load average {self.load_start}", flush=True)
        self.data = (
            words_data(part, seed) if part.task == "words" else corpus_data(part, cache, quick)
        )
        self.costs = measure_costs(part, self.data, cache)
        self.noise = torch.randn(
            (part.samples, part.length, self.data.vocab_size),
            generator=seeded_generator(seed, "study-noise"),
        )
        self.rows: list[dict[str, Any]] = []
        self.arms = {arm.name: arm for arm in part.arms}
        self.done = finished_rows(out, part, seed)

    def sampled(
        self, sampler: Sampler, steps: tuple[int, ...], common: dict[str, Any]
    ) -> list[dict[str, Any]]:
        """`sample_rows`, or the rows an earlier run wrote for the same model and steps."""
        earlier = self.done.get(model_of(common), [])
        if [row["steps"] for row in earlier] == list(steps):
            print(
                f"   {common['model']} {common['arm']} seed {common['seed']}: rows reused",
                flush=True,
            )
            return earlier
        return sample_rows(self.data, sampler, steps, common)

    def save(self, extra: dict[str, Any]) -> None:
        result = {
            "part": self.part.task,
            "settings": dataclasses.asdict(self.part),
            "costs": self.costs,
            "judge": self.data.judge,
            "noise_seed": self.seed,
            "rows": self.rows,
            "cpu_seconds": time.process_time() - self.started,
            "load_average_start": self.load_start,
            "load_average_end": load_average(),
            "machine": machine_context(),
        } | extra
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.out.write_text(json.dumps(result, indent=2) + "\n")

    def common(
        self, model: str, arm: str, lever: str | None, seed: int, multiple: float
    ) -> dict[str, Any]:
        return {
            "part": self.part.task,
            "model": model,
            "arm": arm,
            "lever": lever,
            "seed": seed,
            "multiple": multiple,
            "budget_steps": round(self.part.steps * multiple),
        }

    def teacher(self, arm: Arm, seed: int, multiple: float) -> tuple[Trained, Recipe, float]:
        recipe = replace(self.part.baseline, **arm.changes, seed=seed)
        cost = self.costs["relative"][arm.name]
        steps = budget_steps(round(self.part.steps * multiple), cost)
        label = f"FLM {arm.name} seed {seed} x{multiple:g}"
        return (
            train(flm_training(recipe, self.data), self.data, steps, self.cache, label),
            recipe,
            cost,
        )

    def data_row(self) -> None:
        common = self.common("data", "data", None, self.seed, 1.0) | {"steps": None, "nfe": None}
        self.rows.append(common | self.data.score(self.data.data_samples))

    def flm(self, arm: Arm, seed: int, multiple: float = 1.0) -> None:
        trained, recipe, cost = self.teacher(arm, seed, multiple)
        sampler = flm_sampler(trained, recipe, self.data.vocab_size, self.noise)
        common = self.common("FLM", arm.name, arm.lever, seed, multiple) | training_fields(
            trained, cost
        )
        self.rows += self.sampled(sampler, self.part.flm_steps, common)

    def fmlm(self, arm: Arm, seed: int, multiple: float = 1.0) -> None:
        teacher, recipe, _ = self.teacher(arm, seed, multiple)
        steps = max(1, round(self.part.distill_steps * multiple))
        label = f"FMLM v2 of {arm.name} seed {seed} x{multiple:g}"
        student = train(
            fmlm_training(teacher, recipe, self.data), self.data, steps, self.cache, label
        )
        network = student.module.get_submodule("network").requires_grad_(False)
        if not isinstance(network, DiT):
            raise TypeError(f"expected a DiT student, got {type(network).__name__}")
        flow_map = student_flow_map(network, recipe, interpolant_of(recipe, self.data.vocab_size))
        common = self.common("FMLM v2", arm.name, arm.lever, seed, multiple)
        common |= {"distill_steps": steps, "distill_cpu_seconds": student.cpu_seconds}
        self.rows += self.sampled(flow_sampler(flow_map, self.noise), self.part.fmlm_steps, common)

    def mdlm(self, seed: int, multiple: float = 1.0) -> None:
        cost = self.costs["relative"]["MDLM"]
        steps = budget_steps(round(self.part.steps * multiple), cost)
        training = mdlm_training(replace(self.part.baseline, seed=seed), self.data)
        trained = train(training, self.data, steps, self.cache, f"MDLM seed {seed} x{multiple:g}")
        model = trained.module
        if not isinstance(model, MaskedDiffusion):
            raise TypeError(f"expected MaskedDiffusion, got {type(model).__name__}")

        def sampler(n_steps: int) -> tuple[fl.Tokens, int]:
            generator = seeded_generator(self.seed, "study-mdlm", n_steps)
            return model.sample(self.part.samples, self.part.length, n_steps, generator)

        common = self.common("MDLM", "MDLM", None, seed, multiple) | training_fields(trained, cost)
        self.rows += self.sampled(sampler, self.part.mdlm_steps, common)

    def ar(self) -> None:
        cost = self.costs["relative"]["AR"]
        steps = budget_steps(self.part.steps, cost)
        trained = train(
            ar_training(self.part.baseline, self.data), self.data, steps, self.cache, "AR"
        )
        model = trained.module
        if not isinstance(model, CausalTransformer):
            raise TypeError(f"expected a CausalTransformer, got {type(model).__name__}")
        generator = seeded_generator(self.seed, "study-ar")
        length = self.part.length
        common = self.common("AR", "AR", None, self.part.baseline.seed, 1.0) | training_fields(
            trained, cost
        )
        self.rows += self.sampled(
            lambda _: (generate(model, self.part.samples, length, generator), length),
            (length,),
            common,
        )

    def run_arms(self) -> None:
        """In order of need, so that a run stopped early keeps the most important rows: every
        arm at the first seed; the baseline at every seed; the seeded arms at every seed; the
        baseline's FMLM, MDLM and AR at the first seed and the FMLM of the best arms (mean
        ahead of the baseline's); FMLM and MDLM at the other reference seeds, and the FMLM of
        the best arms that are seeded arms; then the arms ahead of the baseline by more than
        its seed spread, at every seed."""
        part, first, task = self.part, self.part.seeds[0], self.part.task
        baseline = part.arms[0]
        progress: dict[str, Any] = {"seeded_arms": list(part.seeded_arms), "best_arms": []}
        self.data_row()
        for arm in part.arms:
            self.flm(arm, first)
            self.save(progress)
        for arm in (baseline, *(self.arms[name] for name in part.seeded_arms)):
            for seed in part.seeds[1:]:
                self.flm(arm, seed)
                self.save(progress)
        mean = {
            arm.name: statistics.fmean(seed_qualities(self.rows, arm.name, task))
            for arm in part.arms
        }
        best = sorted(
            (arm for arm in part.arms[1:] if mean[arm.name] > mean[baseline.name]),
            key=lambda arm: -mean[arm.name],
        )[: part.distilled]
        progress["best_arms"] = [arm.name for arm in best]
        self.fmlm(baseline, first)
        self.mdlm(first)
        self.ar()
        for arm in best:
            self.fmlm(arm, first)
            self.save(progress)
        for seed in part.reference_seeds[1:]:
            self.fmlm(baseline, seed)
            self.mdlm(seed)
            self.save(progress)
        for arm in (arm for arm in best if arm.name in part.seeded_arms):
            for seed in part.reference_seeds[1:]:
                self.fmlm(arm, seed)
                self.save(progress)
        base = seed_qualities(self.rows, baseline.name, task)
        spread = max(base) - min(base)
        ahead = sorted(
            (
                arm
                for arm in part.arms[1:]
                if arm.name not in part.seeded_arms
                and seed_qualities(self.rows, arm.name, task)[0] - statistics.fmean(base) > spread
            ),
            key=lambda arm: -seed_qualities(self.rows, arm.name, task)[0],
        )[: part.more_seeded]
        progress["seeded_arms"] += [arm.name for arm in ahead]
        for arm in ahead:
            for seed in part.seeds[1:]:
                self.flm(arm, seed)
                self.save(progress)
        self.save(progress)

    def run_trend(self) -> None:
        """The trend arms' FLM and FMLM and MDLM at each multiple of the budget besides x1."""
        first = self.part.seeds[0]
        for multiple in self.part.trend:
            for name in self.part.trend_arms:
                self.flm(self.arms[name], first, multiple)
                self.fmlm(self.arms[name], first, multiple)
                self.save({})
            self.mdlm(first, multiple)
            self.save({})


# -- results ----------------------------------------------------------------------------------


def pick(rows: list[dict[str, Any]], **fields: Any) -> list[dict[str, Any]]:
    """The rows whose fields have the given values."""
    return [r for r in rows if all(r.get(k) == v for k, v in fields.items())]


@dataclass(frozen=True)
class Spread:
    """A measure over seeds: its mean, smallest and largest value, and the number of seeds."""

    mean: float
    low: float
    high: float
    seeds: int

    @staticmethod
    def of(values: list[float]) -> "Spread":
        if not values:
            raise ValueError("a spread needs at least one value")
        return Spread(statistics.fmean(values), min(values), max(values), len(values))

    @property
    def width(self) -> float:
        """max - min: the seed spread (0 for one seed)."""
        return self.high - self.low


def spread_of(rows: list[dict[str, Any]], measure: str, **fields: Any) -> Spread | None:
    """The measure over the seeds of the rows with the given fields, or ``None`` if none."""
    values = [float(r[measure]) for r in pick(rows, **fields)]
    return Spread.of(values) if values else None


SECOND = {"words": "distinct_words", "corpus": "entropy"}
"""The measure shown beside `MEASURE`."""


def arm_summaries(rows: list[dict[str, Any]], task: str, baseline: str) -> list[dict[str, Any]]:
    """Each FLM arm at budget x1 and each step count: the measure's mean and range over its
    seeds, and whether it moves FLM: ``better`` or ``worse`` when its mean is beyond the
    baseline's by more than the baseline's seed spread, else ``within noise``."""
    measure, sign = MEASURE[task], 1.0 if task == "words" else -1.0
    flm = pick(rows, model="FLM", multiple=1.0)
    summaries: list[dict[str, Any]] = []
    for n_steps in dict.fromkeys(r["steps"] for r in flm):
        base = spread_of(flm, measure, arm=baseline, steps=n_steps)
        for arm in dict.fromkeys(r["arm"] for r in flm):
            mine = pick(flm, arm=arm, steps=n_steps)
            value = Spread.of([float(r[measure]) for r in mine])
            second = Spread.of([float(r[SECOND[task]]) for r in mine])
            summary: dict[str, Any] = {
                "arm": arm,
                "lever": mine[0]["lever"],
                "steps": n_steps,
                "measure": measure,
                **{f"{k}": v for k, v in dataclasses.asdict(value).items()},
                "second": SECOND[task],
                "second_mean": second.mean,
                "train_steps": mine[0]["train_steps"],
                "relative_cost": mine[0]["relative_cost"],
                "train_cpu_seconds": statistics.fmean(r["train_cpu_seconds"] for r in mine),
                "final_loss": statistics.fmean(r["final_loss"] for r in mine),
            }
            if base is not None and arm != baseline:
                gain = sign * (value.mean - base.mean)
                summary["gain"] = gain
                summary["noise"] = base.width
                summary["moves"] = (
                    "better"
                    if gain > base.width
                    else "worse"
                    if gain < -base.width
                    else "within noise"
                )
            summaries.append(summary)
    return summaries


def target(
    name: str, value: Spread, reference: float, passed: bool, multiple: float, gap: float
) -> dict[str, Any]:
    return {
        "target": name,
        "value": value.mean,
        "value_range": [value.low, value.high],
        "seeds": value.seeds,
        "reference": reference,
        "gap": gap,
        "multiple": multiple,
        "pass": passed,
    }


def word_targets(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One-step FMLM against eight-step MDLM at the same budget, and against the data's
    distinct words (as many samples); means over the seeds trained."""
    data = pick(rows, model="data")
    targets: list[dict[str, Any]] = []
    one_step = pick(rows, model="FMLM v2", steps=1)
    for arm, multiple in dict.fromkeys((r["arm"], r["multiple"]) for r in one_step):
        rate = spread_of(one_step, "real_words", arm=arm, multiple=multiple)
        distinct = spread_of(one_step, "distinct_words", arm=arm, multiple=multiple)
        mdlm = spread_of(rows, "real_words", model="MDLM", steps=8, multiple=multiple)
        if rate is None or distinct is None or mdlm is None or not data:
            continue
        needed = DISTINCT_SHARE * data[0]["distinct_words"]
        name = f"words: FMLM v2 of {arm} (x{multiple:g} budget) 1-step"
        targets += [
            target(
                f"{name} real-word rate >= MDLM 8-step's",
                rate,
                mdlm.mean,
                rate.mean >= mdlm.mean,
                multiple,
                rate.mean - mdlm.mean,
            ),
            target(
                f"{name} distinct words >= half the data's",
                distinct,
                needed,
                distinct.mean >= needed,
                multiple,
                distinct.mean - needed,
            ),
        ]
    return targets


def corpus_targets(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The quality benchmark's quick targets on this part's models, at each budget."""
    data = pick(rows, model="data")
    targets: list[dict[str, Any]] = []
    one_step = pick(rows, model="FMLM v2", steps=1)
    for arm, multiple in dict.fromkeys((r["arm"], r["multiple"]) for r in one_step):
        ppl = spread_of(one_step, "judge_ppl", arm=arm, multiple=multiple)
        entropy = spread_of(one_step, "entropy", arm=arm, multiple=multiple)
        mdlm = spread_of(rows, "judge_ppl", model="MDLM", steps=8, multiple=multiple)
        if ppl is None or entropy is None or mdlm is None or not data:
            continue
        reference = data[0]["entropy"]
        ratio = entropy.mean / reference - 1.0
        name = f"corpus: FMLM v2 of {arm} (x{multiple:g} budget) 1-step"
        targets += [
            target(
                f"{name} judge PPL <= MDLM 8-step's",
                ppl,
                mdlm.mean,
                ppl.mean <= mdlm.mean,
                multiple,
                ppl.mean - mdlm.mean,
            ),
            target(
                f"{name} entropy within 5% of the data's",
                entropy,
                reference,
                abs(ratio) <= 0.05,
                multiple,
                ratio,
            ),
        ]
    return targets


def number(value: Any, digits: int = 3) -> str:
    return "-" if value is None else f"{float(value):.{digits}f}"


def digits_of(measure: str) -> int:
    return {"distinct_words": 0, "judge_ppl": 1}.get(measure, 3)


def with_range(spread: Spread | None, measure: str) -> str:
    """``mean`` for one seed, ``mean [low, high]`` for more."""
    if spread is None:
        return "-"
    digits = digits_of(measure)
    if spread.seeds == 1:
        return number(spread.mean, digits)
    return f"{number(spread.mean, digits)} [{number(spread.low, digits)}, {number(spread.high, digits)}]"


def arm_table(part: dict[str, Any]) -> list[str]:
    """FLM arms at budget x1: cost, steps, loss, the measure (mean [range] over seeds) and
    whether it moves FLM, at each step count."""
    summaries, task = part["summaries"], part["part"]
    steps = list(dict.fromkeys(s["steps"] for s in summaries))
    measure, second = MEASURE[task], SECOND[task]
    columns = [f"{HEADINGS[measure]} @{n} | moves @{n}" for n in steps]
    lines = [
        "| arm | lever | seeds | relative cost | train steps | train CPU s | loss | "
        + " | ".join(columns)
        + f" | {HEADINGS[second]} @{steps[0]} |",
        "|---|---|---|---|---|---|---|" + "---|---|" * len(steps) + "---|",
    ]
    for arm in dict.fromkeys(s["arm"] for s in summaries):
        mine = {s["steps"]: s for s in summaries if s["arm"] == arm}
        first = mine[steps[0]]
        cells = []
        for n in steps:
            s = mine[n]
            cells.append(with_range(Spread(s["mean"], s["low"], s["high"], s["seeds"]), measure))
            cells.append(s.get("moves", "(reference)"))
        lines.append(
            f"| {arm} | {first['lever']} | {first['seeds']} | {first['relative_cost']:.3f} | "
            f"{first['train_steps']} | {first['train_cpu_seconds']:.1f} | {first['final_loss']:.3f} | "
            + " | ".join(cells)
            + f" | {number(first['second_mean'], digits_of(second))} |"
        )
    return lines


HEADINGS = {
    "real_words": "real words",
    "distinct_words": "distinct",
    "judge_ppl": "judge PPL",
    "entropy": "entropy",
    "distinct_ratio": "distinct ratio",
    "distinct_2": "distinct 2-grams",
}


def reference_table(part: dict[str, Any]) -> list[str]:
    """Data, FMLM, MDLM and AR at budget x1: means [ranges] over the seeds trained."""
    task, rows = part["part"], part["rows"]
    columns = (MEASURE[task], SECOND[task], "distinct_ratio" if task == "words" else "distinct_2")
    lines = [
        "| model | of | seeds | steps | "
        + " | ".join(HEADINGS[c] for c in columns)
        + " | sample CPU s |",
        "|---|---|---|---|" + "---|" * (len(columns) + 1),
    ]
    others = [r for r in rows if r["model"] != "FLM" and r["multiple"] == 1.0]
    for model, arm, n in dict.fromkeys((r["model"], r["arm"], r["steps"]) for r in others):
        mine = pick(others, model=model, arm=arm, steps=n)
        cells = [with_range(spread_of(mine, c), c) for c in columns]
        seconds = statistics.fmean(r.get("sample_cpu_seconds") or 0.0 for r in mine)
        lines.append(
            f"| {model} | {arm} | {len(mine)} | {n or '-'} | "
            + " | ".join(cells)
            + f" | {number(seconds if model != 'data' else None, 2)} |"
        )
    return lines


def trend_table(part: dict[str, Any]) -> list[str]:
    """The trend's models at each multiple of the budget (first seed)."""
    task, rows = part["part"], part["rows"]
    trend_arms = part["settings"]["trend_arms"]
    multiples = sorted({r["multiple"] for r in rows if r["model"] == "MDLM"})
    measure, second = MEASURE[task], SECOND[task]
    lines = [
        f"| budget | model | steps | {HEADINGS[measure]} | {HEADINGS[second]} | train steps |",
        "|---|---|---|---|---|---|",
    ]
    seed = part["settings"]["seeds"][0]
    for multiple in multiples:
        for row in pick(rows, multiple=multiple, seed=seed):
            if row["model"] in ("data", "AR") or (
                row["model"] != "MDLM" and row["arm"] not in trend_arms
            ):
                continue
            name = "MDLM" if row["model"] == "MDLM" else f"{row['model']} of {row['arm']}"
            trained = row.get("train_steps", row.get("distill_steps"))
            lines.append(
                f"| x{multiple:g} ({row['budget_steps']} baseline steps) | {name} | {row['steps']} | "
                f"{number(row[measure], digits_of(measure))} | {number(row[second], digits_of(second))} | {trained} |"
            )
    return lines


def costs_line(part: dict[str, Any]) -> str:
    costs = part["costs"]
    seconds = costs["seconds_per_step"][part["settings"]["arms"][0]["name"]]
    return (
        f"Relative step costs measured in interleaved bursts (baseline {1000 * seconds:.1f} ms of "
        f"thread CPU per step; load average {costs['load_average_start']} to "
        f"{costs['load_average_end']}): "
        + ", ".join(f"{name} {ratio:.3f}" for name, ratio in costs["relative"].items())
        + "."
    )


def markdown(report: dict[str, Any]) -> str:
    lines = [
        "What makes FLM learn slowly at this scale: FLM arms, each the baseline with one lever "
        "changed, trained at an equal CPU cost: the baseline's steps divided by the arm's "
        "measured cost per step relative to the baseline's (`benchmarks/study.py`).",
        "",
    ]
    for part in report["parts"]:
        settings = part["settings"]
        base = settings["baseline"]
        sections = "; ".join(
            f"{name} (its last run: {s['cpu_seconds']:.0f} CPU s, load average "
            f"{s['load_average_start']} at the start and {s['load_average_end']} at the end)"
            for name, s in part["sections"].items()
        )
        sections = (
            f"{part['work']['training']:.0f} CPU s of training and {part['work']['sampling']:.0f} "
            f"of sampling in the models of the tables; sections: {sections}"
        )
        lines += [
            f"### {part['part']}",
            "",
            f"Baseline: DiT width {base['dim']}, depth {base['depth']}, heads {base['heads']}, "
            f"batch {base['batch_size']}, AdamW lr {base['lr']} ({base['schedule']}, warm-up "
            f"{base['warmup']} steps), EMA {base['ema_decay']}, clock {base['clock']}, "
            f"{base['times']} times; {settings['steps']} steps at budget x1, FMLM distillation "
            f"{settings['distill_steps']} steps; {settings['samples']} samples per cell, fixed "
            f"noise; baseline seeds {settings['seeds']}. Work: {sections}.",
            "",
            costs_line(part),
            "",
        ]
        if part["judge"] is not None:
            lines += [
                f"Judge: perplexity {part['judge']['validation_ppl']:.3f} on "
                f"{part['judge']['validation_windows']} held-out windows.",
                "",
            ]
        lines += [
            "FLM arms (budget x1; mean [min, max] over seeds; an arm moves FLM when its mean is "
            "beyond the baseline's by more than the baseline's seed spread):",
            "",
            *arm_table(part),
            "",
            f"Arms trained at every seed: {', '.join(part['seeded_arms']) or 'none'}. "
            f"Best arms (distilled): {', '.join(part['best_arms']) or 'none'}.",
            "",
            "Data, FMLM (one-stage v2), MDLM and AR (budget x1):",
            "",
            *reference_table(part),
            "",
        ]
        if len({r["multiple"] for r in part["rows"] if r["model"] == "MDLM"}) > 1:
            lines += ["Trend with the training budget (first seed):", "", *trend_table(part), ""]
    lines += ["### Targets", "", "| target | value [range] | seeds | reference | gap | verdict |"]
    lines += ["|---|---|---|---|---|---|"]
    for t in report["targets"]:
        low, high = t["value_range"]
        shown = number(t["value"]) + (
            "" if t["seeds"] == 1 else f" [{number(low)}, {number(high)}]"
        )
        lines.append(
            f"| {t['target']} | {shown} | {t['seeds']} | {number(t['reference'])} "
            f"| {number(t['gap'])} | {verdict(t['pass'])} |"
        )
    return "\n".join(lines)


def plot_arms(axis: Any, part: dict[str, Any]) -> None:
    """Horizontal bars of each arm's mean at each step count, whiskers over its seeds, and the
    references as vertical lines."""
    task, rows, summaries = part["part"], part["rows"], part["summaries"]
    measure = MEASURE[task]
    arms = list(dict.fromkeys(s["arm"] for s in summaries))
    steps = list(dict.fromkeys(s["steps"] for s in summaries))
    height = 0.8 / len(steps)
    for k, n_steps in enumerate(steps):
        mine = [next(s for s in summaries if s["arm"] == a and s["steps"] == n_steps) for a in arms]
        means = [s["mean"] for s in mine]
        errors = [[s["mean"] - s["low"] for s in mine], [s["high"] - s["mean"] for s in mine]]
        positions = [i + k * height for i in range(len(arms))]
        axis.barh(
            positions, means, height=height, xerr=errors, capsize=2, label=f"FLM {n_steps} steps"
        )
    labels = [f"{a} ({next(s['seeds'] for s in summaries if s['arm'] == a)} seeds)" for a in arms]
    axis.set_yticks([i + 0.4 - height / 2 for i in range(len(arms))], labels, fontsize=7)
    axis.invert_yaxis()
    references = [
        (
            spread_of(rows, measure, model="MDLM", steps=8, multiple=1.0),
            "MDLM 8 steps",
            "black",
            "--",
        ),
        (
            spread_of(rows, measure, model="FMLM v2", arm=BASELINE.name, steps=1, multiple=1.0),
            "FMLM 1 step (baseline)",
            "red",
            "-.",
        ),
        (spread_of(rows, measure, model="AR"), "AR", "grey", ":"),
        (spread_of(rows, measure, model="data"), "data", "green", "-"),
    ]
    for spread, name, color, style in references:
        if spread is not None:
            axis.axvline(spread.mean, color=color, linestyle=style, label=name)
    if measure == "judge_ppl":
        axis.set_xscale("log")
    axis.set_xlabel(HEADINGS[measure])
    axis.set_title(f"{task}: FLM arms at equal CPU cost (whiskers: seed range)", fontsize=10)
    axis.legend(fontsize=7)
    axis.grid(alpha=0.3, axis="x")


def plot_trend(axis: Any, part: dict[str, Any]) -> None:
    """The trend's measures against the baseline-equivalent training steps (first seed)."""
    task, rows = part["part"], part["rows"]
    measure, seed = MEASURE[task], part["settings"]["seeds"][0]
    series: list[tuple[str, dict[str, Any]]] = [("MDLM 8 steps", {"model": "MDLM", "steps": 8})]
    for arm in part["settings"]["trend_arms"]:
        series.append((f"FLM {arm}, 8 steps", {"model": "FLM", "arm": arm, "steps": 8}))
        series.append((f"FMLM of {arm}, 1 step", {"model": "FMLM v2", "arm": arm, "steps": 1}))
    for name, fields in series:
        mine = sorted(pick(rows, seed=seed, **fields), key=lambda r: r["budget_steps"])
        axis.plot(
            [r["budget_steps"] for r in mine], [r[measure] for r in mine], marker="o", label=name
        )
    if measure == "judge_ppl":
        axis.set_yscale("log")
    axis.set_xscale("log", base=2)
    axis.set_xlabel("training budget (baseline steps)")
    axis.set_ylabel(HEADINGS[measure])
    axis.set_title(f"{task}: {HEADINGS[measure]} against the training budget", fontsize=10)
    axis.legend(fontsize=7)
    axis.grid(alpha=0.3)


def plot(report: dict[str, Any], path: Path) -> None:
    """Per part: the FLM arms (top) and the trend with the budget (bottom)."""
    figure = Figure(figsize=(14, 10))
    axes = figure.subplots(2, 2)
    parts = {part["part"]: part for part in report["parts"]}
    for column, task in enumerate(PARTS):
        if task not in parts:
            axes[0][column].set_visible(False)
            axes[1][column].set_visible(False)
            continue
        if parts[task]["summaries"]:
            plot_arms(axes[0][column], parts[task])
        else:
            axes[0][column].set_visible(False)
        plot_trend(axes[1][column], parts[task])
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)  # a PNG drawn by matplotlib's Agg canvas


def load_part(cache: Path, task: str) -> dict[str, Any] | None:
    """A part's sections done so far, merged: the settings, costs and judge of either, the
    rows of both (the data row once), the seed summaries, and each section's CPU and load."""
    sections = {
        name: json.loads(path.read_text())
        for name in SECTIONS
        if (path := section_path(cache, task, name)).exists()
    }
    if not sections:
        return None
    first = next(iter(sections.values()))
    rows = [
        r
        for name, s in sections.items()
        for r in s["rows"]
        if name == "arms" or r["model"] != "data"
    ]
    arms = sections.get("arms", {})
    part = {
        "part": task,
        "settings": first["settings"],
        "costs": first["costs"],
        "judge": first["judge"],
        "seeded_arms": arms.get("seeded_arms", []),
        "best_arms": arms.get("best_arms", []),
        "sections": {
            name: {key: s[key] for key in ("cpu_seconds", "load_average_start", "load_average_end")}
            for name, s in sections.items()
        },
        "rows": rows,
    }
    part["summaries"] = arm_summaries(rows, task, first["settings"]["arms"][0]["name"])
    part["work"] = work_seconds(rows)
    return part


def work_seconds(rows: list[dict[str, Any]]) -> dict[str, float]:
    """The process CPU seconds of the models behind the rows: training (once per model,
    whichever run trained it) and sampling."""
    models = {model_of(r): r for r in rows if r["model"] != "data"}
    training = sum(
        r.get("train_cpu_seconds", r.get("distill_cpu_seconds", 0.0)) for r in models.values()
    )
    sampling = sum(r.get("sample_cpu_seconds") or 0.0 for r in rows)
    return {"training": training, "sampling": sampling}


def write_report(out_dir: Path, plot_path: Path) -> list[dict[str, Any]]:
    """Merge the sections done so far into ``study.json``, ``study.md`` and the plot."""
    cache = out_dir / "cache"
    parts = [part for task in PARTS if (part := load_part(cache, task)) is not None]
    if not parts:
        print(f"error: no part of the study in {cache}: run a --part first", file=sys.stderr)
        raise SystemExit(2)
    targets: list[dict[str, Any]] = []
    for part in parts:
        targets += (word_targets if part["part"] == "words" else corpus_targets)(part["rows"])
    report = {
        "benchmark": "study",
        "parts": parts,
        "targets": targets,
        "machine": machine_context(),
    }
    write_results(out_dir, "study", report, markdown(report))
    plot(report, plot_path)
    print(f"wrote {plot_path}", flush=True)
    return targets


def section_path(cache: Path, task: str, section: str) -> Path:
    return cache / f"study-{task}-{section}.json"


def add_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--part", choices=(*PARTS, "all", "report"), default="all")
    parser.add_argument("--section", choices=(*SECTIONS, "all"), default="all")
    parser.add_argument("--plot", type=Path, default=None, help="default: <out-dir>/study.png")


def main() -> None:
    arguments = parse_flags(__doc__, add_flags)
    out_dir: Path = arguments.out_dir
    cache = out_dir / "cache"
    parts = QUICK_PARTS if arguments.quick else PARTS_OF_RUN
    chosen = {"all": PARTS, "report": ()}.get(arguments.part, (arguments.part,))
    sections = SECTIONS if arguments.section == "all" else (arguments.section,)
    for task in chosen:
        for section in sections:
            out = section_path(cache, task, section)
            run = PartRun(parts[task], arguments.seed, cache, arguments.quick, out)
            if section == "arms":
                run.run_arms()
            else:
                run.run_trend()
    targets = write_report(out_dir, arguments.plot or out_dir / "study.png")
    print_verdicts(targets)


if __name__ == "__main__":
    main()
