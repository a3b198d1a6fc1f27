"""Human-readable output: terminal summaries of caches and heads, and stage 3's report
(report.json, report.md, plots and saved probes) from a :class:`~vlaug.evaluate.ProbeRun`."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from vlaug.evaluate import ProbeRun


def _counts_line(counts: dict[str, int], empty_label: str) -> str:
    return ", ".join(f"{k or empty_label} {v}" for k, v in counts.items())


def format_cache_info(info: dict, max_failures: int = 10) -> str:
    """The text of ``vlaug info FEATURES`` from :func:`vlaug.cache.cache_info`."""
    m = info["manifest"]
    pretrained = m["pretrained"] or "(from the model source)"
    if pretrained == "none":
        pretrained = f"none (RANDOM weights, seed {m.get('seed')})"
    state = "complete" if m.get("complete") else "incomplete: re-run the same vlaug embed command to finish it"
    lines = [
        f"cache        {info['path']}",
        f"model        {m['model']}",
        f"pretrained   {pretrained}",
        f"embeddings   d={m['embed_dim']}, stored as {m['dtype']}, {'L2-normalised' if m.get('normalized') else 'not normalised'}",
        f"images       {info['n_rows']} in {len(m['parts'])} part(s); {m.get('n_failed', 0)} failed; {state}",
        f"classes      {len(m['classes'])}: {', '.join(m['classes'][:20])}{' ...' if len(m['classes']) > 20 else ''}",
        f"per class    {_counts_line(info['per_class'], '?')}",
    ]
    if m.get("domains") or set(info["per_domain"]) - {""}:
        lines.append(f"per domain   {_counts_line(info['per_domain'], '(none)')}")
    if set(info["per_split"]) - {""}:
        lines.append(f"per split    {_counts_line(info['per_split'], '(none)')}")
    sets = ", ".join(f"{name} ({n} template{'s' if n != 1 else ''})" for name, n in info["prompt_sets"].items())
    lines.append(f"prompt sets  {sets or '(none: texts.parquet is missing)'}")
    lines.append(f"source       {m.get('source') or '?'} ({m.get('layout') or '?'} layout)")
    lines.append(f"created      {m.get('created')} by vlaug {m.get('vlaug_version')}")
    if info["failures"]:
        lines.append(f"failures     {len(info['failures'])} (failed.parquet):")
        for f in info["failures"][:max_failures]:
            lines.append(f"  {f['id']}: {f['error']}")
        if len(info["failures"]) > max_failures:
            lines.append(f"  ... and {len(info['failures']) - max_failures} more")
    if info["unfinished"]:
        lines.append(
            f"unfinished   {len(info['unfinished'])} file(s) from an interrupted write, ignored by readers "
            f"(the next vlaug embed run removes them): {', '.join(info['unfinished'][:5])}"
        )
    return "\n".join(lines)


def format_head_info(path: str, config: dict, stats: dict | None = None, top: int = 5) -> str:
    """The text of ``vlaug info HEAD_DIR``."""
    t, c, h = config.get("training", {}), config["cache"], config["head"]
    history = config.get("history", [])
    selected = config.get("selected_epoch")
    if config["kind"] == "probe":
        return "\n".join([
            f"probe        {path}",
            f"method       {t.get('method')} (refitted on {t.get('refit_on')})",
            f"classes      {h['n_classes']}, d={h['embed_dim']}, zero-shot ensemble weight {h['ensemble']}",
            f"trained on   {c['model']} / {c['pretrained'] or '(model source)'}",
            f"vlaug        {config.get('vlaug_version')}",
        ])
    lines = [
        f"head         {path}",
        f"kind         {config['kind']}",
        f"hyperparams  {', '.join(f'{k}={v}' for k, v in h.items())}",
        f"trained on   {c['model']} / {c['pretrained'] or '(model source)'} (d={c['embed_dim']}), "
        f"{len(c['classes'])} classes, domains {t.get('train_domains')}",
        f"training     {t.get('n_train')} rows, {t.get('n_val')} validation; {t.get('epochs')} epochs, batch "
        f"{t.get('batch_size')}, AdamW lr {t.get('lr')}, weight decay {t.get('weight_decay')}, seed {t.get('seed')}",
    ]
    if history and selected:
        row = history[selected - 1]
        val = f"{row['val_loss']:.4f}" if row.get("val_loss") is not None else "n/a"
        corners = f", corner inner product {row['bv']:.3f}" if "bv" in row else ""
        lines.append(f"selected     epoch {selected} of {len(history)} (train loss {row['train_loss']:.4f}, val loss {val}{corners})")
    lines.append(f"vlaug        {config.get('vlaug_version')}")
    if stats:
        lines.append(f"box volume   mean log-volume {stats['mean_log_volume']:.2f} over {stats['n_rows']} training rows, "
                     f"mean corner inner product {stats['mean_corner_inner_product']:.3f}")
        zs = stats["zero_shot_accuracy"]
        lines.append("zero-shot    " + ", ".join(f"{k} {100 * v:.1f}%" for k, v in zs.items())
                     + " (samples: 5 per box; far below points means the boxes outgrew their classes: raise --alpha)")
        ranked = stats["per_class"]
        show = ranked if len(ranked) <= 2 * top else ranked[:top] + [None] + ranked[-top:]
        lines.append("  rank  class                      mean log-volume")
        for r in show:
            lines.append("  ..." if r is None else f"  {r['rank']:>4}  {r['class'][:25]:<25}  {r['mean_log_volume']:>14.2f}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- stage 3


def _pct(stat: dict | None) -> str:
    if not stat or stat.get("mean") is None:
        return "–"
    return f"{100 * stat['mean']:.1f} ± {100 * stat['std']:.1f}"


def format_table(report: dict) -> str:
    """LARE's Table 1 shape: top-1 accuracy (%) in domain, out of domain, extended, plus balanced accuracy."""
    rows = report["summary"]
    has_imbalance = any("reduced_classes" in r for r in rows)
    head = ["Method", "In-domain", "Out-of-domain", "Extended", "Balanced"]
    if has_imbalance:
        head += ["Reduced classes", "Other classes"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [f"`{r['method']}`", _pct(r["in_domain"]), _pct(r["out_of_domain"]), _pct(r["extended"]),
                 _pct(r["balanced_accuracy"])]
        if has_imbalance:
            cells += [_pct(r.get("reduced_classes")), _pct(r.get("other_classes"))]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_domain_table(report: dict) -> str:
    domains = sorted({d for r in report["summary"] for d in r["per_domain"]})
    lines = ["| Method | " + " | ".join(domains) + " |", "|" + "---|" * (len(domains) + 1)]
    for r in report["summary"]:
        lines.append(f"| `{r['method']}` | " + " | ".join(_pct(r["per_domain"].get(d)) for d in domains) + " |")
    return "\n".join(lines)


def _size(n: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n} bytes"


def format_markdown(report: dict) -> str:
    p, c = report["protocol"], report["config"]
    pretrained = report["pretrained"] or "(from the model source)"
    if pretrained == "none":
        pretrained = "none — RANDOM weights: these numbers say nothing about CLIP"
    protocol = []
    if p["shots"]:
        protocol.append(f"{p['shots']}-shot (LARE Fig. 4)")
    if p["imbalance"]:
        protocol.append(f"imbalance: {p['imbalance']['percent_of_classes']:g} % of classes reduced to "
                        f"{p['imbalance']['n_images']} training images (LARE Table 3)")
    sizes = "; ".join(f"seed {s['seed']}: train {s['train']}, val {s['val']}, test in {s['test_in']}, out {s['test_out']}"
                      for s in p["splits"])
    lines = [
        "# vlaug probe report",
        "",
        f"- features: `{report['features']}`",
        f"- model: `{report['model']}`, pretrained: `{pretrained}`, d = {report['embed_dim']}, {len(report['classes'])} classes",
        f"- training domains: {', '.join(p['train_domains']) or '(no domains)'}; out-of-domain: {', '.join(p['test_domains']) or '(none)'}",
        "- splits: one held-out test split for every stage and seed: "
        + ("the cache’s `test` rows" if p["uses_cache_splits"] else
           f"the held-out test rows are the training-domain rows whose id hashes below {c['test_fraction']}")
        + ", and every row of the out-of-domain domains; heads and probes fit only on the other rows (seeded "
        f"validation fraction {c['val_fraction']}); {sizes}",
        f"- protocol: {', '.join(protocol) or 'all training rows'}; seeds {p['seeds']} (mean ± std over seeds)",
        f"- probe: multinomial logistic regression, L-BFGS, each weight decay fitted to convergence (at most {c['max_iter']} "
        f"iterations), chosen on validation accuracy from {len(p['weight_decay_grid'])} values {p['weight_decay_grid'][0]:g} … {p['weight_decay_grid'][-1]:g}"
        + (f" on a seeded sample of at most {c['selection_rows']} training and {c['selection_rows']} validation rows "
           "(--selection-rows), then refitted on every training row" if any("selected_on" in r.get("selection", {})
                                                                            for r in report["results"]) else "") + "; "
        f"reweight: {c['reweight']}; class weights: {c['class_weight']}; zero-shot logits cos / {p['zero_shot_temperature']}",
        f"- data: {'streamed from disk, ' + str(p.get('passes_over_cache')) + ' reads of the cache' if p.get('streamed') else 'in memory'} (--memory-budget {c.get('memory_budget', 'auto')}"
        f" = {_size(p.get('memory_budget_bytes', 0))}); device {c['device']}",
        f"- vlaug {report['vlaug_version']}, {report['seconds']:.1f} s",
        "",
        "## Top-1 accuracy (%)",
        "",
        format_table(report),
        "",
        "## Per domain (%)",
        "",
        format_domain_table(report),
        "",
        "## Methods",
        "",
    ]
    for m in report["methods"]:
        opts = ", ".join(f"{k}={v}" for k, v in m["options"].items()) or "no options"
        sel = m["selection_seed0"]
        chosen = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in sel.items()
                           if k not in ("search", "reweight"))
        lines.append(f"- `{m['method']}`: {opts}" + (f"; head `{m['head']}` ({m['head_config']})" if m["head"] else "")
                     + (f"; seed 0 chose {chosen}" if chosen else ""))
    lines += ["", "## Feature geometry of the training rows, seed 0 (LatentDR eqs. 10, 11)", "",
              f"On {p.get('geometry_rows', 0):,} training rows (all of them, or a seeded sample) and their augmentations.", "",
              "| Method | alignment | uniformity | alignment (with augmentations) | uniformity (with augmentations) |",
              "|---|---|---|---|---|"]
    for g in report["feature_geometry"]:
        lines.append(f"| `{g['method']}` | {g['alignment']:.4f} | {g['uniformity']:.4f} | "
                     f"{g['alignment_augmented']:.4f} | {g['uniformity_augmented']:.4f} |")
    lines += ["", "Plots: `accuracy.png`, `embeddings.png`" + (", `box_volume_*.png`" if report.get("plots", {}).get("box") else "")
              + ". Probes: `probes/*/` (`vlaug predict`)."]
    return "\n".join(lines) + "\n"


def _safe_name(text: str) -> str:
    import re

    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "method"


def _json_ready(obj):
    import math

    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _json_ready(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_ready(v) for v in obj]
    if hasattr(obj, "item") and not isinstance(obj, (str, bytes)):
        return _json_ready(obj.item())
    return obj


def _plot_accuracy(report: dict, file) -> None:
    import matplotlib.pyplot as plt
    import numpy as np

    rows = report["summary"]
    keys = [("in_domain", "in-domain"), ("out_of_domain", "out-of-domain"), ("extended", "extended")]
    keys = [(k, n) for k, n in keys if any(r[k]["mean"] is not None for r in rows)]
    x = np.arange(len(rows))
    width = 0.8 / max(1, len(keys))
    fig, ax = plt.subplots(figsize=(max(5, 1.2 * len(rows) + 2), 3.8))
    for i, (k, name) in enumerate(keys):
        means = [100 * (r[k]["mean"] or 0) for r in rows]
        stds = [100 * (r[k]["std"] or 0) for r in rows]
        ax.bar(x + (i - (len(keys) - 1) / 2) * width, means, width, yerr=stds, capsize=3, label=name)
    ax.set_xticks(x, [r["method"] for r in rows], rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_title(f"{report['model']} / {report['pretrained'] or 'hub'}: mean ± std over {len(report['protocol']['seeds'])} seeds", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(file, dpi=120)
    plt.close(fig)


def _plot_box_volume(stats: dict, name: str, file) -> None:
    import matplotlib.pyplot as plt

    ranked = stats["per_class"]
    fig, ax = plt.subplots(figsize=(6, max(2.5, 0.22 * len(ranked) + 1)))
    ax.barh([r["class"] for r in ranked][::-1], [r["mean_log_volume"] for r in ranked][::-1])
    ax.set_xlabel("mean box log-volume (rank 1 at the top)")
    ax.set_title(f"classes by box volume: {name}", fontsize=9)
    ax.tick_params(axis="y", labelsize=7)
    fig.tight_layout()
    fig.savefig(file, dpi=120)
    plt.close(fig)


def _plot_embeddings(first_train: tuple, projections: dict, file, tsne: bool, seed: int = 0) -> None:
    """Training embeddings (colour: class, marker: domain) and, for up to three augmenting
    methods, originals against their augmentations; PCA or t-SNE."""
    import matplotlib.pyplot as plt
    import numpy as np

    x0, y0, d0 = first_train
    panels = [("original", x0, y0, d0, None)]
    for name, (x, y, n_orig) in list(projections.items())[:3]:
        panels.append((name, x, y, None, n_orig))
    rng = np.random.default_rng(seed)
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 4), squeeze=False)
    domains = sorted(set(d0.tolist()))
    markers = "os^DvP*X"
    for ax, (name, x, y, dom, n_orig) in zip(axes[0], panels):
        keep = rng.permutation(len(x))[:2000]
        pts = x[keep]
        if tsne:
            from sklearn.manifold import TSNE

            xy = TSNE(n_components=2, random_state=seed, init="pca", perplexity=min(30, max(2, len(pts) // 4))).fit_transform(pts)
        else:
            centred = pts - pts.mean(0)
            _, _, vt = np.linalg.svd(centred, full_matrices=False)
            xy = centred @ vt[:2].T
        labels = y[keep]
        if dom is not None:
            for i, d in enumerate(domains):
                m = dom[keep] == d
                ax.scatter(xy[m, 0], xy[m, 1], c=labels[m], cmap="tab10", s=8, marker=markers[i % len(markers)],
                           vmin=0, vmax=max(9, int(y.max())), label=d or "(none)")
            if len(domains) > 1:
                ax.legend(fontsize=6, markerscale=1.5)
        else:
            augmented = keep >= n_orig
            ax.scatter(xy[~augmented, 0], xy[~augmented, 1], c=labels[~augmented], cmap="tab10", s=8, marker="o",
                       vmin=0, vmax=max(9, int(y.max())), label="original")
            ax.scatter(xy[augmented, 0], xy[augmented, 1], c=labels[augmented], cmap="tab10", s=6, marker="x",
                       vmin=0, vmax=max(9, int(y.max())), alpha=0.5, label="augmented")
            ax.legend(fontsize=6)
        ax.set_title(f"{name} ({'t-SNE' if tsne else 'PCA'})", fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle("training embeddings, seed 0: colour = class, marker = domain (original) / original vs augmented", fontsize=8)
    fig.tight_layout()
    fig.savefig(file, dpi=110)
    plt.close(fig)


def write_report(out, run: "ProbeRun", tsne: bool = False) -> dict:
    """Write REPORT_DIR atomically: report.json, report.md, PNG plots and probes/METHOD/.

    The folder is built under a temporary name and renamed into place, so a failure
    leaves no half-written report. Returns the report as written to report.json.
    """
    import json
    from pathlib import Path

    import matplotlib

    matplotlib.use("Agg")
    from vlaug import checkpoint
    from vlaug.cache import atomic_directory

    out = Path(out)
    with atomic_directory(out) as tmp:
        (tmp / "probes").mkdir()
        public = dict(run.report)
        probe_dirs = {}
        for method, probe in run.probes.items():
            name = _safe_name(method)
            probe_dirs[method] = f"probes/{name}"
            checkpoint.save_head(
                tmp / "probes" / name, "probe", probe,
                {"training": {"method": method, "refit_on": "train + val rows of seed 0", **public["config"]},
                 "cache": run.cache, "history": [], "selected_epoch": 0},
            )
        public["probe_dirs"] = probe_dirs
        public["plots"] = {"accuracy": "accuracy.png", "embeddings": "embeddings.png", "box": {}}
        _plot_accuracy(public, tmp / "accuracy.png")
        for head, stats in run.box_stats.items():
            if stats:
                file = f"box_volume_{_safe_name(head)}.png"
                _plot_box_volume(stats, head, tmp / file)
                public["plots"]["box"][head] = file
        _plot_embeddings(run.first_train, run.projections, tmp / "embeddings.png", tsne)
        public = _json_ready(public)
        (tmp / "report.json").write_text(json.dumps(public, indent=2) + "\n", encoding="utf-8")
        (tmp / "report.md").write_text(format_markdown(public), encoding="utf-8")
    return public
