"""lbe-bench's report: number formats, the kernel table and the chart."""

import numpy as np

TABLE_HEADER = ["case", "shape", "dtype", "mode", "op ms", "tf ms", "xla ms", "harness ms",
                "tf/op", "xla/op", "floor ms", "op/floor"]


def fmt_ms(seconds):
    """Seconds as milliseconds with 3 significant digits or more ('-' for None)."""
    if seconds is None:
        return "-"
    ms = seconds * 1e3
    return f"{ms:.3f}" if ms < 1 else f"{ms:.2f}" if ms < 100 else f"{ms:.0f}"


def fmt_ratio(value):
    """A ratio as '1.23x' ('12.3x' from 10 on; '-' for None)."""
    return "-" if value is None else f"{value:.1f}x" if value >= 10 else f"{value:.2f}x"


def table_rows(results):
    """(header, rows) of the kernel table, one row per (case, dtype, mode) result."""
    rows = []
    for r in results:
        t, q = r["times"], r["ratios"]

        def ratio(key):
            text = fmt_ratio(q.get(key))
            if q.get(key + " net") is not None:
                text += f" ({fmt_ratio(q[key + ' net'])} net)"
            return text

        rows.append([
            r["case"], r["label"], r["dtype"], r["mode"],
            fmt_ms(t.get("op", {}).get("median")),
            fmt_ms(t.get("tf", {}).get("median")),
            fmt_ms(t.get("xla", {}).get("median")),
            fmt_ms(t.get("harness", {}).get("median")),
            ratio("tf/op"), ratio("xla/op"),
            fmt_ms(r["floor_s"]), fmt_ratio(q.get("op/floor")),
        ])
    return list(TABLE_HEADER), rows


def format_table(header, rows, markdown=False):
    """The table as Markdown, or as aligned plain-text columns."""
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
        lines += ["| " + " | ".join(row) + " |" for row in rows]
        return "\n".join(lines)
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    out = ["  ".join(str(h).ljust(w) for h, w in zip(header, widths)),
           "  ".join("-" * w for w in widths)]
    out += ["  ".join(str(x).ljust(w) for x, w in zip(row, widths)) for row in rows]
    return "\n".join(out)


def write_chart(results, train, path):
    """A PNG of the op's speed-up over pure TensorFlow (graph mode and XLA) per case, and of the
    op's time over the memory floor; the training step's LBE overheads as a caption."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import ticker

    def times_axis(ax):  # log scale, ticks at 1, 2, 5 x 10^k, written as 0.5x, 2x, 100x
        ax.set_yscale("log")
        ax.yaxis.set_major_locator(ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}x"))
        ax.yaxis.set_minor_formatter(ticker.NullFormatter())
        ax.axhline(1.0, color="black", linewidth=0.8)

    rows = [r for r in results if r["mode"] == "fwdbwd"] or list(results)
    mode = rows[0]["mode"] if rows else ""
    labels = [f"{r['case']}\n{r['dtype']}" for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(max(9, 0.9 * len(rows) + 5), 5.2),
                             gridspec_kw={"width_ratios": [3, 1.5]}, layout="constrained")
    ax = axes[0]
    xs = np.arange(len(rows))
    width = 0.38
    for k, (key, name) in enumerate((("tf/op", "vs pure TensorFlow (graph mode)"),
                                     ("xla/op", "vs pure TensorFlow (XLA)"))):
        vals = [r["ratios"].get(key) or 0 for r in rows]
        ax.bar(xs + (k - 0.5) * width, vals, width, label=name)
    times_axis(ax)
    ax.set_xticks(xs)
    ax.set_xticklabels(labels, fontsize=7)
    ax.set_ylabel("speed-up of the op (x, log scale)")
    ax.set_title(f"Speed-up of the op ({mode})", fontsize=10)
    ax.legend(fontsize=8)

    ax = axes[1]
    floor_rows = [r for r in rows if r["ratios"].get("op/floor") is not None]
    ax.bar(range(len(floor_rows)), [r["ratios"]["op/floor"] for r in floor_rows], color="gray")
    times_axis(ax)
    ax.set_xticks(range(len(floor_rows)))
    ax.set_xticklabels([f"{r['case']} {r['dtype']}" for r in floor_rows], fontsize=7,
                       rotation=45, ha="right", rotation_mode="anchor")
    ax.set_ylabel("op time / memory floor (log scale)")
    ax.set_title("Op time over the memory floor\n(copy bandwidth)", fontsize=10)
    fig.suptitle("lbe-bench: the op against pure TensorFlow", fontsize=11)
    if train:
        fig.supxlabel(
            f"Training step ({train['layers']} layers of width {train['width']}), LBE overhead: "
            f"op {train['overhead_op_percent']:+.1f} %, pure TensorFlow "
            f"{train['overhead_tf_percent']:+.1f} %, "
            f"fan-in {train['overhead_fan_in_percent']:+.1f} %",
            fontsize=9)
    fig.savefig(path, dpi=110)
    plt.close(fig)
