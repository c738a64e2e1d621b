"""Prompt continuation on the King James Bible, judged by the AR judge: FMLM, FLM, MDLM and AR.

The prompts are the first ``k`` characters of evenly spaced windows of the held-out books
(V = 63); every model writes the remaining ``L - k`` characters. All models have the same
backbone size and are trained on the same batches for the same budget with the recipe of
`harness.train_on_tokens` (checkpoints cached under ``<out-dir>/cache/``):

- conditional FLM: cross-entropy on the unknown positions with the known ones at time 1,
  contexts from `flowlm.prefix_context` with ``p_uncond`` = 0.1 (as the examples train);
  sampled by `flowlm.rollout` with ``context=`` (Euler x-prediction map, argmax);
- its one-step conditional FMLM: the v2 semigroup KL distillation of that FLM, teacher and
  student seeing the same prefix context, for a further distillation budget;
- MDLM conditioned by leaving the prompt unmasked (ancestral sampler, SUBS keeps it);
- the autoregressive model continuing the prompt token by token (temperature 1, KV cache);
- for reference, an unconditional FLM conditioned by `flowlm.Replacement`.

The judge (``benchmarks/judge.py``) scores the conditional NLL of each continuation given its
prompt, i.e. the judge's log-probabilities of the continuation tokens only,

    NLL = -(1 / (L - k)) sum_{i > k} log p_judge(x_i | x_<i),

averaged over prompts (per-token perplexity exp(NLL)), beside the unigram entropy and the
distinct-2 and distinct-3 fractions of the continuations (NLL alone rewards mode collapse).
The "data" row is the true held-out continuations; "data, another prompt" gives each prompt
the true continuation of the next window, the NLL of good text that ignores its prompt. The
prompt gain of a row is how much its continuations depend on their own prompts,

    gain = mean over prompts of NLL(continuation | the prompt two windows back) - NLL,

in nats per character: 0 for continuations blind to their prompt (e.g. "data, another
prompt", whose continuations are already one window off).

Usage:
    python benchmarks/prompt_continuation.py                  # about 16 CPU-minutes
    python benchmarks/prompt_continuation.py --quick --out-dir /tmp/pc     # seconds

Writes ``<out-dir>/prompt_continuation.json`` and ``prompt_continuation.md`` and prints one
PASS/FAIL line per comparison.
"""

import argparse
import dataclasses
import math
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import judge as judge_module
import quality
import torch
from autoregressive import train as train_autoregressive
from conditional import (
    Sampler,
    flm_loss,
    flow_sampler,
    fmlm_loss,
    mdlm_sampler,
    replacement_sampler,
)
from harness import (
    Phase,
    TrainingSettings,
    checkpoint_path,
    describe_machine,
    flm_interpolant,
    load_average,
    load_corpus,
    machine_context,
    parse_flags,
    phase_table,
    positive_int,
    print_verdicts,
    seeded_generator,
    stopwatch,
    timed,
    train_on_tokens,
    verdict,
    write_results,
)
from jaxtyping import Float
from mdlm import MaskedDiffusion
from torch import Tensor

import flowlm as fl
from flowlm import Context, Tokens, distill
from flowlm.backbones import CausalTransformer, KVCache
from flowlm.data import TextCorpus
from flowlm.metrics import DistinctN, TokenEntropy

P_UNCOND = 0.1
"""Rows trained (and distilled) without a prompt, as ``examples/flm.py --p-uncond`` defaults."""
SCORING_BATCH = 256
SHOWN_EXAMPLES = 2
GAIN_SHIFT = 2
"""The prompt gain scores each continuation after the prompt this many windows back."""
ENTROPY_TOLERANCE = 0.05


@dataclass(frozen=True)
class Preset:
    """What a run trains and samples.

    Attributes:
        model: the settings shared by AR, MDLM and both FLMs (windows of ``model.length``).
        judge: the judge's settings (the same length).
        distill_steps, distill_lr: the FMLM distillation's budget and peak learning rate.
        prompt: known characters ``k`` at the start of each window.
        samples: prompts (held-out windows), one continuation each per cell.
        flow_steps: step counts of FLM, MDLM and replacement (must hold 1 and 8).
        fmlm_steps: step counts of FMLM (must hold 1).
    """

    model: TrainingSettings
    judge: TrainingSettings
    distill_steps: int
    distill_lr: float
    prompt: int
    samples: int
    flow_steps: tuple[int, ...]
    fmlm_steps: tuple[int, ...]


PRESETS: dict[str, Preset] = {
    "smoke": Preset(
        model=quality.PRESETS["smoke"].model,
        judge=judge_module.JUDGES["smoke"],
        distill_steps=2,
        distill_lr=1e-3,
        prompt=4,
        samples=16,
        flow_steps=(1, 8),
        fmlm_steps=(1,),
    ),
    "default": Preset(
        model=replace(quality.PRESETS["quick"].model, steps=2000, log_every=250),
        judge=judge_module.JUDGES["quick"],
        distill_steps=600,
        distill_lr=5e-4,
        prompt=16,
        samples=512,
        flow_steps=(1, 2, 4, 8, 16),
        fmlm_steps=(1, 2, 4),
    ),
}

SAMPLERS = {
    "AR": "multinomial at temperature 1 after the prompt, KV cache (one call per token)",
    "FLM": "rollout with the prompt held at time 1, Euler x-prediction map, argmax",
    "FMLM": "two-time map with the prompt held at time 1 (t = s = 1 there), argmax",
    "MDLM": "ancestral from the prompt unmasked and the rest masked, float64 Gumbel-max",
    "replacement": "unconditional FLM, prompt re-noised to the current time before each step",
}


def prompts_with_dropout(tokens: Tokens, generator: torch.Generator) -> Context:
    """A random prefix per row, dropped with probability `P_UNCOND` (`flowlm.prefix_context`)."""
    return fl.prefix_context(tokens, p_uncond=P_UNCOND, generator=generator)


def prompt_length(context: Context) -> int:
    """``k`` when the context is the first ``k`` positions of every row, else an error."""
    k = int(context.known[0].sum())
    if not torch.equal(context.known, Context.prefix(context.tokens, k).known):
        raise ValueError("a continuation needs the same prompt length k on every row")
    return k


def ar_sampler(model: CausalTransformer) -> Sampler:
    """The AR model continues each prompt: BOS and the prompt in one call, then one per token.

    The step count is ignored: an AR continuation makes ``L - k`` calls.
    """

    @torch.no_grad()
    def sample(context: Context, steps: int, generator: torch.Generator) -> tuple[Tokens, int]:
        k, length = prompt_length(context), context.tokens.shape[1]
        prompt = context.tokens[:, :k]
        inputs = torch.cat([torch.full_like(prompt[:, :1], model.bos), prompt], dim=1)
        caches = [KVCache() for _ in model.blocks]
        written = [prompt]
        for _ in range(length - k):
            logits = model.next_token_logits(inputs, caches)[:, -1]
            inputs = torch.multinomial(torch.softmax(logits.float(), -1), 1, generator=generator)
            written.append(inputs)
        return torch.cat(written, dim=1), length - k

    return sample


class ContinuationScorer:
    """The judge's conditional NLL of continuations given their prompts, entropy, distinct-n."""

    def __init__(self, judge: CausalTransformer, context: Context, corpus: TextCorpus) -> None:
        self.judge = judge
        self.context = context
        self.corpus = corpus
        self.prompt = prompt_length(context)

    @torch.no_grad()
    def nll(self, tokens: Tokens) -> Float[Tensor, " batch"]:
        """Per prompt: the mean of -log p_judge(x_i | x_<i) over the continuation positions."""
        rows = [
            self.judge.token_nll(batch)[:, self.prompt :].mean(1)
            for batch in tokens.split(SCORING_BATCH)
        ]
        return torch.cat(rows).double()

    def __call__(self, tokens: Tokens) -> tuple[dict[str, object], Float[Tensor, " batch"]]:
        """The row's figures and the per-prompt NLL (for paired comparisons)."""
        continuation = tokens[:, self.prompt :]
        entropy = TokenEntropy()
        entropy.update(continuation)
        distinct = {n: DistinctN(self.corpus.tokenizer.vocab_size, n=n) for n in (2, 3)}
        for metric in distinct.values():
            metric.update(continuation)
        nll = self.nll(tokens)
        others = torch.cat([tokens[:, : self.prompt].roll(GAIN_SHIFT, 0), continuation], dim=1)
        known = self.context.known
        shown = self.corpus.tokenizer.decode_batch(tokens[:SHOWN_EXAMPLES, : self.prompt])
        written = self.corpus.tokenizer.decode_batch(continuation[:SHOWN_EXAMPLES])
        row: dict[str, object] = {
            "nll": nll.mean().item(),
            "nll_se": (nll.std() / math.sqrt(len(nll))).item(),
            "prompt_gain": (self.nll(others) - nll).mean().item(),
            "perplexity": math.exp(nll.mean().item()),
            "entropy": entropy.compute().item(),
            "distinct_2": distinct[2].compute().item(),
            "distinct_3": distinct[3].compute().item(),
            "known_exact": bool(torch.equal(tokens[known], self.context.tokens[known])),
            "samples": len(tokens),
            "examples": [f"{p}|{w}" for p, w in zip(shown, written, strict=True)],
        }
        return row, nll


def train_models(
    preset: Preset, config: TrainingSettings, corpus: TextCorpus, cache: Path, phases: list[Phase]
) -> dict[str, Any]:
    """Train (or load) AR, MDLM, conditional and unconditional FLM and the conditional FMLM."""
    vocab_size = corpus.tokenizer.vocab_size
    settings: dict[str, object] = dataclasses.asdict(config)
    path_of_flm = flm_interpolant(vocab_size)
    models: dict[str, Any] = {}

    path = checkpoint_path(cache, "ar", settings)
    with timed("AR: train", phases, cached=path.exists()):
        models["AR"] = train_autoregressive(config, corpus, path)

    path = checkpoint_path(cache, "mdlm", settings)
    with timed("MDLM: train", phases, cached=path.exists()):
        torch.manual_seed(config.seed)
        mdlm = MaskedDiffusion(quality.backbone(config, vocab_size + 1), vocab_size)
        models["MDLM"] = train_on_tokens(mdlm, mdlm.loss, config, corpus, path, "MDLM")

    flm_path = checkpoint_path(cache, "flm-prefix", settings | {"p_uncond": P_UNCOND})
    with timed("conditional FLM: train", phases, cached=flm_path.exists()):
        torch.manual_seed(config.seed)
        network = quality.backbone(config, vocab_size)
        objective = flm_loss(fl.XPredictor(network), path_of_flm, vocab_size, prompts_with_dropout)
        trained = train_on_tokens(network, objective, config, corpus, flm_path, "conditional FLM")
        teacher = quality.as_dit(trained).requires_grad_(False)
        models["FLM"] = fl.XPredMap(fl.XPredictor(teacher), path_of_flm)

    path = checkpoint_path(cache, "flm", settings)
    with timed("unconditional FLM: train", phases, cached=path.exists()):
        unconditional = quality.train_flm(config, corpus, path)
        models["replacement"] = fl.XPredMap(fl.XPredictor(unconditional), path_of_flm)

    distill_config = replace(
        config,
        steps=preset.distill_steps,
        lr=preset.distill_lr,
        warmup=min(20, preset.distill_steps),
        ema_decay=0.99,
        log_every=max(1, preset.distill_steps // 5),
    )
    key: dict[str, object] = dataclasses.asdict(distill_config)
    key |= {"teacher": flm_path.name, "p_uncond": P_UNCOND}
    path = checkpoint_path(cache, "fmlm-prefix-v2", key)
    with timed("conditional FMLM: distil", phases, cached=path.exists()):
        torch.manual_seed(config.seed)
        network = quality.backbone(config, vocab_size, two_time=True)
        distill.init_student(network, teacher)
        student = fl.XPredMap(fl.XPredictor(network), path_of_flm, two_time=True)
        objective = fmlm_loss(
            student, fl.XPredictor(teacher), path_of_flm, vocab_size, prompts_with_dropout
        )
        label = "conditional FMLM"
        trained = train_on_tokens(network, objective, distill_config, corpus, path, label, "fmlm")
        models["FMLM"] = fl.XPredMap(fl.XPredictor(quality.as_dit(trained)), path_of_flm, True)
    models["distill"] = dataclasses.asdict(distill_config)
    return models


def paired(nll: dict[str, Tensor], first: str, second: str) -> dict[str, float]:
    """Mean and standard error over prompts of NLL(first) - NLL(second), same prompts."""
    difference = nll[first] - nll[second]
    return {
        "difference": difference.mean().item(),
        "difference_se": (difference.std() / math.sqrt(len(difference))).item(),
    }


def comparisons(rows: list[dict[str, object]], nll: dict[str, Tensor]) -> list[dict[str, object]]:
    """The verdicts: one-step FMLM against 8-step MDLM, AR and 8-step FLM (paired NLL), the
    entropies of one-step FMLM and 8-step MDLM against the data's, trained conditioning against
    replacement at 8 steps (NLL and prompt gain), and the prompts returned exactly."""
    by_name = {str(row["name"]): row for row in rows}
    found: list[dict[str, object]] = []
    for other, label in (("MDLM 8", "8-step MDLM"), ("AR", "AR"), ("FLM 8", "8-step FLM")):
        found.append(
            {
                "target": f"one-step FMLM continuation NLL <= {label}'s",
                "value": by_name["FMLM 1"]["nll"],
                "reference": by_name[other]["nll"],
                "pass": float(by_name["FMLM 1"]["nll"]) <= float(by_name[other]["nll"]),  # type: ignore[arg-type]
            }
            | paired(nll, "FMLM 1", other)
        )
    for name, label in (("FMLM 1", "one-step FMLM"), ("MDLM 8", "8-step MDLM")):
        entropy, data = float(by_name[name]["entropy"]), float(by_name["data"]["entropy"])  # type: ignore[arg-type]
        found.append(
            {
                "target": f"{label} continuation entropy within 5% of the data's",
                "value": entropy,
                "reference": data,
                "pass": abs(entropy / data - 1.0) <= ENTROPY_TOLERANCE,
            }
        )
    found.append(
        {
            "target": "8-step conditional FLM continuation NLL < replacement's at 8 steps",
            "value": by_name["FLM 8"]["nll"],
            "reference": by_name["replacement 8"]["nll"],
            "pass": float(by_name["FLM 8"]["nll"]) < float(by_name["replacement 8"]["nll"]),  # type: ignore[arg-type]
        }
        | paired(nll, "FLM 8", "replacement 8")
    )
    gain, reference = by_name["FLM 8"]["prompt_gain"], by_name["replacement 8"]["prompt_gain"]
    found.append(
        {
            "target": "8-step conditional FLM prompt gain > replacement's at 8 steps",
            "value": gain,
            "reference": reference,
            "pass": float(gain) > float(reference),  # type: ignore[arg-type]
        }
    )
    known = [bool(row["known_exact"]) for row in rows]
    found.append(
        {
            "target": "every sampler returns the prompt exactly (rows)",
            "value": sum(known),
            "pass": all(known),
        }
    )
    return found


def describe(value: object, digits: int) -> str:
    return "-" if value is None else f"{float(value):.{digits}f}"  # type: ignore[arg-type]


def markdown(rows: list[dict[str, object]], run: dict[str, Any]) -> str:
    model, judge_report, k = run["model"], run["judge"], run["prompt"]
    lines = [
        f"Prompt continuation judged by the AR judge. Character-level King James Bible (V = {run['vocab_size']}), windows of "
        f"L = {model['length']}; prompts are the first k = {k} characters of {run['samples']} "
        f"evenly spaced held-out windows, each model writes the other {model['length'] - k}. "
        f"AR, MDLM and both FLMs: {model['steps']} steps of batch {model['batch_size']} (same "
        f"batches), lr {model['lr']}, EMA {model['ema_decay']}, width {model['dim']}, depth "
        f"{model['depth']}, heads {model['heads']} (DiT; AR a causal transformer of the same "
        f"size). Conditional FLM: prefix contexts, p_uncond {run['p_uncond']}. FMLM: that FLM plus "
        f"{run['distill']['steps']} v2 distillation steps (teacher and student see the same "
        f"prefix context). Replacement: an unconditional FLM of the same budget.",
        f"Judge: causal transformer width {judge_report['config']['dim']}, depth "
        f"{judge_report['config']['depth']}, {judge_report['config']['steps']} steps; perplexity "
        f"{judge_report['validation_ppl']:.3f} on {judge_report['validation_windows']} held-out "
        "windows. NLL: the judge's mean -log p of the continuation characters given the "
        "prompt (nats per character, ± standard error over prompts); PPL = exp(NLL). Entropy "
        "and distinct-n are of the continuations; prompt gain: NLL of the continuation after the "
        "prompt two windows back minus NLL after its own (0: blind to the prompt).",
        "Samplers: " + "; ".join(f"{name}: {text}" for name, text in SAMPLERS.items()) + ".",
        f"Machine: {describe_machine(run['machine'])}; load average at the start "
        f"{', '.join(f'{v:.2f}' for v in run['load_average_start'])}. "
        f"{run['process_cpu_seconds']:.0f} CPU s in all ({run['wall_seconds']:.0f} s wall).",
        "",
        "| method | steps | NFE | NLL / char | PPL | prompt gain | entropy | distinct-2 | "
        "distinct-3 | prompt exact | CPU s / sample |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['method']} | {row['steps'] if row['steps'] is not None else '-'} | "
            f"{row['nfe'] if row['nfe'] is not None else '-'} | "
            f"{describe(row['nll'], 3)} ± {describe(row['nll_se'], 3)} | "
            f"{describe(row['perplexity'], 2)} | {describe(row['prompt_gain'], 3)} | "
            f"{describe(row['entropy'], 3)} | "
            f"{describe(row['distinct_2'], 3)} | {describe(row['distinct_3'], 3)} | "
            f"{row['known_exact']} | {describe(row['cpu_seconds_per_sample'], 5)} |"
        )
    lines += ["", "Comparisons (as measured; paired over the same prompts):", ""]
    lines += ["| comparison | value | reference | difference ± s.e. | verdict |"]
    lines += ["|---|---|---|---|---|"]
    for target in run["targets"]:
        difference = (
            f"{target['difference']:+.3f} ± {target['difference_se']:.3f}"
            if "difference" in target
            else "-"
        )
        lines.append(
            f"| {target['target']} | {describe(target['value'], 3)} | "
            f"{describe(target.get('reference'), 3)} | {difference} | "
            f"{verdict(target['pass'])} |"
        )
    lines += ["", "Examples (prompt|continuation, the first two prompts):", ""]
    for row in rows:
        shown = " / ".join(f"`{text!r}`" for text in row["examples"])  # type: ignore[union-attr]
        lines.append(f"- {row['name']}: {shown}")
    lines += ["", "Phases (thread CPU time):", ""]
    lines += phase_table(run["phases"])
    return "\n".join(lines)


def add_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", choices=sorted(PRESETS), default="default")
    parser.add_argument("--prompt", type=positive_int, help="known characters k (preset's)")
    parser.add_argument("--samples", type=positive_int, help="prompts (preset's)")


def main(argv: list[str] | None = None) -> None:
    arguments = parse_flags(__doc__, add_flags, argv)
    preset = PRESETS["smoke" if arguments.quick else arguments.preset]
    preset = replace(
        preset,
        prompt=arguments.prompt or preset.prompt,
        samples=arguments.samples or preset.samples,
    )
    config, results = replace(preset.model, seed=arguments.seed), arguments.out_dir
    if not preset.prompt < config.length:
        print(
            f"error: --prompt {preset.prompt} leaves nothing to continue in windows of "
            f"{config.length}",
            file=sys.stderr,
        )
        raise SystemExit(2)
    started_cpu, started_wall, load_start = time.process_time(), time.perf_counter(), load_average()
    print(f"prompt continuation: load average {load_start}", flush=True)
    phases: list[Phase] = []
    corpus = load_corpus()
    with timed("judge", phases, cached=judge_module.judge_path(results, config.length).exists()):
        judge = judge_module.load_or_train(preset.judge, corpus, results)
        judge_report: dict[str, Any] = judge_module.held_out_report(judge, corpus, config.length)
        judge_report["config"] = dataclasses.asdict(preset.judge)
    models = train_models(preset, config, corpus, results / "cache", phases)

    windows = corpus.fixed_windows("validation", config.length, count=preset.samples)
    context = Context.prefix(windows, preset.prompt)
    score = ContinuationScorer(judge, context, corpus)
    rows: list[dict[str, object]] = []
    nll: dict[str, Tensor] = {}

    def add_row(name: str, method: str, steps: int | None, nfe: int | None, tokens: Tokens) -> None:
        row, nll[name] = score(tokens)
        rows.append({"name": name, "method": method, "steps": steps, "nfe": nfe} | row)

    prompts, continuations = windows[:, : preset.prompt], windows[:, preset.prompt :]
    for name, tokens in (
        ("data", windows),
        ("data, another prompt", torch.cat([prompts, continuations.roll(1, 0)], dim=1)),
    ):
        add_row(name, name, None, None, tokens)
        rows[-1] |= {"seconds_per_sample": None, "cpu_seconds_per_sample": None}
    vocab_size = corpus.tokenizer.vocab_size
    samplers: list[tuple[str, str, Sampler, tuple[int, ...]]] = [
        ("AR", "AR", ar_sampler(models["AR"]), (config.length - preset.prompt,)),
        ("FMLM", "conditional FMLM", flow_sampler(models["FMLM"], vocab_size), preset.fmlm_steps),
        ("FLM", "conditional FLM", flow_sampler(models["FLM"], vocab_size), preset.flow_steps),
        ("MDLM", "MDLM, prompt unmasked", mdlm_sampler(models["MDLM"]), preset.flow_steps),
        (
            "replacement",
            "unconditional FLM + replacement",
            replacement_sampler(models["replacement"], flm_interpolant(vocab_size), vocab_size),
            preset.flow_steps,
        ),
    ]
    for short, method, sampler, step_counts in samplers:
        with timed(f"{method}: sample and score", phases):
            for steps in step_counts:
                generator = seeded_generator(config.seed, "continuation", steps)
                with stopwatch() as seconds, torch.no_grad():
                    tokens, nfe = sampler(context, steps, generator)
                name = short if short == "AR" else f"{short} {steps}"
                add_row(name, method, steps, nfe, tokens)
                rows[-1] |= {
                    "seconds_per_sample": seconds.wall / len(tokens),
                    "cpu_seconds_per_sample": seconds.cpu / len(tokens),
                }
                print(
                    f"   {name}: NLL {rows[-1]['nll']:.3f}, entropy {rows[-1]['entropy']:.3f}, "
                    f"{rows[-1]['examples'][0]!r}",  # type: ignore[index]
                    flush=True,
                )
    targets = comparisons(rows, nll)
    run: dict[str, Any] = {
        "benchmark": "prompt_continuation",
        "preset": "smoke" if arguments.quick else arguments.preset,
        "quick": bool(arguments.quick),
        "vocab_size": vocab_size,
        "prompt": preset.prompt,
        "samples": preset.samples,
        "p_uncond": P_UNCOND,
        "model": dataclasses.asdict(config),
        "distill": models["distill"],
        "judge": judge_report,
        "samplers": SAMPLERS,
        "rows": rows,
        "targets": targets,
        "phases": [dataclasses.asdict(phase) for phase in phases],
        "process_cpu_seconds": time.process_time() - started_cpu,
        "wall_seconds": time.perf_counter() - started_wall,
        "load_average_start": load_start,
        "load_average_end": load_average(),
        "machine": machine_context(),
    }
    write_results(results, "prompt_continuation", run, markdown(rows, run))
    print_verdicts(targets)


if __name__ == "__main__":
    main()
