"""Draws images/pipeline.png, the README's figure of the three APO stages.

Run: .venv/bin/python images/make_pipeline.py
"""

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch

fig, ax = plt.subplots(figsize=(12, 4.6), dpi=150)
ax.set_xlim(0, 12)
ax.set_ylim(0, 4.6)
ax.axis("off")


def box(x, y, w, h, title, body, color):
    ax.add_patch(
        FancyBboxPatch((x, y), w, h, boxstyle="round,pad=0.02,rounding_size=0.12", fc=color, ec="#333", lw=1.2)
    )
    ax.text(x + w / 2, y + h - 0.22, title, ha="center", va="top", fontsize=10.5, weight="bold")
    ax.text(x + w / 2, y + h - 0.62, body, ha="center", va="top", fontsize=8.3, linespacing=1.35)


def arrow(x0, y0, x1, y1, label=None):
    ax.add_patch(FancyArrowPatch((x0, y0), (x1, y1), arrowstyle="-|>", mutation_scale=14, lw=1.3, color="#333"))
    if label:
        ax.text((x0 + x1) / 2, (y0 + y1) / 2 + 0.12, label, ha="center", va="bottom", fontsize=7.8, style="italic")


box(
    0.15,
    2.5,
    2.2,
    1.9,
    "CXR-MAX",
    "X-ray + question\n7 teacher trajectories\nτ¹ … τ⁷ (drifting)\n`apo synth` for a demo",
    "#e8eef7",
)
box(
    2.95,
    2.5,
    2.45,
    1.9,
    "1 · Learn (SFT)",
    "ms-swift LoRA SFT on\nevery teacher's answer\nscripts/SFT-Qwen2.5.sh\n→ reference policy π_st",
    "#dff0e0",
)
box(
    6.0,
    2.5,
    2.55,
    1.9,
    "2 · Compare",
    "π_st reads image, question\nand τ¹ … τ⁷ in context,\nwrites one consensus t⁺\n`apo consensus`",
    "#fff2d6",
)
box(
    9.15,
    2.5,
    2.7,
    1.9,
    "3 · Critique (APO)",
    "Plackett-Luce: rank t⁺ above\nall N teachers at once,\nKL-anchored to π_st\n`apo train` (DeepSpeed)",
    "#f7e1e1",
)
arrow(2.35, 3.45, 2.95, 3.45)
arrow(5.4, 3.45, 6.0, 3.45, "π_st")
arrow(8.55, 3.45, 9.15, 3.45, "groups")
ax.add_patch(
    FancyArrowPatch(
        (1.25, 2.5),
        (10.5, 2.5),
        connectionstyle="arc3,rad=0.18",
        arrowstyle="-|>",
        mutation_scale=14,
        lw=1.1,
        color="#777",
        ls="--",
    )
)
ax.text(5.9, 1.55, "the teachers' own trajectories are the negatives", ha="center", fontsize=8.3, color="#555")
ax.text(
    6.0,
    0.75,
    r"$r(t)=\beta\,[\log\pi_\theta(t\mid v,l)-\log\pi_{st}(t\mid v,l)]$"
    "      "
    r"$\mathcal{L}_{APO}=-\log\frac{e^{r(t^+)}}{e^{r(t^+)}+\sum_{u=1}^{N}e^{r(\tau^u)}}$",
    ha="center",
    fontsize=11,
)
ax.text(
    6.0,
    0.2,
    "evaluation: MS-CXR-T temporal Top-1 · report BLEU/ROUGE-L/METEOR/CIDEr · teacher drift (labeler)",
    ha="center",
    fontsize=8.3,
    color="#333",
)
fig.savefig(Path(__file__).with_name("pipeline.png"), bbox_inches="tight")
