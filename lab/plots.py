"""The figure kit of the lab's reports (comparison, ablation, probe study, demo): matplotlib on a file-only backend,
curves read from run folders, images side by side and class-sorted sample grids."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
from PIL import Image, ImageDraw

from ldm.io import read_samples_npz
from ldm.util import image_grid
from lab.pipeline import curve


def pyplot() -> Any:
    """matplotlib's pyplot on the file-only Agg backend: reports are drawn on machines without a display."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def save_figure(fig, path: str | Path) -> Path:
    plt = pyplot()
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_curves(runs: Mapping[str, Sequence[Mapping[str, str | Path]]], panels: Sequence[tuple[str, str, str]],
                path: str | Path) -> Path:
    """One subplot per ``(run kind, metric key, title)``; one colour per arm, one line per repeat.

    ``runs[label]`` lists the repeats' run folders: ``runs[label][r][kind]``.
    """
    plt = pyplot()

    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.2), squeeze=False)
    for ax, (kind, key, title) in zip(axes[0], panels):
        for i, (name, repeats) in enumerate(runs.items()):
            for r, run in enumerate(repeats):
                points = curve(run[kind], key) if run.get(kind) else []
                if points:
                    ax.plot(*zip(*points), color=f"C{i}", alpha=0.8, label=name if r == 0 else None,
                            marker="." if len(points) < 20 else None)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    return save_figure(fig, path)


def side_by_side(images: Mapping[str, str | Path], path: str | Path, gap: int = 8, caption: int = 16) -> Path:
    """The images next to each other, each with its label above, on a white background."""
    tiles = {name: Image.open(p).convert("RGB") for name, p in images.items()}
    height = max(t.height for t in tiles.values()) + caption
    width = sum(t.width for t in tiles.values()) + gap * (len(tiles) - 1)
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    x = 0
    for name, tile in tiles.items():
        draw.text((x + 2, 2), name, fill="black")
        canvas.paste(tile, (x, caption))
        x += tile.width + gap
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path


def class_grid(npz: str | Path, path: str | Path, per_class: int = 10) -> Path:
    """Row c of the grid = the first samples of class c (``samples.npz`` with labels), up to ``per_class``
    and the same number in every row."""
    images, labels = read_samples_npz(npz)
    classes = np.unique(labels)
    per_class = min(per_class, min(int((labels == c).sum()) for c in classes))
    rows = [images[labels == c][:per_class] for c in classes]
    grid = image_grid(np.concatenate(rows), nrow=per_class)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid.squeeze(-1) if grid.shape[-1] == 1 else grid).save(path)
    return path


def last_image(run_dir: str | Path | None, prefix: str, split: str = "val") -> Path | None:
    """The newest ``images/<split>/<prefix>_gs-*.png`` grid of a run (the highest step)."""
    if run_dir is None:
        return None
    files = sorted(Path(run_dir, "images", split).glob(f"{prefix}_gs-*.png"))
    return files[-1] if files else None
