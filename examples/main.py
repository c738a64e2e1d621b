"""The main job: train a small FLM on the embedded corpus, distil it into a one-step FMLM.

    python examples/main.py            # 9.3 min on a 2-core CPU at load 1-2.6 (README: how measured)
    python examples/main.py --smoke    # seconds: tiny models, a few steps, in runs/smoke/
    python examples/main.py --tokenizer char --flm-steps 1500   # the character-level variant

Runs examples/flm.py on a BPE of 2,048 tokens trained on the corpus (checkpoint
``runs/flm.pt``), then examples/fmlm.py with the v2 semigroup distillation (checkpoint
``runs/fmlm.pt``), and ends with a table of one-step FMLM
against one-step and eight-step FLM: network calls, entropy and the corpus measures. Every
number also lands in ``runs/flm.json`` and ``runs/fmlm.json``. Re-running resumes both stages
from their checkpoints. ``--smoke`` works in ``runs/smoke/``, so a smoke model is never resumed
as the real one (and the examples refuse to resume a checkpoint across --smoke anyway).
"""

from pathlib import Path
from typing import Any

import flm
import fmlm

from flowlm.train import ArgumentParser

TOKENIZER = "bpe:2048"
"""Known words of the samples: 0.68 against 0.11 at character level for the same wall time
(docs/guides/paper.md, "The main job's tokenizer")."""
FLM_STEPS = 750
FMLM_STEPS = 120


def main(argv: list[str] | None = None) -> dict[str, dict[str, Any]]:
    """Train, distil, and return the comparison rows."""
    parser = ArgumentParser(description=__doc__)  # configuration errors: one line, exit code 2
    parser.add_argument("--smoke", action="store_true", help="tiny models, a few steps (CI)")
    parser.add_argument("--runs", type=Path, default=Path("runs"), help="checkpoints and JSON")
    parser.add_argument("--method", choices=fmlm.METHODS, default="v2")
    parser.add_argument("--tokenizer", default=TOKENIZER, help="char | bpe:N | ...")
    parser.add_argument("--flm-steps", type=int, default=FLM_STEPS, help="FLM training steps")
    parser.add_argument("--fmlm-steps", type=int, default=FMLM_STEPS, help="distillation steps")
    arguments = parser.parse_args(argv)
    smoke = ["--smoke"] if arguments.smoke else []
    flm_steps = (
        [] if arguments.smoke else ["--steps", str(arguments.flm_steps), "--eval-every", "250"]
    )
    fmlm_steps = [] if arguments.smoke else ["--steps", str(arguments.fmlm_steps)]
    runs = arguments.runs / "smoke" if arguments.smoke else arguments.runs
    teacher = runs / "flm.pt"

    tokenizer = ["--tokenizer", arguments.tokenizer]
    flm.main(
        [
            *smoke,
            *flm_steps,
            *tokenizer,
            "--out",
            str(teacher),
            "--resume",
            "--json",
            str(runs / "flm.json"),
        ]
    )
    distilled = fmlm.main(
        [
            *smoke,
            *fmlm_steps,
            "--teacher",
            str(teacher),
            "--method",
            arguments.method,
            "--out",
            str(runs / "fmlm.pt"),
            "--resume",
            "--json",
            str(runs / "fmlm.json"),
        ]
    )
    rows = {
        f"FMLM {arguments.method}, 1 step": distilled["steps"]["1"],
        "FLM, 1 step": distilled["teacher_steps"]["1"],
        "FLM, 8 steps": distilled["teacher_steps"]["8"],
    }
    print("\none network call of FMLM against FLM (same starting noise):")
    for name, metrics in rows.items():
        shown = ", ".join(f"{key} {metrics[key]:.4g}" for key in metrics if key != "samples")
        print(f"  {name:<18} {shown}")
    return rows


if __name__ == "__main__":
    main()
