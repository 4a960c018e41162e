"""PNG plots of `metrics.jsonl` logs, one line per run.

Figures are built with matplotlib's object API (``Figure``), not pyplot: nothing here selects a
backend or touches pyplot's global state, so it works headless (pods, CI) and leaves a notebook's
inline plotting alone.
"""

from matplotlib.figure import Figure


def plot_runs(
    runs: dict[str, list[dict]],
    panels: list[tuple[str, list[str]]],
    path: str,
    log_y: tuple[str, ...] = (),
) -> None:
    """One subplot per `(title, metric keys)`; each run's rows drawn against `step`.

    Rows lacking a key are skipped, so train metrics (every step) and evaluations (every N
    steps) can share a figure.
    """
    fig = Figure(figsize=(4.2 * len(panels), 3.4))
    axes = fig.subplots(1, len(panels), squeeze=False)
    styles = ["-", "--", ":", "-."]
    for ax, (title, keys) in zip(axes[0], panels):
        for r, (run, rows) in enumerate(runs.items()):
            for j, key in enumerate(keys):
                pts = [(row["step"], row[key]) for row in rows if key in row]
                if pts:
                    xs, ys = zip(*pts)
                    ax.plot(xs, ys, styles[j % len(styles)], color=f"C{r}", label=f"{run}: {key}")
        ax.set_title(title)
        ax.set_xlabel("step")
        if title in log_y:
            ax.set_yscale("log")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
