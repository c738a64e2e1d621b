"""Plot the decoding-accuracy clock gamma = kappa(t) for several vocabulary sizes.

python docs/scripts/plot_clock.py                       # writes docs/assets/clock.png
python docs/scripts/plot_clock.py --out /tmp/clock.png
"""

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch

import flowlm as fl

OUT = Path(__file__).resolve().parents[1] / "assets" / "clock.png"
VOCAB_SIZES = (2, 8, 64, 1024, 30522, 50258)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()

    t = torch.linspace(0.0, 1.0, 801, dtype=torch.float64)
    figure, axis = plt.subplots(figsize=(6.0, 4.0), dpi=110)
    axis.plot(t, t, color="0.6", linestyle="--", linewidth=1, label="Identity (γ = t)")
    colors = plt.get_cmap("viridis")
    for i, vocab_size in enumerate(VOCAB_SIZES):
        gamma = fl.TokenAccuracy(vocab_size)(t)
        color = colors(i / (len(VOCAB_SIZES) - 1))
        axis.plot(t, gamma, color=color, linewidth=1.6, label=f"V = {vocab_size:,}")
    axis.set_xlabel("model time t (what the network sees)")
    axis.set_ylabel("path time γ = κ(t)")
    axis.set_title("Decoding-accuracy clock: TokenAccuracy(V)")
    axis.set_xlim(0, 1)
    axis.set_ylim(0, 1)
    axis.grid(alpha=0.3)
    axis.legend(loc="lower right", fontsize=8)
    figure.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(args.out, metadata={"Software": None})
    print(f"wrote {args.out} ({args.out.stat().st_size / 1024:.0f} KiB)")


if __name__ == "__main__":
    main()
