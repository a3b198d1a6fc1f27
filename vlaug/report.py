"""Human-readable output: terminal summaries of caches and heads, and stage 3's report
(report.json, report.md, plots and saved probes) from a :class:`~vlaug.runs.ProbeRun`."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from vlaug.runs import ProbeRun


def _counts_line(counts: dict[str, int], empty_label: str) -> str:
    return ", ".join(f"{k or empty_label} {v}" for k, v in counts.items())


def format_cache_info(info: dict, max_failures: int = 10) -> str:
    """The text of ``vlaug info FEATURES`` from :func:`vlaug.cache.cache_info`."""
    m = info["manifest"]
    pretrained = m["pretrained"] or "(from the model source)"
    if pretrained == "none":
        pretrained = f"none (RANDOM weights, seed {m.get('seed')})"
    missing = (m.get("n_inputs") or 0) - info["n_rows"] - m.get("n_failed", 0)
    state = ("complete" if m.get("complete") or m.get("n_inputs") is None else
             f"INCOMPLETE ({max(missing, 0)} of {m.get('n_inputs')} inputs not reached): re-run the same vlaug embed "
             "command to finish it; train-box and probe refuse it without --allow-incomplete")
    lines = [
        f"cache        {info['path']}",
        f"model        {m['model']}",
        f"pretrained   {pretrained}",
        f"embeddings   d={m['embed_dim']}, stored as {m['dtype']}, {'L2-normalised' if m.get('normalized') else 'not normalised'}",
        f"images       {info['n_rows']} in {len(m['parts'])} part(s); {m.get('n_failed', 0)} failed; {state}",
        f"classes      {len(m['classes'])}: {', '.join(m['classes'][:20])}{' ...' if len(m['classes']) > 20 else ''}"
        if m["classes"] else "classes      none: unlabeled images (for vlaug predict)",
    ]
    if m["classes"]:
        lines.append(f"per class    {_counts_line(info['per_class'], '?')}")
    if m.get("domains") or set(info["per_domain"]) - {""}:
        lines.append(f"per domain   {_counts_line(info['per_domain'], '(none)')}")
    if set(info["per_split"]) - {""}:
        lines.append(f"per split    {_counts_line(info['per_split'], '(none)')}")
    sets = ", ".join(f"{name} ({n} template{'s' if n != 1 else ''})" for name, n in info["prompt_sets"].items())
    lines.append(f"prompt sets  {sets or ('(none: texts.parquet is missing)' if m['classes'] else '(none)')}")
    sources = m.get("sources") or [{"source": m.get("source") or "?", "layout": m.get("layout") or "?"}]
    for i, src in enumerate(sources):
        lines.append(f"{'source' if i == 0 else 'appended':<12} {src['source']} ({src['layout']} layout)")
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
    if c.get("texts"):
        lines.append("prompt sets  " + "; ".join(f"{name} ({len(t)} template{'s' if len(t) != 1 else ''})"
                                                  for name, t in c["texts"].items()))
    if t.get("incomplete_cache") or t.get("classes_without_training_rows"):
        empty = t.get("classes_without_training_rows") or []
        lines.append("WARNING      " + ", ".join(filter(None, [
            "trained on an incomplete cache (--allow-incomplete)" if t.get("incomplete_cache") else "",
            f"no training rows for {', '.join(empty[:10])}" if empty else ""])))
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
    """LARE's Table 1 shape: top-1 accuracy (%) in domain, out of domain, extended, plus balanced accuracy
    (under --protocol leave-one-domain-out, DomainBed's tables)."""
    if is_domainbed(report):
        return _domainbed_tables(report)
    if report.get("shots_sweep"):  # a table per K
        return "\n\n".join(f"{run['shots']}-shot:\n\n{format_table({**report, 'shots_sweep': None, 'summary': run['summary']})}"
                           for run in report["shots_sweep"]["per_shots"])
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


def _reweighted_methods(report: dict) -> str:
    """--reweight and the methods it applied to: it reweights the rows of the logistic
    probes; zero-shot and the joint methods run as without it."""
    scheme = report["config"]["reweight"]
    if scheme == "none":
        return scheme
    done = [m["method"] for m in report["methods"] if "reweight" in m["selection_seed0"]]
    others = [m["method"] for m in report["methods"] if "reweight" not in m["selection_seed0"]]
    return (f"{scheme}, applied to {', '.join(f'`{m}`' for m in done) or 'no method'}"
            + (f"; not to {', '.join(f'`{m}`' for m in others)} (no probe rows to reweight)" if others else ""))


def is_domainbed(report: dict) -> bool:
    """Whether ``report`` comes from ``--protocol leave-one-domain-out``."""
    return report["protocol"].get("name") == "leave-one-domain-out"


SELECTION_TITLES = {
    "training-domain": "Training-domain validation",
    "leave-one-domain-out": "Leave-one-domain-out cross-validation",
    "oracle": "Oracle: test-domain validation (uses test-domain labels; not comparable with the others)",
}


def format_domainbed_table(report: dict, selection: str) -> str:
    """DomainBed's table for one selection: per method, the accuracy (%) on each test
    domain's ``in`` rows, mean ± std over seeds, and Avg (mean over test domains)."""
    domains = report["protocol"]["test_domains"]
    lines = ["| Method | configurations | " + " | ".join(domains) + " | Avg |", "|" + "---|" * (len(domains) + 3)]
    for r in report["tables"].get(selection, []):
        cells = [_pct(r["domains"].get(d)) for d in domains]
        lines.append(f"| `{r['method']}` | {r['n_configurations']} | " + " | ".join(cells) + f" | {_pct(r.get('avg'))} |")
    return "\n".join(lines)


def _domainbed_tables(report: dict) -> str:
    """Every selection's table, each under its title (what the CLI prints)."""
    return "\n\n".join(f"{SELECTION_TITLES[s]}:\n\n{format_domainbed_table(report, s)}" for s in report["tables"])


def format_domainbed_markdown(report: dict) -> str:
    """report.md of ``--protocol leave-one-domain-out``: the settings, DomainBed's table for
    each selection (the oracle's last, apart), the methods and the files."""
    p, c = report["protocol"], report["config"]
    n = len(p["seeds"])
    split = ("the cache's split column: `train` rows are `in`, `val` rows are `out` (the same for every seed)"
             if p["uses_cache_splits"] else
             f"drawn per seed: {c['holdout_fraction']:g} of each class of each domain is `out`, the rest `in`")
    lines = ["# vlaug probe report: DomainBed protocol (leave-one-domain-out)", "", *_warning_lines(report),
             f"- features: `{report['features']}`",
             _model_line(report),
             f"- domains: {', '.join(p['domains'])}; each test domain in turn ({', '.join(p['test_domains'])}), trained on "
             "the `in` rows of the others; every number is the accuracy on the test domain's `in` rows",
             f"- in/out split of each domain: {split}",
             f"- seeds (DomainBed's trials) {p['seeds']}: mean ± std over the {n} seeds (population std; DomainBed prints "
             "the standard error, std/√n, which `report.json` holds as `se`); Avg: the mean over test domains, ± the "
             "std over seeds of each seed's mean",
             "- selections: training-domain validation (the mean over the training domains of the accuracy on their "
             "`out` rows), leave-one-domain-out cross-validation (each training domain held out in turn, scored on its "
             "`in` rows; the best mean is refitted on every training domain), oracle (the test domain's `out` rows)"
             + ("; a joint method stops early on its selection's validation rows, the oracle's included (DomainBed's "
                "oracle takes the last step)" if any("selected_step" in r.get("selection", {}) for r in report["results"])
                else ""),
             "- configurations: each method's search (the probe's weight decays, a joint method's lr × weight decay, "
             "Tip-Adapter's α × β) times the values its options list; the selection chooses among all of them, and a "
             "probe's search also tries values past an end of its grid that it chose (not counted here: see probe)",
             f"- probe: {_probe_text(report)}",
             f"- data: {_data_text(report)}",
             f"- vlaug {report['vlaug_version']}, {report['seconds']:.1f} s", ""]
    for selection in report["tables"]:
        lines += [f"## {SELECTION_TITLES[selection]} (%)", "", format_domainbed_table(report, selection), ""]
    lines += ["## Methods", ""]
    first = (p["seeds"][0], p["test_domains"][0]) if p["seeds"] and p["test_domains"] else None
    for m in report["methods"]:
        configs = [x for x in m["configurations"] if x]
        listed = {k for x in configs for k in x}  # the values that vary: each configuration's, not the first's
        opts = ", ".join(f"{k}={v}" for k, v in m["options"].items() if k not in listed) or "no other options"
        chose = [f"{r['model_selection']} {_chosen_text(r.get('config') or {}, r['selection'], m['options'])}"
                 for r in report["results"] if first and (r["method"], r["seed"], r["test_domain"]) == (m["method"], *first)]
        if all(c.endswith("nothing to choose") for c in chose):
            chose = []
        lines.append(f"- `{m['method']}`: {opts}" + (f" ({m['search']})" if m.get("search") else "")
                     + f"; {m['n_configurations']} configuration{'s' if m['n_configurations'] != 1 else ''}"
                     + (f" ({len(configs)} listed: " + "; ".join(", ".join(f"{k}={v}" for k, v in x.items()) for x in configs)
                        + ")" if configs else "")
                     + (f"; seed {first[0]}, test domain {first[1]}: " + "; ".join(chose) if chose else ""))
    task = p["tasks"][0] if p.get("tasks") else None
    whose = f" of the first task (seed {task['seed']}, test domain {task['test_domain']} held out)" if task else ""
    lines += ["", *_geometry_lines(report, whose), "",
              "Plots: `domainbed.png` (accuracy per test domain and method, one panel per selection), `embeddings.png`. "
              "No probe is saved: the protocol trains one model per seed, test domain and selection; "
              "`vlaug probe --protocol single` saves the probe to deploy. Every test prediction: `test_predictions.parquet` "
              "(with `test_domain` and `model_selection`)."]
    return "\n".join(lines) + "\n"


def format_markdown(report: dict) -> str:
    """report.md: the run's settings, the accuracy tables, each method's options and
    selections, the feature geometry, and the files beside it."""
    if is_domainbed(report):
        return format_domainbed_markdown(report)
    lines = [
        "# vlaug probe report",
        "",
        *_warning_lines(report),
        *_settings_lines(report),
        "",
        *_accuracy_sections(report),
        "## Per domain (%)",
        "",
        format_domain_table(report),
        "",
        "## Methods",
        "",
        *_method_lines(report),
        "",
        *_geometry_lines(report),
        "",
        _files_line(report),
    ]
    return "\n".join(lines) + "\n"


TABLE_COLUMNS = ("In-domain: the training domains' held-out test rows; out-of-domain: every row of the other domains; "
                 "extended: both pooled (LARE's); balanced: the mean over classes of each class's accuracy on all of "
                 "those rows; mean ± population std over seeds.")


def _accuracy_sections(report: dict) -> list[str]:
    """The top-1 accuracy table, or with a shots sweep one per K (and the sweep's plot)."""
    sweep = report.get("shots_sweep")
    if not sweep:
        return ["## Top-1 accuracy (%)", "", format_table(report), "", TABLE_COLUMNS, ""]
    lines = []
    for run in sweep["per_shots"]:
        n_val = sorted({s["val"] for s in run["splits"]})
        lines += [f"## Top-1 accuracy (%), {run['shots']}-shot", "",
                  f"Validation: {_val_shots_text(run['val_shots'])} ({', '.join(map(str, n_val))} rows); {run['seconds']:.1f} s.",
                  "", format_table({**report, "shots_sweep": None, "summary": run["summary"]}), ""]
    lines += [TABLE_COLUMNS, "",
              f"`shots.png`: accuracy against K per method. The tables below the sweep, the plots other than "
              f"`shots.png` and the saved probes are {sweep['probes_and_plots']}.", ""]
    return lines


def _val_shots_text(val_shots) -> str:
    return ("every held-out validation row (--val-shots all: more labels than the K shots)" if val_shots == "all" else
            f"{val_shots} rows per class (few-shot validation)")


def _warning_lines(report: dict) -> list[str]:
    """Each warning of the run in bold, followed by a blank line."""
    return [line for w in report.get("warnings", []) for line in (f"> **Warning: {w}.**", "")]


def _model_line(report: dict) -> str:
    """The model bullet, with a warning where the weights were random."""
    pretrained = report["pretrained"] or "(from the model source)"
    if pretrained == "none":
        pretrained = "none — RANDOM weights: these numbers say nothing about CLIP"
    return f"- model: `{report['model']}`, pretrained: `{pretrained}`, d = {report['embed_dim']}, {len(report['classes'])} classes"


def _settings_lines(report: dict) -> list[str]:
    """The bullet list of what was probed and how: cache, model, domains, splits, protocol,
    probe, data and version."""
    p = report["protocol"]
    return [
        f"- features: `{report['features']}`",
        _model_line(report),
        f"- training domains: {', '.join(p['train_domains']) or '(no domains)'}; out-of-domain: {', '.join(p['test_domains']) or '(none)'}",
        f"- splits: {_splits_text(report)}",
        f"- protocol: {_protocol_text(p)}; seeds {p['seeds']} (mean ± population std over seeds{_seeds_vary(report)})",
        f"- probe: {_probe_text(report)}",
        f"- data: {_data_text(report)}",
        f"- vlaug {report['vlaug_version']}, {report['seconds']:.1f} s",
    ]


def _splits_text(report: dict) -> str:
    """Where the test rows come from, the validation fraction and each seed's split sizes."""
    p, c = report["protocol"], report["config"]
    sizes = "; ".join(f"seed {s['seed']}: train {s['train']}, val {s['val']}, test in {s['test_in']}, out {s['test_out']}"
                      for s in p["splits"])
    test_rows = ("the cache’s `test` rows" if p["uses_cache_splits"] else
                 f"the held-out test rows are the training-domain rows whose id hashes below {c['test_fraction']}")
    return (f"one held-out test split for every stage and seed: {test_rows}, and every row of the out-of-domain "
            f"domains; the validation rows are fixed the same way (a fraction {c['val_fraction']} of the rest, by id hash, "
            f"stratified; the same for every seed), and neither heads nor probes fit on either; {sizes}")


def _seeds_vary(report: dict) -> str:
    """What the seeds vary: with every training row used, not the split (fixed by the rows'
    ids or the cache's split column), so a method that draws nothing has no spread, unless
    its search ran on a seeded sample of the rows (--selection-rows)."""
    protocol = report["protocol"]
    if protocol["shots"] or protocol["imbalance"]:
        return "; each seed draws its own training rows"
    if any(isinstance(r.get("selection", {}).get("selected_on"), dict) for r in report["results"]):
        return ("; the split is the same for every seed, and the seeds vary what a method draws (augmentations, "
                "initialisation, batches) and the seeded sample each weight-decay search ran on (--selection-rows)")
    return ("; the split is the same for every seed, so the seeds vary only what a method draws (augmentations, "
            "initialisation, batches): a method that draws nothing, such as `linear`, scores the same on every seed")


def _protocol_text(protocol: dict) -> str:
    """Few-shot and imbalance settings, or that every training row was used."""
    parts = []
    if protocol["shots"]:
        parts.append(f"{protocol['shots']}-shot (LARE Fig. 4); validation: {_val_shots_text(protocol.get('val_shots'))}, "
                     "drawn with the seed from the held-out validation rows; the saved probes are refitted on train + "
                     "these validation rows")
    if protocol["imbalance"]:
        imbalance = protocol["imbalance"]
        parts.append(f"imbalance: {imbalance['percent_of_classes']:g} % of classes reduced to "
                     f"{imbalance['n_images']} training images (LARE Table 3)")
    return ", ".join(parts) or "all training rows"


def _probe_text(report: dict) -> str:
    """The logistic probe: solver, weight-decay grid and selection, reweighting, class
    weights and the zero-shot temperature."""
    p, c = report["protocol"], report["config"]
    grid = p["weight_decay_grid"]
    # a search on a sample records its sizes (a dict); the joint methods record how they select (text)
    sampled = any(isinstance(r.get("selection", {}).get("selected_on"), dict) for r in report["results"])
    selection = (f" on a seeded sample of at most {c['selection_rows']} training and {c['selection_rows']} validation "
                 "rows (--selection-rows), then refitted on every training row" if sampled else "")
    searched = [r for r in report["results"] if "grid_extended" in r.get("selection", {})]
    if any(r["selection"]["grid_extended"] for r in searched):
        decades = p.get("grid_extension_decades")  # absent from reports written before it was recorded
        bound = f"at most {decades}" if decades else "up to a bound"
        selection += ("; where the best value was at an end of the grid, the search went on past it a decade at a time "
                      f"({bound}; a value past the grid taken only with a higher validation accuracy) until the best "
                      f"was interior: {_extension_counts(searched)}")
    return (f"multinomial logistic regression, L-BFGS, each weight decay fitted until its gradient test passes, it "
            f"stalls or it reaches {c['max_iter']} iterations (`converged`, `stalled` in report.json), chosen on the "
            f"validation accuracy of what each method deploys from {len(grid)} log-spaced values "
            f"{grid[0]:g} … {grid[-1]:g}{selection}; "
            f"reweight: {_reweighted_methods(report)}; class weights: {c['class_weight']}; "
            f"zero-shot logits cos / {p['zero_shot_temperature']}")


def _extension_counts(searched: list[dict]) -> str:
    """How many of the results whose probe searched a weight decay went past the grid, and the
    values tried: per model selection under the DomainBed protocol (leave-one-domain-out's
    extension is the mean over its folds')."""
    groups: dict[str, list[dict]] = {}
    for r in searched:
        groups.setdefault(r.get("model_selection", ""), []).append(r["selection"])
    parts = []
    for role, sel in groups.items():
        extended = [x for x in sel if x["grid_extended"]]
        span = (f", values {min(x['grid'][0] for x in extended):g} … {max(x['grid'][1] for x in extended):g} tried"
                if extended else "")
        parts.append(f"{role + ' ' if role else ''}{len(extended)} of {len(sel)} results{span}")
    return "; ".join(parts)


def _data_text(report: dict) -> str:
    """In memory or streamed (with the number of reads), the memory budget and the device."""
    from vlaug.cache.budget import format_size

    p, c = report["protocol"], report["config"]
    source = f"streamed from disk, {p.get('passes_over_cache')} reads of the cache" if p.get("streamed") else "in memory"
    return (f"{source} (--memory-budget {c.get('memory_budget', 'auto')} = {format_size(p.get('memory_budget_bytes', 0))}); "
            f"device {c['device']}")


def _method_lines(report: dict) -> list[str]:
    """One bullet per method: its options, its head and what seed 0's selection chose."""
    lines = []
    for m in report["methods"]:
        opts = ", ".join(f"{k}={v}" for k, v in m["options"].items()) or "no options"
        chosen = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in m["selection_seed0"].items()
                           if k not in ("search", "reweight"))
        lines.append(f"- `{m['method']}`: {opts}" + (f" ({m['search']})" if m.get("search") else "")
                     + (f"; head `{m['head']}` ({m['head_config']})" if m["head"] else "")
                     + (f"; seed 0 chose {chosen}" if chosen else ""))
    return lines


# what a selection chose, as the reports print it: a candidate's values and a trained method's length
CHOSEN_KEYS = ("weight_decay", "lr", "shrinkage", "alpha", "beta", "selected_step", "selected_epoch")


def _chosen_text(config: dict, selection: dict, options: dict) -> str:
    """``key=value`` of what a selection chose: the listed options' values (a result's
    ``config``) and its selection's CHOSEN_KEYS, but those that are a fixed option of the
    method (an adapter records its lr, a fixed Tip-Adapter α); "nothing to choose" where
    there is none."""
    searched = [k for k in CHOSEN_KEYS if k in selection and k not in config and options.get(k) != selection[k]]
    items = [*config.items(), *((k, selection[k]) for k in searched)]
    text = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in items)
    return f"chose {text}" if text else "nothing to choose"


def _geometry_lines(report: dict, whose: str = "") -> list[str]:
    """The feature-geometry section: alignment and uniformity per method, with and without
    the augmentations; ``whose``: which fit's training rows, where seed 0 has several."""
    lines = ["## Feature geometry of the training rows, seed 0 (LatentDR eqs. 10, 11)", "",
             f"On {report['protocol'].get('geometry_rows', 0):,} training rows{whose} (all of them, or a seeded sample) "
             "and their augmentations.", "",
             "| Method | alignment | uniformity | alignment (with augmentations) | uniformity (with augmentations) |",
             "|---|---|---|---|---|"]
    for g in report["feature_geometry"]:
        lines.append(f"| `{g['method']}` | {g['alignment']:.4f} | {g['uniformity']:.4f} | "
                     f"{g['alignment_augmented']:.4f} | {g['uniformity_augmented']:.4f} |")
    return lines


def _files_line(report: dict) -> str:
    """The plots and probes written beside report.md."""
    plots = report.get("plots", {})
    return ("Plots: `accuracy.png`, `embeddings.png`"
            + (", `tradeoff.png` (in-domain vs out-of-domain, Pareto front)" if plots.get("tradeoff") else "")
            + (", `box_volume_*.png`" if plots.get("box") else "")
            + ". Probes: `probes/*/` (`vlaug predict`).")


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


def _subplots(*args, **kwargs):
    """``pyplot.subplots`` on a bare Figure: PNGs are drawn by Agg without pyplot's global
    state and the time its import takes."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=kwargs.pop("figsize", None))
    return fig, fig.subplots(*args, **kwargs)



def _plot_labels(methods: list[str]) -> list[str]:
    """The methods as plots label them: a head folder by its last name (``box:runs/a/box``
    -> ``box:box``) where that leaves every label distinct; else as written."""
    def short(method: str) -> str:
        spec, q, query = method.partition("?")
        name, colon, head = spec.partition(":")
        return name + colon + Path(head.rstrip("/")).name + q + query if head else method

    labels = [short(m) for m in methods]
    return labels if len(set(labels)) == len(labels) else list(methods)

def _plot_accuracy(report: dict, file) -> None:
    import numpy as np

    rows = report["summary"]
    keys = [("in_domain", "in-domain"), ("out_of_domain", "out-of-domain"), ("extended", "extended")]
    keys = [(k, n) for k, n in keys if any(r[k]["mean"] is not None for r in rows)]
    x = np.arange(len(rows))
    width = 0.8 / max(1, len(keys))
    fig, ax = _subplots(figsize=(max(5, 1.2 * len(rows) + 2), 3.8))
    for i, (k, name) in enumerate(keys):
        means = [100 * (r[k]["mean"] or 0) for r in rows]
        stds = [100 * (r[k]["std"] or 0) for r in rows]
        ax.bar(x + (i - (len(keys) - 1) / 2) * width, means, width, yerr=stds, capsize=3, label=name)
    ax.set_xticks(x, _plot_labels([r["method"] for r in rows]), rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_title(f"{report['model']} / {report['pretrained'] or 'hub'}: mean ± std over {len(report['protocol']['seeds'])} seeds", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(file, dpi=120, format="png")


def _plot_box_volume(stats: dict, name: str, file, top: int = 15, n_dims: int = 8) -> dict:
    """LARE's Tables 4 and 5 as a figure: the classes ranked by mean box log-volume, drawn as
    the difference from the mean over classes (the log-volumes themselves are large negative
    numbers whose differences bars from zero would hide), and, for the dimensions along which
    boxes are longest, the classes with the longest sides."""

    ranked = stats["per_class"]
    shown = ranked if len(ranked) <= 2 * top else ranked[:top] + ranked[-top:]
    mean = sum(r["mean_log_volume"] for r in ranked) / max(1, len(ranked))
    dims = sorted(stats.get("per_dimension", []), key=lambda d: -max(d["mean_side"] or [0]))[:n_dims]
    fig, (ax, tab) = _subplots(1, 2, figsize=(10, max(3.0, 0.24 * len(shown) + 1.2)),
                                  gridspec_kw={"width_ratios": [1.1, 1]})
    y = list(range(len(shown)))
    diffs = [r["mean_log_volume"] - mean for r in shown]
    ax.hlines(y, 0, diffs, color="0.75", linewidth=1)
    ax.scatter(diffs, y, c=["tab:blue" if v >= 0 else "tab:orange" for v in diffs], s=18, zorder=3)
    ax.axvline(0, color="0.3", linewidth=0.8)
    ax.set_yticks(y, [f"{r['rank']}. {r['class']}" for r in shown], fontsize=7)
    ax.invert_yaxis()  # rank 1 (largest boxes) at the top
    if len(shown) < len(ranked):
        ax.axhline(top - 0.5, color="0.5", linestyle=":", linewidth=0.8)
        ax.text(ax.get_xlim()[0], top - 0.5, f"  {len(ranked) - 2 * top} classes not shown", fontsize=6, va="bottom")
    ax.set_xlabel(f"mean box log-volume − mean over classes ({mean:.1f})", fontsize=8)
    ax.set_title("Table 4: classes ranked by box volume", fontsize=9)
    tab.axis("off")
    if dims:
        cells = [[str(d["dim"]), ", ".join(d["classes"]), f"{d['mean_side'][0]:.3g}"] for d in dims]
        table = tab.table(cellText=cells, colLabels=["dim", "classes with the longest sides", "longest"],
                          loc="upper center", cellLoc="left", colWidths=[0.12, 0.68, 0.2])
        table.auto_set_font_size(False)
        table.set_fontsize(7)
        tab.set_title(f"Table 5: the {len(dims)} dimensions with the longest sides", fontsize=9)
    fig.suptitle(f"box head {name}: {stats['n_rows']} training rows", fontsize=9)
    fig.tight_layout()
    fig.savefig(file, dpi=120, format="png")
    return {"classes": [r["class"] for r in shown], "x": diffs, "dims": [d["dim"] for d in dims]}


def _project(x0, extra: list, tsne: bool, seed: int):
    """2-d coordinates of ``x0`` and of each array of ``extra`` from ONE projection, so that
    every panel shares its axes: PCA fitted on ``x0`` (the original rows), or one t-SNE of
    all points together."""
    import numpy as np

    if tsne:
        from sklearn.manifold import TSNE

        pts = np.concatenate([x0, *extra])
        xy = TSNE(n_components=2, random_state=seed, init="pca", perplexity=min(30, max(2, len(pts) // 4))).fit_transform(pts)
        bounds = np.cumsum([len(x0)] + [len(e) for e in extra])
        return xy[: bounds[0]], [xy[a:b] for a, b in zip(bounds[:-1], bounds[1:])]
    mean = x0.mean(0)
    centred = (x0 - mean).astype(np.float64)
    # the top two eigenvectors of the d x d covariance: the PCA basis, without an SVD of the
    # (n, d) rows, which takes far longer than one product of them
    _, vecs = np.linalg.eigh(centred.T @ centred)
    basis = vecs[:, ::-1][:, :2].astype(x0.dtype)
    return (x0 - mean) @ basis, [(e - mean) @ basis for e in extra]


def _embedding_points(first_train: tuple, projections: dict, seed: int = 0, max_points: int = 2000) -> tuple[tuple, dict]:
    """The points the embeddings plot draws, as its arguments ``(first_train, projections)``:
    at most ``max_points`` original rows and, per method, augmentations (a seeded sample, in
    their order; all of them where there are no more). A second call returns its input:
    the worker gets these, not the geometry rows and every augmentation."""
    import numpy as np

    x0, y0, d0 = first_train
    rng = np.random.default_rng(seed)
    keep0 = np.sort(rng.permutation(len(x0))[:max_points]) if len(x0) > max_points else np.arange(len(x0))
    extras = {}
    for name, (x, y, n_orig) in projections.items():
        aug = np.arange(n_orig, len(x))
        pick = np.sort(rng.permutation(aug)[:max_points]) if len(aug) > max_points else aug
        extras[name] = (x[pick], y[pick], 0)
    return (x0[keep0], y0[keep0], d0[keep0]), extras


def _plot_embeddings(first_train: tuple, projections: dict, file, tsne: bool, seed: int = 0,
                     classes: list[str] | None = None, max_points: int = 2000) -> dict:
    """Training embeddings (colour: class, marker: domain) and, for every augmenting method,
    the originals (dots) with its augmentations (crosses), all in one projection (PCA fitted
    once on the originals, or one t-SNE of every point) with shared axes and a class legend;
    at most ``max_points`` of each (:func:`_embedding_points`)."""
    import matplotlib
    from matplotlib.lines import Line2D

    (x0, y0k, d0k), picked = _embedding_points(first_train, projections, seed, max_points)
    names, extras = list(picked), [(x, y) for x, y, _ in picked.values()]
    xy0, xys = _project(x0, [e[0] for e in extras], tsne, seed)
    n_classes = len(classes) if classes else int(max([first_train[1].max(initial=0)] + [e[1].max(initial=0) for e in extras])) + 1
    cmap = matplotlib.colormaps["tab10" if n_classes <= 10 else "tab20"]
    colour = lambda labels: [cmap(int(v) % cmap.N) for v in labels]  # noqa: E731
    domains = sorted(set(d0k.tolist()))
    markers = "os^DvP*X"
    n_panels = 1 + len(extras)
    cols = min(4, n_panels)
    rows = -(-n_panels // cols)
    fig, axes = _subplots(rows, cols, figsize=(3.6 * cols, 3.6 * rows + 0.8), squeeze=False, sharex=True, sharey=True)
    for i, dom in enumerate(domains):
        m = d0k == dom
        axes[0][0].scatter(xy0[m, 0], xy0[m, 1], c=colour(y0k[m]), s=8, marker=markers[i % len(markers)])
    axes[0][0].set_title(f"original ({len(x0)} rows)", fontsize=8)
    if len(domains) > 1:
        axes[0][0].legend([Line2D([], [], marker=markers[i % len(markers)], color="0.3", linestyle="") for i in range(len(domains))],
                          [d or "(none)" for d in domains], fontsize=6, title="domain", title_fontsize=6)
    for k, (name, (_, ya), xya) in enumerate(zip(names, extras, xys), start=1):
        ax = axes[k // cols][k % cols]
        ax.scatter(xy0[:, 0], xy0[:, 1], c=colour(y0k), s=6, marker="o", alpha=0.35)
        ax.scatter(xya[:, 0], xya[:, 1], c=colour(ya), s=8, marker="x", linewidths=0.8)
        ax.set_title(f"{name}: originals (dots) + {len(xya)} augmentations (x)", fontsize=7)
    for k in range(n_panels, rows * cols):
        axes[k // cols][k % cols].axis("off")
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    shown = sorted(set(y0k.tolist()))[:20]
    handles = [Line2D([], [], marker="o", color=cmap(c % cmap.N), linestyle="") for c in shown]
    labels = [classes[c] if classes and c < len(classes) else str(c) for c in shown]
    fig.legend(handles, labels, loc="lower center", ncol=min(10, len(shown)), fontsize=7, frameon=False,
               title="class" + (" (first 20)" if len(set(y0k.tolist())) > 20 else ""), title_fontsize=7)
    how = "one t-SNE of all points" if tsne else "PCA fitted once on the original rows"
    fig.suptitle(f"training embeddings, seed 0: {how}, the same axes in every panel", fontsize=8)
    fig.tight_layout(rect=(0, 0.1 if rows == 1 else 0.06, 1, 1))
    fig.savefig(file, dpi=110, format="png")
    drawn = {"panels": [ax.get_title() for ax in axes.flat if ax.axison], "legend": labels,
             "limits": {(ax.get_xlim(), ax.get_ylim()) for ax in axes.flat if ax.axison}}
    return drawn


def _has_both_axes(report: dict) -> bool:
    return any(r["in_domain"]["mean"] is not None and r["out_of_domain"]["mean"] is not None for r in report["summary"])


def _plot_tradeoff(report: dict, file) -> None:
    """In-domain against out-of-domain accuracy, one point per method with error bars of
    the std over seeds, the Pareto front (no method better on both axes) in red."""

    from vlaug.metrics import pareto_front

    rows = [r for r in report["summary"] if r["in_domain"]["mean"] is not None and r["out_of_domain"]["mean"] is not None]
    pts = [(100 * r["in_domain"]["mean"], 100 * r["out_of_domain"]["mean"]) for r in rows]
    front = set(pareto_front(pts))
    labels = _plot_labels([r["method"] for r in rows])
    fig, ax = _subplots(figsize=(7, 5.5))
    for i, r in enumerate(rows):
        on = i in front
        ax.errorbar(*pts[i], xerr=100 * r["in_domain"]["std"], yerr=100 * r["out_of_domain"]["std"], fmt="o", capsize=3,
                    color="tab:red" if on else "tab:blue", ms=6 if on else 4, zorder=3 if on else 2)
        ax.annotate(labels[i], pts[i], xytext=(4, 3), textcoords="offset points", fontsize=7,
                    color="tab:red" if on else "0.25", fontweight="bold" if on else "normal")
    line = sorted(pts[i] for i in front)
    ax.plot([p[0] for p in line], [p[1] for p in line], "--", color="tab:red", lw=1, zorder=1,
            label="Pareto front: no method is better on both axes")
    p = report["protocol"]
    ax.set_xlabel(f"in-domain accuracy (%): {', '.join(p['train_domains']) or 'training domains'}, held-out rows")
    ax.set_ylabel(f"out-of-domain accuracy (%): {', '.join(p['test_domains'])}")
    ax.set_title(f"{report['model']}: mean ± std over {len(p['seeds'])} seeds", fontsize=9)
    ax.margins(x=0.12, y=0.08)  # room for the labels of the points at the edges
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(file, dpi=120, format="png")


def _plot_per_domain(report: dict, file):
    """Mean accuracy per method (rows) and domain (columns), as a heat map with the values."""
    import numpy as np

    rows = report["summary"]
    domains = sorted({d for r in rows for d in r["per_domain"]})
    train = set(report["protocol"]["train_domains"])
    values = np.array([[100 * r["per_domain"][d]["mean"] if d in r["per_domain"] else np.nan for d in domains]
                       for r in rows], dtype=float)
    fig, ax = _subplots(figsize=(max(4.0, 1.1 * len(domains) + 2.5), max(2.5, 0.35 * len(rows) + 1.2)))
    image = ax.imshow(np.ma.masked_invalid(values), cmap="viridis", vmin=0, vmax=100, aspect="auto")
    for i in range(len(rows)):
        for j in range(len(domains)):
            if not np.isnan(values[i, j]):
                ax.text(j, i, f"{values[i, j]:.1f}", ha="center", va="center", fontsize=7,
                        color="white" if values[i, j] < 60 else "black")
    ax.set_xticks(range(len(domains)), [f"{d}{' (train)' if d in train else ''}" for d in domains], fontsize=8)
    ax.set_yticks(range(len(rows)), _plot_labels([r["method"] for r in rows]), fontsize=7)
    fig.colorbar(image, ax=ax, label="top-1 accuracy (%)")
    ax.set_title(f"accuracy per domain, mean over {len(report['protocol']['seeds'])} seeds", fontsize=9)
    fig.tight_layout()
    fig.savefig(file, dpi=120, format="png")
    return values  # (methods, domains) in %


# A plot to draw: (file name in the report folder, the plot function's name in this module,
# its arguments but ``file``, its keyword arguments)
Job = tuple[str, str, tuple, dict]


def _box_file(head: str) -> str:
    return f"box_volume_{_safe_name(head)}.png"


def data_plots(first_train: tuple, projections: dict, tsne: bool, classes: list[str], box_stats: dict) -> list[Job]:
    """The plots drawn from the data alone, known before any probe is fitted: the training
    embeddings with every method's augmentations, and each box head's volumes."""
    jobs = [("embeddings.png", "_plot_embeddings", _embedding_points(first_train, projections), {"tsne": tsne, "classes": classes})]
    jobs += [(_box_file(head), "_plot_box_volume", (stats, head), {}) for head, stats in box_stats.items() if stats]
    return jobs


def _plot_domainbed(report: dict, file) -> None:
    """DomainBed's tables as bars: per test domain (and Avg), each method's mean accuracy
    with its std over seeds; one panel per selection."""
    import numpy as np

    domains = report["protocol"]["test_domains"]
    selections = list(report["tables"])
    methods = [r["method"] for r in report["tables"][selections[0]]]
    x = np.arange(len(domains) + 1)
    width = 0.8 / max(1, len(methods))
    fig, axes = _subplots(len(selections), 1, figsize=(max(6, 1.0 * (len(domains) + 1) * max(1, len(methods)) / 3 + 3),
                                                        2.8 * len(selections) + 0.6), squeeze=False)
    for ax, selection in zip(axes[:, 0], selections):
        for i, r in enumerate(report["tables"][selection]):
            stats = [r["domains"].get(d) for d in domains] + [r.get("avg")]
            means = [100 * s["mean"] if s else 0 for s in stats]
            stds = [100 * s["std"] if s else 0 for s in stats]
            ax.bar(x + (i - (len(methods) - 1) / 2) * width, means, width, yerr=stds, capsize=2, label=_plot_labels(methods)[i])
        ax.set_xticks(x, [*domains, "Avg"], fontsize=8)
        ax.set_ylabel("accuracy (%)", fontsize=8)
        ax.set_title(SELECTION_TITLES[selection].split(" (")[0] + (" (uses test-domain labels)" if selection == "oracle" else ""),
                     fontsize=9)
    axes[0, 0].legend(fontsize=7, ncol=min(4, len(methods)))
    fig.suptitle(f"{report['model']}: test domain held out, mean ± std over {len(report['protocol']['seeds'])} seeds",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(file, dpi=120, format="png")


def _plot_shots(report: dict, file) -> None:
    """A shots sweep: per method, the mean accuracy (± std over seeds) against K, in domain
    and, when there are unseen domains, out of domain (LARE's Fig. 4, CoOp's and
    Tip-Adapter's figure)."""
    runs = report["shots_sweep"]["per_shots"]
    shots = [run["shots"] for run in runs]
    keys = [("in_domain", "in domain")] + ([("out_of_domain", "out of domain")] if report["protocol"]["test_domains"] else [])
    fig, axes = _subplots(1, len(keys), figsize=(5.2 * len(keys), 4.2), squeeze=False)
    methods = [r["method"] for r in runs[0]["summary"]]
    for ax, (key, title) in zip(axes[0], keys):
        for method, label in zip(methods, _plot_labels(methods)):
            stats = [next((r[key] for r in run["summary"] if r["method"] == method), None) for run in runs]
            points = [(k, s) for k, s in zip(shots, stats) if s and s.get("mean") is not None]
            if points:
                ax.errorbar([k for k, _ in points], [100 * s["mean"] for _, s in points],
                            yerr=[100 * s["std"] for _, s in points], marker="o", ms=3, capsize=2, lw=1, label=label)
        ax.set_xscale("log", base=2)
        ax.set_xticks(shots, [str(k) for k in shots])
        ax.set_xlabel("training images per class (K)")
        ax.set_ylabel(f"accuracy {title} (%)")
        ax.grid(alpha=0.3)
        ax.set_title(title, fontsize=9)
    axes[0, -1].legend(fontsize=7)
    fig.suptitle(f"{report['model']}: mean ± std over {len(report['protocol']['seeds'])} seeds", fontsize=9)
    fig.tight_layout()
    fig.savefig(file, dpi=120, format="png")


def result_plots(report: dict) -> list[Job]:
    """The plots of the results (``report``'s summary, model and protocol): accuracy per
    method, per domain, and in- against out-of-domain when both are measured (DomainBed's
    protocol: its tables' plot)."""
    if is_domainbed(report):
        return [("domainbed.png", "_plot_domainbed", (report,), {})]
    jobs = [("accuracy.png", "_plot_accuracy", (report,), {}), ("per_domain.png", "_plot_per_domain", (report,), {})]
    if _has_both_axes(report):
        jobs.append(("tradeoff.png", "_plot_tradeoff", (report,), {}))
    if report.get("shots_sweep"):
        jobs.append(("shots.png", "_plot_shots", (report,), {}))
    return jobs


def _same_vlaug_env() -> dict:
    """This process's environment, with the folder this vlaug was imported from first on
    the path: a child process imports the same vlaug (a checkout that is not installed, or
    another copy than the installed one)."""
    import os

    here = str(Path(__file__).resolve().parent.parent)
    return {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (here, os.environ.get("PYTHONPATH", "")) if p)}


class PlotWorker:
    """A second process that draws a report's plots while this one works. Started when a
    run begins, it imports matplotlib (slow) while this process imports torch; plots
    whose data is known early (:meth:`submit`: the embeddings, before the fits) are drawn
    meanwhile, into memory; :meth:`write` hands it the rest and writes
    every plot into the report's folder. Any plot the worker could not draw (it could not
    start, died or failed on that plot) is drawn in this process. ``start`` None: no
    process where matplotlib is already imported here (nothing to hide); True: always
    one; False: none."""

    def __init__(self, start: bool | None = None):
        import subprocess
        import sys

        self._proc = self._writer = None
        self.sent: set[str] = set()  # the file names of the plots submitted
        if start is False or (start is None and "matplotlib.figure" in sys.modules):
            return
        try:
            self._proc = subprocess.Popen([sys.executable, "-c", "from vlaug.report import _serve_plots; _serve_plots()"],
                                          stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                          env=_same_vlaug_env())
        except OSError:
            self._proc = None

    def submit(self, jobs: list[Job]) -> None:
        """Start drawing ``jobs`` in the worker now, but those (by file name) submitted
        before; without a worker, nothing: :meth:`write` draws them."""
        import pickle

        jobs = [job for job in jobs if job[0] not in self.sent]
        if self._proc is None or not jobs:
            return
        try:
            data = pickle.dumps(jobs)
        except (pickle.PicklingError, TypeError, AttributeError):  # drawn here, by write()
            self.close()
            return
        self.sent.update(name for name, *_ in jobs)
        self._send(data)

    def submit_data(self, first_train: tuple, projections: dict, tsne: bool, classes: list[str], box_stats: dict) -> None:
        """The data's plots (:func:`data_plots`), known before any fit (:class:`vlaug.runs.Plots`)."""
        self.submit(data_plots(first_train, projections, tsne, classes, box_stats))

    def submit_results(self, report: dict) -> None:
        """The results' plots (:func:`result_plots`), known once every seed is fitted."""
        self.submit(result_plots(report))

    def _send(self, data: bytes) -> None:
        """Write ``data`` to the worker from a thread, after what was sent before: this
        process does not wait for the worker to read (it may still be importing)."""
        import threading

        proc, before = self._proc, self._writer

        def send():
            if before is not None:
                before.join()
            try:
                proc.stdin.write(data)
                proc.stdin.flush()
            except (OSError, ValueError):  # the worker is gone (or closed): write() draws here
                pass

        self._writer = threading.Thread(target=send, daemon=True)
        self._writer.start()

    def write(self, jobs: list[Job], folder) -> None:
        """Write every plot of ``jobs`` into ``folder``: the worker's (those submitted earlier
        and the others, handed to it now) and, drawn here, any it could not draw."""
        import pickle

        drawn = {}
        self.submit(jobs)
        proc, self._proc = self._proc, None
        if proc is not None:
            try:
                if self._writer is not None:
                    self._writer.join()
                pickle.dump(None, proc.stdin)  # no more plots
                proc.stdin.close()
                reply = proc.stdout.read()
                if proc.wait() == 0:
                    drawn = pickle.loads(reply)
            except (OSError, EOFError, pickle.UnpicklingError):
                pass
            _stop(proc)
        for name, *job in jobs:
            if name in drawn:
                (Path(folder) / name).write_bytes(drawn[name])
            else:
                _draw(name, *job, folder=folder)

    def close(self) -> None:
        """Stop the worker (a run that ended without a report)."""
        if self._proc is not None:
            _stop(self._proc)
            self._proc = None


def _stop(proc) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait()
    for pipe in (proc.stdin, proc.stdout):
        try:
            pipe.close()
        except OSError:  # a write the worker never read (it is gone)
            pass


def _draw(name: str, function: str, args: tuple, kwargs: dict, folder=None) -> bytes | None:
    """Draw one plot into ``folder``/``name``, or (no folder) into PNG bytes."""
    import io

    file = io.BytesIO() if folder is None else Path(folder) / name
    globals()[function](*args, file=file, **kwargs)
    return file.getvalue() if folder is None else None


def _draw_all(jobs: list[Job]) -> dict[str, bytes]:
    """PNG bytes of each plot of ``jobs`` that could be drawn. On Linux, every plot but the
    first is drawn in a fork of this process (which runs no Python thread; numpy's BLAS
    threads handle fork), matplotlib imported, while this one draws the first: a report's
    plots side by side on the cores the fits no longer use. A child that has not answered
    within CHILD_SECONDS is stopped, its plot left out."""
    import os
    import signal
    import sys
    import time

    children = []
    if sys.platform.startswith("linux") and len(jobs) > 1:
        for job in jobs[1:]:
            read, write = os.pipe()
            try:
                pid = os.fork()
            except OSError:
                os.close(read)
                os.close(write)
                break
            if pid == 0:  # the child: draw, answer, and leave without running the parent's exit code
                os.close(read)
                try:
                    png = _draw(*job)
                    with os.fdopen(write, "wb") as out:
                        out.write(png)
                    status = 0
                except BaseException:  # noqa: BLE001 - the parent leaves it to the main process
                    status = 1
                os._exit(status)
            os.close(write)
            children.append((job[0], pid, read))
    drawn = {}
    for job in jobs[:1] + jobs[1 + len(children):]:  # this process's: the first, and any it could not fork for
        try:
            drawn[job[0]] = _draw(*job)
        except Exception:  # noqa: BLE001 - drawn again by the main process, which reports the error
            pass
    deadline = time.monotonic() + CHILD_SECONDS
    for name, pid, read in children:
        png = _read_until(read, deadline)
        if png is None:  # a child that hangs (a lock held at fork by another thread): its plot is drawn by the main process
            os.kill(pid, signal.SIGKILL)
        if os.waitpid(pid, 0)[1] == 0 and png is not None:
            drawn[name] = png
    return drawn


# How long the forked children of a batch of plots may take, together, before they are
# stopped and their plots left to the main process (a plot takes well under a second).
CHILD_SECONDS = 120.0


def _read_until(fd: int, deadline: float) -> bytes | None:
    """Everything a child writes to ``fd`` until it closes it, or None past ``deadline``
    (``time.monotonic``); ``fd`` is closed either way."""
    import os
    import select
    import time

    chunks = []
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                return None
            chunk = os.read(fd, 1 << 20)
            if not chunk:
                return b"".join(chunks)
            chunks.append(chunk)
    finally:
        os.close(fd)


def _serve_plots() -> None:
    """The :class:`PlotWorker` process: import matplotlib, then read batches of plots from
    stdin and draw each as it arrives; on the end mark (None) answer on stdout with the
    pickled ``{file name: PNG bytes}`` of the plots it drew (one that failed is left out,
    for the main process to draw). Single-threaded, so that it may fork (:func:`_draw_all`)."""
    import os
    import pickle
    import sys

    import matplotlib.backends.backend_agg  # noqa: F401 - imported before the plots arrive: the point
    import matplotlib.figure  # noqa: F401

    drawn = {}
    while True:
        try:
            jobs = pickle.load(sys.stdin.buffer)
        except Exception:  # noqa: BLE001 - end of input without the mark: the main process is gone
            return
        if jobs is None:
            break
        drawn.update(_draw_all(jobs))
        jobs = None  # not held while the next batch is awaited
    sys.stdout.buffer.write(pickle.dumps(drawn))
    sys.stdout.flush()
    os._exit(0)  # the main process waits for this exit: no interpreter teardown (slow once matplotlib is imported)


PREDICTIONS_NAME = "test_predictions.parquet"


def _write_predictions(path: Path, columns: dict) -> None:
    """Every test row's prediction per method and seed, one Parquet row each (for paired
    comparisons between methods: same rows, same seeds). String columns are dictionary
    columns (readers decode them to strings)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from vlaug.runs import Coded

    def arrow(column, kind):
        if isinstance(column, Coded):
            return pa.DictionaryArray.from_arrays(pa.array(column.codes, pa.int32()), pa.array(column.values.tolist(), pa.string()))
        return pa.array(column, kind)

    kinds = {"method": None, "seed": pa.int32(), "row": pa.int64(), "id": None, "domain": None, "label": pa.int32(),
             "prediction": pa.int32(), "test_domain": None, "model_selection": None,  # --protocol leave-one-domain-out
             "shots": pa.int32()}  # a --shots sweep: which K's model predicted
    pq.write_table(pa.table({name: arrow(columns[name], kind) for name, kind in kinds.items() if name in columns}), path)


def write_report(out, run: "ProbeRun", tsne: bool = False, plots: PlotWorker | None = None) -> dict:
    """Write REPORT_DIR atomically: report.json, report.md, PNG plots, probes/METHOD/ and
    test_predictions.parquet (every test row's prediction per method and seed).

    The folder is built under a temporary name and renamed into place, so a failure
    leaves no half-written report. Returns the report as written to report.json.
    ``plots``: a :class:`PlotWorker` started earlier (given to :func:`~vlaug.evaluate.run_probe`
    too, it drew the plots it could meanwhile: give it with the run it was given to, and
    the same ``tsne``, as plots are known by their file names); without one the plots are
    drawn here.
    """
    import json

    from vlaug import checkpoint
    from vlaug.cache import atomic_directory

    out = Path(out)
    with atomic_directory(out) as tmp:
        public = dict(run.report)
        public["probe_dirs"] = {method: f"probes/{_safe_name(method)}" for method in run.probes}
        public["plots"] = {"accuracy": "accuracy.png", "embeddings": "embeddings.png", "per_domain": "per_domain.png",
                           "box": {head: _box_file(head) for head, stats in run.box_stats.items() if stats}}
        if is_domainbed(public):
            public["plots"] = {"domainbed": "domainbed.png", "embeddings": "embeddings.png", "box": {}}
        elif _has_both_axes(public):  # in-domain vs out-of-domain, one point per method
            public["plots"]["tradeoff"] = "tradeoff.png"
        if public.get("shots_sweep"):
            public["plots"]["shots"] = "shots.png"
        jobs = result_plots(public) + data_plots(run.first_train, run.projections, tsne, public["classes"], run.box_stats)
        plots = plots or PlotWorker(start=False)
        plots.submit(jobs)  # drawn there while the files are written here
        (tmp / "probes").mkdir()
        for method, probe in run.probes.items():
            checkpoint.save_head(
                tmp / public["probe_dirs"][method], "probe", probe,
                {"training": {"method": method, "refit_on": "train + val rows of seed 0", **public["config"]},
                 "cache": {**run.cache, "texts": run.texts_used.get(method, {})}, "history": [], "selected_epoch": 0},
            )
        if run.test_predictions:
            _write_predictions(tmp / PREDICTIONS_NAME, run.test_predictions)
            public["test_predictions"] = PREDICTIONS_NAME
        public = _json_ready(public)
        (tmp / "report.json").write_text(json.dumps(public, indent=2) + "\n", encoding="utf-8")
        (tmp / "report.md").write_text(format_markdown(public), encoding="utf-8")
        plots.write(jobs, tmp)
    return public
