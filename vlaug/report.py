"""Human-readable output: summaries for the terminal (and, as later stages land, the
JSON / Markdown reports and plots)."""

from __future__ import annotations


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
        lines.append(f"selected     epoch {selected} of {len(history)} (train loss {row['train_loss']:.4f}, val loss {val})")
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
