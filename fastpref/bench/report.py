"""Terminal output (rich tables and a progress bar; plain text without rich) and the PNG plots of a run."""
from __future__ import annotations

import contextlib
import os

COLUMNS = ("implementation", "fwd", "fwd+bwd", "time x eager", "peak MiB", "memory x eager", "x floor", "check")


def fmt_time(s: float) -> str:
    return f"{s * 1e3:.3g} ms" if s < 1 else f"{s:.3g} s"


def _cells(row: dict) -> list[str]:
    if row["status"] != "ok":  # the reason is in the JSON; a failure's is printed in full
        return [row["name"]] + [""] * 6 + [row["status"] + (f": {row['reason']}" if row["status"] == "failed" else "")]
    vs = row.get("vs_reference") or {}
    check = {True: "ok", False: "DIFFERS", None: "-"}[row.get("matches_reference")]
    return [row["name"], fmt_time(row["fwd_s"]), fmt_time(row["fwd_bwd_s"]),
            f"{vs['time']:.2f}" if vs else "", f"{row['peak_bytes'] / 2**20:.1f}",
            f"{vs['memory']:.2f}" if vs and vs["memory"] is not None else "", f"{row['x_floor']['fwd_bwd']:.2f}",
            check]


def summary_rows(results: dict) -> list[list[str]]:
    """Per op, at its largest size: the reference and the fastest fastpref backend."""
    out = []
    for op, info in results["ops"].items():
        rows = [r for r in results["rows"] if r["op"] == op and r["status"] == "ok"]
        if not rows:
            continue
        x = max(r["x"] for r in rows)
        at = [r for r in rows if r["x"] == x]
        best = min((r for r in at if r["kind"] == "fastpref"), key=lambda r: r["fwd_bwd_s"], default=None)
        ref = next((r for r in at if r["kind"] == "reference"), None)
        if best is None:
            continue
        vs = best.get("vs_reference") or {}
        out.append([info["op"], " ".join(f"{k}={v}" for k, v in best["sizes"].items() if k != "dtype"),
                    fmt_time(ref["fwd_bwd_s"]) if ref else "-", best["name"], fmt_time(best["fwd_bwd_s"]),
                    f"{vs['time']:.2f}" if vs else "", f"{vs['memory']:.2f}" if vs and vs["memory"] is not None else "",
                    f"{best['x_floor']['fwd_bwd']:.2f}"])
    return out


SUMMARY_COLUMNS = ("op", "sizes", "eager fwd+bwd", "fastest fastpref", "fwd+bwd", "time x eager",
                   "memory x eager", "x floor")


class Console:
    """rich when installed (``pip install "fastpref[bench]"``), plain lines otherwise."""

    def __init__(self):
        try:
            import rich.console
        except ImportError:
            self.rich = None
        else:
            self.rich = rich.console.Console()
            if not self.rich.is_terminal:  # logs and pipes: wide enough for the tables
                self.rich = rich.console.Console(width=max(self.rich.width, 132))

    def header(self, text: str) -> None:
        if self.rich:
            self.rich.print(text, markup=False, highlight=False)
        else:
            print(text, flush=True)

    def _table(self, title: str, columns, rows, wraps: int = -1) -> None:
        """Column ``wraps`` (an index) may wrap; the others do not."""
        if self.rich:
            from rich.table import Table

            t = Table(title=title, title_justify="left")
            for i, c in enumerate(columns):
                t.add_column(c, justify="left" if i == 0 else "right", overflow="fold",
                             no_wrap=i != wraps % len(columns))
            for r in rows:
                t.add_row(*r)
            self.rich.print(t)
        else:
            widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(columns)]
            print(f"\n{title}")
            for r in [list(columns)] + rows:
                print("  ".join(v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in enumerate(zip(r, widths))))

    def table(self, title: str, rows: list[dict]) -> None:
        """One (op, sizes): times are medians; "x eager" against the eager reference; x floor = fwd+bwd time
        over the floor."""
        self._table(title, COLUMNS, [_cells(r) for r in rows])

    def summary(self, results: dict) -> None:
        self._table("summary (largest size of each op)", SUMMARY_COLUMNS, summary_rows(results), wraps=1)

    @contextlib.contextmanager
    def progress(self, total: int):
        """Yields ``advance(description)``, called as each measurement starts."""
        if not self.rich:
            count = [0]

            def advance(text):
                count[0] += 1
                print(f"[{count[0]}/{total}] {text}", flush=True)

            yield advance
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      console=self.rich, transient=True) as bar:
            task = bar.add_task("measuring", total=total)
            started = [False]

            def advance(text):
                if started[0]:
                    bar.advance(task)
                started[0] = True
                bar.update(task, description=text)

            yield advance


def plots(results: dict, out: str) -> list[str]:
    """``<out>/<op>.png`` per op: forward time, forward+backward time and peak memory against the sweep's
    size, one line per implementation (and divergence); [] without matplotlib."""
    try:
        import matplotlib
    except ImportError:
        return []
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for op, info in results["ops"].items():
        rows = [r for r in results["rows"] if r["op"] == op and r["status"] == "ok"]
        if not rows:
            continue
        series = {}
        for r in rows:
            tag = " ".join(str(v) for k, v in r["sizes"].items() if isinstance(v, str) and k != "dtype")
            series.setdefault(r["name"] + (f" ({tag})" if tag else ""), []).append(r)
        fig, axes = plt.subplots(1, 3, figsize=(16, 4.8))
        for label, rs in series.items():
            rs.sort(key=lambda r: r["x"])
            xs = [r["x"] for r in rs]
            style = dict(marker="o", linestyle="-" if rs[0]["kind"] == "fastpref" else "--", label=label)
            axes[0].plot(xs, [r["fwd_s"] * 1e3 for r in rs], **style)
            axes[1].plot(xs, [r["fwd_bwd_s"] * 1e3 for r in rs], **style)
            axes[2].plot(xs, [r["peak_bytes"] / 2**20 for r in rs], **style)
        for ax, ylabel in zip(axes, ("forward (ms)", "forward + backward (ms)", "peak memory of fwd+bwd (MiB)")):
            ax.set_xscale("log", base=2)
            if ax is not axes[2]:
                ax.set_yscale("log")
            ax.set_xlabel(info["x_label"])
            ax.set_ylabel(ylabel)
            ax.grid(True, which="both", alpha=0.3)
        fixed = ", ".join(f"{k}={v}" for k, v in rows[0]["sizes"].items()
                          if len({str(r["sizes"][k]) for r in rows}) == 1)
        fig.suptitle(f"{info['op']}: {info['title']} on {results['device_name']} ({fixed}), "
                     f"fastpref {results['versions']['fastpref']}, torch {results['versions']['torch']}")
        axes[2].set_ylim(bottom=0)
        axes[2].legend(fontsize=7, loc="best")
        fig.tight_layout()
        path = os.path.join(out, f"{op}.png")
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths.append(path)
    return paths
