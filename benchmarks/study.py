"""What makes FLM learn slowly at this scale: one lever at a time, at equal CPU budget.

Every arm is the baseline FLM recipe with one lever changed, trained until it has spent the
same budget of process CPU seconds on one torch thread (a lever that costs more per step,
such as self-conditioning, gets fewer steps). Levers: self-conditioning, the density of the
training times (stratified, i.i.d. or logit-normal), the clock (decoding accuracy or
identity), the loss weighting (none or learned), the logit soft-cap, the learning rate and
its schedule, width against depth at (about) equal parameters, and the EMA decay.

Two tasks (`flowlm.data.tasks`):

- ``words``: one word of the King James Bible per sequence (lowercase letters, drawn by
  frequency, L = 8, padded), scored by the fraction of samples that are real words and the
  number of distinct ones, against the data's for as many samples.
- ``corpus``: character-level windows of the King James Bible (L = 32, like
  ``benchmarks/quality.py --preset quick``), scored by the judge's perplexity
  (``benchmarks/judge.py``) and the unigram entropy.

Each arm's FLM samples with the Euler map at 8 and 128 steps. The baseline and the best
arms are distilled into one-step FMLM students (v2: semigroup KL, one stage) at an equal
distillation budget; MDLM (8 and 128 steps) and an autoregressive model are trained at the
same budget as an arm. The baseline is trained at two seeds, to show the noise level. On the
words task the baseline, the best arm, its FMLM and MDLM are also trained at a quarter and half
the budget: the trend of the gap to the target with training.

Usage:
    python benchmarks/study.py --part words --plot docs/assets/study.png    # 11 CPU-min
    python benchmarks/study.py --part corpus --plot docs/assets/study.png   # 10 CPU-min
    python benchmarks/study.py --part report --plot docs/assets/study.png   # tables only
    python benchmarks/study.py --quick --out-dir /tmp/study                 # seconds

The parts can run at the same time (two processes); each writes
``<out-dir>/cache/study-<part>.json`` and then rebuilds ``<out-dir>/study.json`` (every row,
the settings, the targets and the machine's load), ``study.md`` (the tables and the
verdicts) and the plot from the parts done so far. Trained models are cached in
``<out-dir>/cache/`` under a hash of their settings and reused by later runs.
"""

import argparse
import dataclasses
import json
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
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
SOFT_CAP = 30.0
"""The authors' logit soft-cap, $30\\tanh(z/30)$."""
DISTILL_LR = 5e-4
DISTILL_EMA = 0.99
DISTILL_WARMUP = 20
DISTINCT_SHARE = 0.5
"""The words target: at least this share of the distinct words of as many data samples."""
LOSS_AVERAGE = 0.02
"""Weight of each step's loss in the running average reported for a run."""


# -- recipes and arms -------------------------------------------------------------------------


@dataclass(frozen=True)
class Recipe:
    """An FLM training recipe: the backbone, the optimizer and the levers of the study.

    Attributes:
        dim, depth, heads: the DiT's size.
        batch_size: sequences per step.
        lr, warmup, schedule: AdamW's peak rate, linear warm-up steps, then constant or
            cosine decay to 0 over the CPU budget.
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

    def learning_rate(self, step: int, spent: float) -> float:
        """The rate at ``step`` with ``spent`` of the budget used (a fraction in [0, 1])."""
        if step < self.warmup:
            return self.lr * (step + 1) / self.warmup
        if self.schedule == "constant":
            return self.lr
        return self.lr * 0.5 * (1.0 + math.cos(math.pi * min(spent, 1.0)))


@dataclass(frozen=True)
class Arm:
    """The baseline with one lever changed: ``name``, the ``lever`` and the recipe's changes."""

    name: str
    lever: str
    changes: dict[str, Any] = field(default_factory=dict[str, Any])


BASELINE = Arm("baseline", "baseline")
BASELINE_SEED_1 = Arm("baseline, seed 1", "noise level", {"seed": 1})
WORD_ARMS = (
    BASELINE,
    BASELINE_SEED_1,
    Arm("self-conditioning", "self-conditioning", {"self_conditioning": True}),
    Arm("i.i.d. times", "time density", {"times": "iid"}),
    Arm("logit-normal times", "time density", {"times": "logit-normal"}),
    Arm("identity clock", "clock", {"clock": "identity"}),
    Arm("learned weighting", "loss weighting", {"weighting": "learned"}),
    Arm("soft-cap 30", "soft-cap", {"soft_cap": SOFT_CAP}),
    Arm("lr 3e-3", "learning rate", {"lr": 3e-3}),
    Arm("cosine schedule", "schedule", {"schedule": "cosine"}),
    Arm("depth 4, width 48", "width vs depth", {"dim": 48, "depth": 4}),
    Arm("EMA 0.999", "EMA", {"ema_decay": 0.999}),
)
CORPUS_ARMS = (
    BASELINE,
    BASELINE_SEED_1,
    Arm("self-conditioning", "self-conditioning", {"self_conditioning": True}),
    Arm("identity clock", "clock", {"clock": "identity"}),
    Arm("lr 3e-3", "learning rate", {"lr": 3e-3}),
)
"""Fewer arms on the corpus (each costs more): the levers that moved the words task most, and
the noise level."""


@dataclass(frozen=True)
class Part:
    """One task of the study and its budgets.

    Attributes:
        task: ``words`` or ``corpus``.
        length: positions per sequence.
        baseline: the recipe every arm changes one lever of.
        arms: the arms (the first is the baseline).
        budget: process CPU seconds of training per arm (and for MDLM and AR).
        distill_budget: process CPU seconds of each FMLM distillation.
        distilled: best arms distilled besides the baseline.
        samples: samples per cell.
        flm_steps, mdlm_steps, fmlm_steps: step counts sampled.
        trend: multiples of ``budget`` for the trend (empty: none).
    """

    task: str
    length: int
    baseline: Recipe
    arms: tuple[Arm, ...]
    budget: float
    distill_budget: float
    distilled: int
    samples: int
    flm_steps: tuple[int, ...] = (8, 128)
    mdlm_steps: tuple[int, ...] = (8, 128)
    fmlm_steps: tuple[int, ...] = (1, 2, 4)
    trend: tuple[float, ...] = ()


PARTS_OF_RUN: dict[str, Part] = {
    "words": Part(
        task="words",
        length=8,
        baseline=Recipe(dim=64, depth=2, heads=2, batch_size=128),
        arms=WORD_ARMS,
        budget=25.0,
        distill_budget=25.0,
        distilled=2,
        samples=512,
        trend=(0.25, 0.5, 1.0),
    ),
    "corpus": Part(
        task="corpus",
        length=32,
        baseline=Recipe(dim=96, depth=3, heads=4, batch_size=32),
        arms=CORPUS_ARMS,
        budget=50.0,
        distill_budget=30.0,
        distilled=1,
        samples=256,
    ),
}
QUICK_PARTS: dict[str, Part] = {
    "words": replace(
        PARTS_OF_RUN["words"],
        baseline=Recipe(dim=16, depth=1, heads=2, batch_size=8, warmup=2),
        arms=(
            *(arm for arm in WORD_ARMS if arm.lever != "width vs depth"),
            Arm("depth 2, width 12", "width vs depth", {"dim": 12, "depth": 2}),
        ),
        budget=0.3,
        distill_budget=0.3,
        distilled=1,
        samples=16,
        flm_steps=(2, 8),
        mdlm_steps=(2, 8),
        fmlm_steps=(1,),
        trend=(0.5, 1.0, 2.0),
    ),
    "corpus": replace(
        PARTS_OF_RUN["corpus"],
        length=8,
        baseline=Recipe(dim=16, depth=1, heads=2, batch_size=8, warmup=2),
        arms=CORPUS_ARMS[:3],
        budget=0.3,
        distill_budget=0.3,
        distilled=1,
        samples=16,
        flm_steps=(2, 8),
        mdlm_steps=(2, 8),
        fmlm_steps=(1,),
    ),
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


def corpus_data(part: Part, seed: int, cache: Path, quick: bool) -> Data:
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


# -- training at a CPU budget -----------------------------------------------------------------


@dataclass(frozen=True)
class Trained:
    """A model trained at a budget: its EMA weights' module and what the run spent."""

    module: nn.Module
    steps: int
    cpu_seconds: float
    loss: float


def train_for_budget(
    model: nn.Module,
    objective: TokenObjective,
    recipe: Recipe,
    data: Data,
    budget: float,
    path: Path,
    label: str,
) -> Trained:
    """Train ``model`` until it has spent ``budget`` process CPU seconds; or load ``path``.

    Step ``k`` draws its batch, then whatever ``objective`` draws, from
    ``seeded_generator(recipe.seed, "study", k)``: every arm of a seed sees the same batches
    in the same order, and stops where its budget ends. The only host reads of a step are
    the CPU clock (for the budget and the cosine schedule); the running loss is read once,
    at the end. Returns the EMA of the weights (`flowlm.train.EMA`) in eval mode.
    """
    ema = EMA(model, recipe.ema_decay)
    if path.exists():
        state = torch.load(path, map_location="cpu", weights_only=True)
        ema.module.load_state_dict(state["ema"])
        print(f"   {label}: cached ({state['steps']} steps)", flush=True)
        return Trained(ema.module.eval(), state["steps"], state["cpu_seconds"], state["loss"])
    parameters = [parameter for parameter in model.parameters() if parameter.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=recipe.lr, weight_decay=0.0)
    model.train()
    running = torch.zeros(())
    start, step, spent = time.process_time(), 0, 0.0
    while spent < budget:
        generator = seeded_generator(recipe.seed, "study", step)
        loss = objective(data.draw(recipe.batch_size, generator), generator)
        for group in optimizer.param_groups:
            group["lr"] = recipe.learning_rate(step, spent / budget)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        ema.update(model)
        weight = 1.0 if step == 0 else LOSS_AVERAGE
        running = torch.lerp(running, loss.detach(), weight)
        step += 1
        spent = time.process_time() - start
    final = running.item()
    weights = ema.module.state_dict()
    if not (math.isfinite(final) and all(bool(w.isfinite().all()) for w in weights.values())):
        raise FloatingPointError(f"{label}: non-finite loss {final} or weights after {step} steps")
    print(f"   {label}: {step} steps in {spent:.1f} CPU s, loss {final:.4f}", flush=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"ema": weights, "steps": step, "cpu_seconds": spent, "loss": final}, path)
    return Trained(ema.module.eval(), step, spent, final)


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


def train_flm(recipe: Recipe, data: Data, budget: float, cache: Path, label: str) -> Trained:
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

    key = {"kind": "flm", "recipe": dataclasses.asdict(recipe), "budget": budget}
    key |= {"length": data.length, "vocab_size": vocab_size}
    return train_for_budget(modules, objective, recipe, data, budget, cache_path(cache, key), label)


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


def distil_fmlm(
    trained: Trained, recipe: Recipe, data: Data, budget: float, cache: Path, label: str
) -> fl.XPredMap:
    """A one-stage v2 FMLM student (semigroup KL to the teacher) at a CPU budget.

    The student is the teacher's DiT with a second time embedding starting at zero
    (`flowlm.distill.init_student`), soft-capped like its teacher; a self-conditioned
    teacher is read as `SelfConditionedTeacher` and its student sees zeros as the estimate.
    Pairs: `flowlm.time_pairs` with the whole-path jump at probability 0.1 (as
    ``benchmarks/quality.py``).
    """
    vocab_size = data.vocab_size
    teacher = trained.module.get_submodule("network").requires_grad_(False)
    if not isinstance(teacher, DiT):
        raise TypeError(f"expected a DiT teacher, got {type(teacher).__name__}")
    interpolant = interpolant_of(recipe, vocab_size)
    if recipe.self_conditioning:
        teacher_predictor = fl.XPredictor(SelfConditionedTeacher(teacher))
    else:
        teacher_predictor = fl.XPredictor(capped(teacher, recipe))
    student = flm_network(recipe, vocab_size, two_time=True)
    distill.init_student(student, teacher)
    student_backbone = capped(student, recipe)
    if recipe.self_conditioning:
        student_backbone = fl.WithPrevious(student, None)
    student_map = fl.XPredMap(fl.XPredictor(student_backbone), interpolant, two_time=True)

    def loss(tokens: fl.Tokens, x_t: fl.State, t: fl.Time, s: fl.Time) -> fl.TokenLoss:
        return distill.semigroup_kl_loss(student_map, teacher_predictor, x_t, t, s)

    objective = jump_objective("v2", loss, vocab_size)
    distil_recipe = replace(
        recipe, lr=DISTILL_LR, warmup=DISTILL_WARMUP, schedule="constant", ema_decay=DISTILL_EMA
    )
    key = {"kind": "fmlm-v2", "recipe": dataclasses.asdict(recipe), "budget": budget}
    key |= {"teacher_steps": trained.steps, "teacher_loss": trained.loss, "length": data.length}
    modules = nn.ModuleDict({"network": student})
    done = train_for_budget(
        modules, objective, distil_recipe, data, budget, cache_path(cache, key), label
    )
    final = done.module.get_submodule("network").requires_grad_(False)
    backbone = fl.WithPrevious(final, None) if recipe.self_conditioning else capped(final, recipe)
    return fl.XPredMap(fl.XPredictor(backbone), interpolant, two_time=True)


# -- baselines --------------------------------------------------------------------------------


def train_mdlm(recipe: Recipe, data: Data, budget: float, cache: Path) -> MaskedDiffusion:
    """MDLM (``benchmarks/mdlm.py``) with the baseline's backbone and optimizer."""
    torch.manual_seed(recipe.seed)
    backbone = DiT(
        data.vocab_size + 1, dim=recipe.dim, depth=recipe.depth, heads=recipe.heads, dropout=0.0
    )
    model = MaskedDiffusion(backbone, data.vocab_size)
    key = {"kind": "mdlm", "recipe": dataclasses.asdict(recipe), "budget": budget}
    key |= {"length": data.length, "vocab_size": data.vocab_size}
    label = f"MDLM x{budget:g} s"
    trained = train_for_budget(
        model, model.loss, recipe, data, budget, cache_path(cache, key), label
    ).module
    if not isinstance(trained, MaskedDiffusion):
        raise TypeError(f"expected MaskedDiffusion, got {type(trained).__name__}")
    return trained


def train_ar(
    recipe: Recipe, data: Data, budget: float, cache: Path
) -> tuple[CausalTransformer, Trained]:
    """The autoregressive baseline, next-token CE (masked like FLM's loss)."""
    torch.manual_seed(recipe.seed)
    size = TrainingSettings(
        length=data.length, dim=recipe.dim, depth=recipe.depth, heads=recipe.heads
    )
    model = build_model(size, data.vocab_size)

    def objective(tokens: fl.Tokens, generator: torch.Generator) -> Tensor:
        return fl.masked_mean(model.token_nll(tokens), data.mask(tokens))

    key = {"kind": "ar", "recipe": dataclasses.asdict(recipe), "budget": budget}
    key |= {"length": data.length, "vocab_size": data.vocab_size}
    trained = train_for_budget(model, objective, recipe, data, budget, cache_path(cache, key), "AR")
    if not isinstance(trained.module, CausalTransformer):
        raise TypeError(f"expected a CausalTransformer, got {type(trained.module).__name__}")
    return trained.module, trained


def cache_path(cache: Path, key: dict[str, Any]) -> Path:
    return cache / f"study-{key['kind']}-{settings_key(key)}.pt"


# -- sampling and scoring ---------------------------------------------------------------------


def sample_rows(
    data: Data, sampler: Sampler, steps: tuple[int, ...], common: dict[str, Any]
) -> list[dict[str, Any]]:
    """Sample at each step count, score, and return one row per step count."""
    rows = []
    for n_steps in steps:
        start = time.process_time()
        tokens, nfe = sampler(n_steps)
        seconds = time.process_time() - start
        row = common | {"steps": n_steps, "nfe": nfe, "sample_cpu_seconds": seconds}
        row |= data.score(tokens) | {"examples": data.decode(tokens[:4])}
        shown = {key: round(value, 4) for key, value in row.items() if key in METRICS}
        print(f"   {common['model']} {common['arm']} {n_steps} step(s): {shown}", flush=True)
        rows.append(row)
    return rows


METRICS = ("real_words", "distinct_words", "judge_ppl", "entropy", "distinct_ratio")


def training_fields(trained: Trained, budget: float) -> dict[str, Any]:
    return {
        "budget": budget,
        "train_steps": trained.steps,
        "train_cpu_seconds": trained.cpu_seconds,
        "final_loss": trained.loss,
    }


def quality_of(rows: list[dict[str, Any]], task: str) -> float:
    """How good an FLM arm is (higher is better): the mean over its step counts of the
    real-word rate (words) or of minus the log judge perplexity (corpus)."""
    if task == "words":
        return sum(row["real_words"] for row in rows) / len(rows)
    return -sum(math.log(row["judge_ppl"]) for row in rows) / len(rows)


def run_part(part: Part, seed: int, cache: Path, quick: bool) -> dict[str, Any]:
    """Train and score every model of a part; return its rows, settings and load."""
    started, load_start = time.process_time(), load_average()
    print(f"study part {part.task}: load average {load_start}", flush=True)
    data = words_data(part, seed) if part.task == "words" else corpus_data(part, seed, cache, quick)
    rows: list[dict[str, Any]] = []
    base = {"part": part.task, "budget": None, "lever": None}
    rows += [
        base
        | {"model": "data", "arm": "data", "steps": None, "nfe": None}
        | data.score(data.data_samples)
    ]
    noise = torch.randn(
        (part.samples, part.length, data.vocab_size),
        generator=seeded_generator(seed, "study-noise"),
    )
    teachers: dict[tuple[str, float], tuple[Trained, Recipe]] = {}

    def flm(arm: Arm, multiple: float) -> list[dict[str, Any]]:
        recipe = replace(part.baseline, **arm.changes)
        budget = part.budget * multiple
        label = f"FLM {arm.name} x{multiple:g}"
        trained = train_flm(recipe, data, budget, cache, label)
        teachers[(arm.name, multiple)] = (trained, recipe)
        sampler = flm_sampler(trained, recipe, data.vocab_size, noise)
        common = base | {"model": "FLM", "arm": arm.name, "lever": arm.lever, "multiple": multiple}
        return sample_rows(data, sampler, part.flm_steps, common | training_fields(trained, budget))

    def fmlm(arm: Arm, multiple: float) -> list[dict[str, Any]]:
        trained, recipe = teachers[(arm.name, multiple)]
        label = f"FMLM v2 of {arm.name} x{multiple:g}"
        student = distil_fmlm(trained, recipe, data, part.distill_budget, cache, label)
        common = base | {"model": "FMLM v2", "arm": arm.name, "lever": arm.lever}
        common |= {"multiple": multiple, "budget": part.budget * multiple}
        common |= {"distill_budget": part.distill_budget}
        return sample_rows(data, flow_sampler(student, noise), part.fmlm_steps, common)

    def mdlm(multiple: float) -> list[dict[str, Any]]:
        budget = part.budget * multiple
        model = train_mdlm(part.baseline, data, budget, cache)

        def sampler(n_steps: int) -> tuple[fl.Tokens, int]:
            generator = seeded_generator(seed, "study-mdlm", n_steps)
            return model.sample(part.samples, part.length, n_steps, generator)

        common = base | {"model": "MDLM", "arm": "MDLM", "multiple": multiple, "budget": budget}
        return sample_rows(data, sampler, part.mdlm_steps, common)

    for arm in part.arms:
        rows += flm(arm, 1.0)
    arms = [arm for arm in part.arms if arm.lever not in ("baseline", "noise level")]
    ranked = sorted(
        arms,
        key=lambda arm: (
            -quality_of(
                [r for r in rows if r["model"] == "FLM" and r["arm"] == arm.name], part.task
            )
        ),
    )
    baseline_quality = quality_of(
        [r for r in rows if r["model"] == "FLM" and r["arm"] == BASELINE.name], part.task
    )
    best = ranked[: part.distilled]
    for arm in [BASELINE, *best]:
        rows += fmlm(arm, 1.0)
    rows += mdlm(1.0)
    ar, ar_run = train_ar(part.baseline, data, part.budget, cache)
    ar_generator = seeded_generator(seed, "study-ar")
    rows += sample_rows(
        data,
        lambda _: (generate(ar, part.samples, part.length, ar_generator), part.length),
        (part.length,),
        base | {"model": "AR", "arm": "AR", "multiple": 1.0} | training_fields(ar_run, part.budget),
    )
    best_quality = quality_of(
        [r for r in rows if r["model"] == "FLM" and r["arm"] == best[0].name], part.task
    )
    trend_arms = [BASELINE, best[0]] if best_quality > baseline_quality else [BASELINE]
    for multiple in (m for m in part.trend if m != 1.0):
        for arm in trend_arms:
            rows += flm(arm, multiple)
        rows += fmlm(trend_arms[-1], multiple)
        rows += mdlm(multiple)
    return {
        "part": part.task,
        "settings": dataclasses.asdict(part),
        "best_arms": [arm.name for arm in best],
        "trend_arms": [arm.name for arm in trend_arms] if part.trend else [],
        "judge": data.judge,
        "rows": rows,
        "cpu_seconds": time.process_time() - started,
        "load_average_start": load_start,
        "load_average_end": load_average(),
        "machine": machine_context(),
    }


# -- results ----------------------------------------------------------------------------------


def pick(rows: list[dict[str, Any]], **fields: Any) -> dict[str, Any] | None:
    """The first row whose fields have the given values."""
    return next((r for r in rows if all(r.get(k) == v for k, v in fields.items())), None)


def word_targets(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One-step FMLM against eight-step MDLM at the same budget, and against the data's
    distinct words (as many samples)."""
    data = pick(rows, model="data")
    targets: list[dict[str, Any]] = []
    for one_step in (r for r in rows if r["model"] == "FMLM v2" and r["steps"] == 1):
        mdlm = pick(rows, model="MDLM", steps=8, multiple=one_step["multiple"])
        if mdlm is None or data is None:
            continue
        name = f"FMLM v2 of {one_step['arm']} (x{one_step['multiple']:g} budget)"
        rate, bound = one_step["real_words"], mdlm["real_words"]
        distinct, needed = one_step["distinct_words"], DISTINCT_SHARE * data["distinct_words"]
        targets += [
            {
                "target": f"words: {name} 1-step real-word rate >= MDLM 8-step's",
                "value": rate,
                "reference": bound,
                "gap": rate - bound,
                "multiple": one_step["multiple"],
                "pass": rate >= bound,
            },
            {
                "target": f"words: {name} 1-step distinct words >= half the data's",
                "value": distinct,
                "reference": needed,
                "gap": distinct - needed,
                "multiple": one_step["multiple"],
                "pass": distinct >= needed,
            },
        ]
    return targets


def corpus_targets(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The quality benchmark's quick targets, on this part's models."""
    data, mdlm = pick(rows, model="data"), pick(rows, model="MDLM", steps=8)
    targets: list[dict[str, Any]] = []
    for one_step in (r for r in rows if r["model"] == "FMLM v2" and r["steps"] == 1):
        if data is None or mdlm is None:
            continue
        name = f"FMLM v2 of {one_step['arm']}"
        ppl, entropy = one_step["judge_ppl"], one_step["entropy"]
        targets += [
            {
                "target": f"corpus: {name} 1-step judge PPL <= MDLM 8-step's",
                "value": ppl,
                "reference": mdlm["judge_ppl"],
                "gap": ppl - mdlm["judge_ppl"],
                "multiple": 1.0,
                "pass": ppl <= mdlm["judge_ppl"],
            },
            {
                "target": f"corpus: {name} 1-step entropy within 5% of the data's",
                "value": entropy,
                "reference": data["entropy"],
                "gap": entropy / data["entropy"] - 1.0,
                "multiple": 1.0,
                "pass": abs(entropy / data["entropy"] - 1.0) <= 0.05,
            },
        ]
    return targets


def number(value: Any, digits: int = 3) -> str:
    return "-" if value is None else f"{float(value):.{digits}f}"


COLUMNS = {"words": ("real_words", "distinct_words"), "corpus": ("judge_ppl", "entropy")}
HEADINGS = {
    "real_words": "real words",
    "distinct_words": "distinct",
    "judge_ppl": "judge PPL",
    "entropy": "entropy",
}


def arm_table(part: dict[str, Any]) -> list[str]:
    """FLM arms at budget x1: steps, loss and the part's two measures at each step count."""
    rows, task = part["rows"], part["part"]
    flm = [r for r in rows if r["model"] == "FLM" and r["multiple"] == 1.0]
    steps = list(dict.fromkeys(r["steps"] for r in flm))
    columns = [f"{HEADINGS[c]} @{n}" for n in steps for c in COLUMNS[task]]
    lines = [
        "| arm | lever | train steps | train CPU s | loss | " + " | ".join(columns) + " |",
        "|---|---|---|---|---|" + "---|" * len(columns),
    ]
    for arm in dict.fromkeys(r["arm"] for r in flm):
        mine = {r["steps"]: r for r in flm if r["arm"] == arm}
        first = next(iter(mine.values()))
        cells = [
            number(mine[n][c], 0 if c == "distinct_words" else 3)
            for n in steps
            for c in COLUMNS[task]
        ]
        lines.append(
            f"| {arm} | {first['lever']} | {first['train_steps']} | "
            f"{first['train_cpu_seconds']:.1f} | {first['final_loss']:.3f} | "
            + " | ".join(cells)
            + " |"
        )
    return lines


def reference_table(part: dict[str, Any]) -> list[str]:
    """Data, AR, MDLM and FMLM rows at budget x1."""
    task = part["part"]
    columns = COLUMNS[task] + (("distinct_ratio",) if task == "words" else ("distinct_2",))
    lines = [
        "| model | of | steps | NFE | " + " | ".join(columns) + " | sample CPU s |",
        "|---|---|---|---|" + "---|" * (len(columns) + 1),
    ]
    for row in part["rows"]:
        if row["model"] == "FLM" or row.get("multiple", 1.0) != 1.0:
            continue
        cells = [number(row.get(c), 0 if c == "distinct_words" else 3) for c in columns]
        lines.append(
            f"| {row['model']} | {row['arm']} | {row['steps'] or '-'} | {row['nfe'] or '-'} | "
            + " | ".join(cells)
            + f" | {number(row.get('sample_cpu_seconds'), 2)} |"
        )
    return lines


def trend_table(part: dict[str, Any]) -> list[str]:
    """The words measures of the trend's models at each budget multiple."""
    rows = part["rows"]
    multiples = sorted({r["multiple"] for r in rows if r["model"] == "MDLM"})
    lines = [
        "| budget | model | steps | real words | distinct | train steps |",
        "|---|---|---|---|---|---|",
    ]
    for multiple in multiples:
        for row in rows:
            trend_model = row["model"] == "MDLM" or row["arm"] in part["trend_arms"]
            if row.get("multiple") != multiple or not trend_model or row["model"] == "AR":
                continue
            lines.append(
                f"| x{multiple:g} ({row['budget']:.0f} CPU s) | {row['model']} "
                f"{'' if row['model'] == 'MDLM' else row['arm']} | {row['steps']} | "
                f"{row['real_words']:.3f} | {row['distinct_words']:.0f} | "
                f"{row.get('train_steps', '-')} |"
            )
    return lines


def markdown(report: dict[str, Any]) -> str:
    lines = [
        "What makes FLM learn slowly at this scale: FLM arms, each the baseline with one lever "
        "changed, trained for the same process CPU seconds on one torch thread "
        "(`benchmarks/study.py`).",
        "",
    ]
    for part in report["parts"]:
        settings = part["settings"]
        base = settings["baseline"]
        lines += [
            f"### {part['part']}",
            "",
            f"Baseline: DiT width {base['dim']}, depth {base['depth']}, heads {base['heads']}, "
            f"batch {base['batch_size']}, AdamW lr {base['lr']} ({base['schedule']}, warm-up "
            f"{base['warmup']} steps), EMA {base['ema_decay']}, clock {base['clock']}, "
            f"{base['times']} times. Budget {settings['budget']:g} CPU s per arm (MDLM and AR "
            f"too), {settings['distill_budget']:g} CPU s per FMLM distillation; "
            f"{settings['samples']} samples per cell, fixed noise. Part CPU "
            f"{part['cpu_seconds']:.0f} s, load average {part['load_average_start']} at the "
            f"start and {part['load_average_end']} at the end.",
            "",
        ]
        if part["judge"] is not None:
            lines += [
                f"Judge: perplexity {part['judge']['validation_ppl']:.3f} on "
                f"{part['judge']['validation_windows']} held-out windows.",
                "",
            ]
        lines += ["FLM arms (budget x1):", "", *arm_table(part), ""]
        lines += ["Data, FMLM (one-stage v2), MDLM and AR (budget x1):", ""]
        lines += [*reference_table(part), ""]
        lines += [f"Best arms (distilled): {', '.join(part['best_arms']) or 'none'}.", ""]
        if part["trend_arms"]:
            lines += ["Trend with the training budget:", "", *trend_table(part), ""]
    lines += ["### Targets", "", "| target | value | reference | gap | verdict |"]
    lines += ["|---|---|---|---|---|"]
    for target in report["targets"]:
        lines.append(
            f"| {target['target']} | {number(target['value'])} | {number(target['reference'])} "
            f"| {number(target['gap'])} | {verdict(target['pass'])} |"
        )
    return "\n".join(lines)


def plot(report: dict[str, Any], path: Path) -> None:
    """Words: real-word rate per arm and its trend; corpus: judge PPL per arm."""
    figure = Figure(figsize=(13, 9))
    axes = figure.subplots(2, 2).flatten()
    parts = {part["part"]: part for part in report["parts"]}
    for axis, (task, measure, label) in zip(
        axes[:2],
        (("words", "real_words", "real-word rate"), ("corpus", "judge_ppl", "judge perplexity")),
        strict=True,
    ):
        if task not in parts:
            axis.set_visible(False)
            continue
        rows = parts[task]["rows"]
        flm = [r for r in rows if r["model"] == "FLM" and r["multiple"] == 1.0]
        arms = list(dict.fromkeys(r["arm"] for r in flm))
        steps = list(dict.fromkeys(r["steps"] for r in flm))
        height = 0.8 / len(steps)
        for k, n_steps in enumerate(steps):
            values = [
                next(r[measure] for r in flm if r["arm"] == a and r["steps"] == n_steps)
                for a in arms
            ]
            positions = [i + k * height for i in range(len(arms))]
            axis.barh(positions, values, height=height, label=f"FLM {n_steps} steps")
        axis.set_yticks([i + 0.4 - height / 2 for i in range(len(arms))], arms, fontsize=8)
        axis.invert_yaxis()
        references = [
            (pick(rows, model="MDLM", steps=8, multiple=1.0), "MDLM 8 steps", "black", "--"),
            (pick(rows, model="AR"), "AR", "grey", ":"),
            (pick(rows, model="data"), "data", "green", "-"),
        ]
        for row, name, color, style in references:
            if row is not None:
                axis.axvline(row[measure], color=color, linestyle=style, label=name)
        one_step = pick(rows, model="FMLM v2", arm=BASELINE.name, steps=1, multiple=1.0)
        if one_step is not None:
            axis.axvline(
                one_step[measure], color="red", linestyle="-.", label="FMLM 1 step (baseline)"
            )
        if measure == "judge_ppl":
            axis.set_xscale("log")
        axis.set_xlabel(label)
        axis.set_title(f"{task}: FLM arms at equal CPU budget", fontsize=10)
        axis.legend(fontsize=7)
        axis.grid(alpha=0.3, axis="x")
    trend_axes = axes[2:]
    if "words" not in parts or not parts["words"]["trend_arms"]:
        for axis in trend_axes:
            axis.set_visible(False)
    else:
        words = parts["words"]
        rows = words["rows"]
        series: list[tuple[str, dict[str, Any]]] = [("MDLM 8 steps", {"model": "MDLM", "steps": 8})]
        for arm in words["trend_arms"]:
            series.append((f"FLM {arm}, 8 steps", {"model": "FLM", "arm": arm, "steps": 8}))
        last = words["trend_arms"][-1]
        series.append((f"FMLM of {last}, 1 step", {"model": "FMLM v2", "arm": last, "steps": 1}))
        for axis, measure, label in zip(
            trend_axes,
            ("real_words", "distinct_words"),
            ("real-word rate", "distinct real words"),
            strict=True,
        ):
            for name, fields in series:
                mine = [r for r in rows if all(r.get(k) == v for k, v in fields.items())]
                mine.sort(key=lambda r: r["budget"])
                axis.plot(
                    [r["budget"] for r in mine], [r[measure] for r in mine], marker="o", label=name
                )
            if measure == "distinct_words":
                data = pick(rows, model="data")
                if data is not None:
                    axis.axhline(
                        DISTINCT_SHARE * data["distinct_words"],
                        color="green",
                        linestyle="--",
                        label="half the data's",
                    )
            axis.set_xscale("log", base=2)
            axis.set_xlabel("training budget (process CPU s)")
            axis.set_ylabel(label)
            axis.set_title(f"words: {label} against the training budget", fontsize=10)
            axis.legend(fontsize=7)
            axis.grid(alpha=0.3)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)  # a PNG drawn by matplotlib's Agg canvas


def write_report(out_dir: Path, plot_path: Path) -> list[dict[str, Any]]:
    """Merge the parts done so far into ``study.json``, ``study.md`` and the plot."""
    parts = [
        json.loads(path.read_text())
        for task in PARTS
        if (path := out_dir / "cache" / f"study-{task}.json").exists()
    ]
    if not parts:
        print(
            f"error: no part of the study in {out_dir / 'cache'}: run a --part first",
            file=sys.stderr,
        )
        raise SystemExit(2)
    targets: list[dict[str, Any]] = []
    for part in parts:
        targets += (
            word_targets(part["rows"]) if part["part"] == "words" else corpus_targets(part["rows"])
        )
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


def add_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--part", choices=(*PARTS, "all", "report"), default="all")
    parser.add_argument("--plot", type=Path, default=None, help="default: <out-dir>/study.png")


def main() -> None:
    arguments = parse_flags(__doc__, add_flags)
    out_dir: Path = arguments.out_dir
    cache = out_dir / "cache"
    parts = QUICK_PARTS if arguments.quick else PARTS_OF_RUN
    chosen = {"all": PARTS, "report": ()}.get(arguments.part, (arguments.part,))
    for task in chosen:
        result = run_part(parts[task], arguments.seed, cache, arguments.quick)
        cache.mkdir(parents=True, exist_ok=True)
        (cache / f"study-{task}.json").write_text(json.dumps(result, indent=2) + "\n")
    targets = write_report(out_dir, arguments.plot or out_dir / "study.png")
    print_verdicts(targets)


if __name__ == "__main__":
    main()
