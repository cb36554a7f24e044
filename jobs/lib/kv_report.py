"""What a person reads from a `kv_rank_study` run (stdlib only): the verdict on the "rank 32 keeps > 95 % with a ~95 %
memory cut" claim, the markdown table, and the SVG plot of agreement and KL against bytes, one line per method."""
from __future__ import annotations

import math
from typing import Any
from xml.sax.saxutils import escape

METHODS = ("svd", "int", "last_n", "sink_last", "full")
CLAIM_RANK = 32
CLAIM_FIDELITY = 0.95      # "> 95 % fidelity", read as top-1 agreement with the full cache
CLAIM_CUT = 0.90           # "~95 % memory cut", read generously as at least 90 % of the bytes gone
METHOD_NAMES = {"full": "full cache", "svd": "truncated SVD", "int": "int quantization", "last_n": "last N tokens",
                "sink_last": "first 4 + last N"}
COLORS = {"svd": "#1f77b4", "int": "#d62728", "last_n": "#2ca02c", "sink_last": "#ff7f0e", "full": "#000000"}


def _pct(x: float) -> str:
    return f"{100 * x:.1f} %"


def _rows(report: dict[str, Any], method: str) -> list[dict[str, Any]]:
    return sorted((r for r in report["results"] if r["method"] == method), key=lambda r: r["bytes"])


def verdict(report: dict[str, Any]) -> dict[str, Any]:
    """The claim's figures, whether it holds for this model and context, and a paragraph saying why."""
    head_dim, context = report["cache"]["head_dim"], report["context"]
    svd = {r["setting"]: r for r in _rows(report, "svd")}
    full = _rows(report, "full")[0]
    target = svd.get(CLAIM_RANK)
    enough = [r for r in svd.values() if r["top1_agreement"] >= CLAIM_FIDELITY]
    first_ok = min(enough, key=lambda r: r["setting"]) if enough else None
    out: dict[str, Any] = {"rank": CLAIM_RANK, "fidelity_needed": CLAIM_FIDELITY, "memory_cut_needed": CLAIM_CUT,
                           "holds": None, "smallest_rank_keeping_fidelity": first_ok and first_ok["setting"]}
    scope = (f"For {report['model']} at a {context}-token context ({report['positions']} continuation positions "
             f"over {len(report['passages'])} passages)")
    if target is None:
        out["text"] = (f"{scope}, rank {CLAIM_RANK} was not measured (ranks: "
                       f"{', '.join(map(str, sorted(svd)))}), so the claim is not tested here; add it to `ranks`.")
        return out
    cut = 1 - target["bytes_rel"]
    out.update(agreement=target["top1_agreement"], mean_kl=target["mean_kl"], memory_cut=cut,
               holds=target["top1_agreement"] > CLAIM_FIDELITY and cut >= CLAIM_CUT)
    parts = [f"{scope}, the claim {'holds' if out['holds'] else 'does not hold'}: rank {CLAIM_RANK} agrees with the "
             f"full cache on the top-1 next token at {_pct(target['top1_agreement'])} of positions (mean KL "
             f"{target['mean_kl']:.3f} nats; perplexity {target['perplexity']:.2f} against {full['perplexity']:.2f} "
             f"with the full cache) while cutting the cache by {_pct(cut)}, not ~95 %."]
    parts.append(f"The memory half of the claim fails on arithmetic alone: U, S and V of a T x {head_dim} matrix hold "
                 f"r(T + {head_dim} + 1) numbers against T x {head_dim}, so rank {CLAIM_RANK} keeps at least "
                 f"{CLAIM_RANK}/{head_dim} = {_pct(CLAIM_RANK / head_dim)} of the bytes at any context length "
                 f"({_pct(target['bytes_rel'])} here)." if CLAIM_RANK / head_dim > 1 - CLAIM_CUT else
                 f"Rank {CLAIM_RANK} stores {_pct(target['bytes_rel'])} of the full cache's bytes.")
    if first_ok is None:
        parts.append(f"No measured rank reaches {_pct(CLAIM_FIDELITY)} agreement (the best, rank {max(svd)}, "
                     f"reaches {_pct(svd[max(svd)]['top1_agreement'])} at {_pct(svd[max(svd)]['bytes_rel'])} "
                     f"of the bytes).")
    else:
        parts.append(f"The smallest measured rank reaching {_pct(CLAIM_FIDELITY)} agreement is {first_ok['setting']}, "
                     f"at {_pct(first_ok['bytes_rel'])} of the bytes.")
    parts.append(_equal_bytes_sentence(report, target))
    parts.append(_dominance_sentence(report))
    out["text"] = " ".join(p for p in parts if p)
    return out


def _dominance_sentence(report: dict[str, Any]) -> str:
    """At how many ranks some baseline with no more bytes agrees more often than SVD, with the largest such rank."""
    baselines = [r for r in report["results"] if r["method"] not in ("svd", "full")]
    beaten = []
    for row in _rows(report, "svd"):
        cheaper = [b for b in baselines if b["bytes"] <= row["bytes"]]
        best = max(cheaper, key=lambda b: b["top1_agreement"], default=None)
        if best is not None and best["top1_agreement"] > row["top1_agreement"]:
            beaten.append((row, best))
    if not beaten:
        return "No baseline with no more bytes agrees more often than SVD at any measured rank."
    row, best = beaten[-1]
    return (f"A baseline with no more bytes agrees more often than SVD at {len(beaten)} of "
            f"{len(_rows(report, 'svd'))} measured ranks (e.g. rank {row['setting']}, {_pct(row['bytes_rel'])} of "
            f"the bytes, {_pct(row['top1_agreement'])}: {best['label']} at {_pct(best['bytes_rel'])} agrees at "
            f"{_pct(best['top1_agreement'])}).")


def _equal_bytes_sentence(report: dict[str, Any], target: dict[str, Any]) -> str:
    """How rank 32 fares against the baselines nearest its bytes: evictions sized to it and the closest int width."""
    evicts = [r for r in report["results"] if r["matched_to"] == target["label"]]
    ints = _rows(report, "int")
    said = [f"keeping {r['label'].replace('last', 'the last')} tokens ({_pct(r['bytes_rel'])}) agrees at "
            f"{_pct(r['top1_agreement'])} (KL {r['mean_kl']:.3f})" for r in evicts]
    if ints:
        near = min(ints, key=lambda r: abs(r["bytes_rel"] - target["bytes_rel"]))
        said.append(f"{near['label']} ({_pct(near['bytes_rel'])}) agrees at {_pct(near['top1_agreement'])} "
                    f"(KL {near['mean_kl']:.3f})")
    if not said:
        return ""
    better = [r for r in evicts + ints
              if r["bytes"] <= target["bytes"] and r["top1_agreement"] > target["top1_agreement"]]
    tail = (f"; {', '.join(r['label'] for r in better)} beat{'s' if len(better) == 1 else ''} SVD with no more bytes"
            if better else "; SVD is ahead of them all at these bytes")
    return f"At about the same bytes, {', '.join(said[:-1]) + ' and ' if len(said) > 1 else ''}{said[-1]}{tail}."


def render_markdown(report: dict[str, Any]) -> str:
    cache = report["cache"]
    lines = [f"# KV rank study: {report['model']}", "",
             f"- context {report['context']} tokens, continuation {report['continuation']} tokens teacher-forced, "
             f"{len(report['passages'])} passages from `{report['texts']}`, {report['positions']} positions scored",
             f"- cache: {cache['layers']} layers ({cache['sliding_layers']} sliding-window of "
             f"{cache['sliding_window']}, holding {cache['sliding_tokens']} positions; {cache['global_layers']} "
             f"global, holding {cache['global_tokens']}), {cache['kv_heads']} KV head(s) of {cache['head_dim']}; "
             f"computed in {cache['compute_dtype']}, bytes counted at {cache['storage_float_bytes']} bytes per float "
             f"(full prefix cache: {cache['full_bytes'] / 2**20:.2f} MiB)", "",
             report["method"], "",
             "| method | bytes vs full | top-1 agreement | mean KL (nats) | perplexity | K / V energy kept | "
             "sized to |", "|---|---:|---:|---:|---:|---:|---|"]
    for r in report["results"]:
        energy = r.get("energy_kept")
        kept = f"{_pct(energy['keys'])} / {_pct(energy['values'])}" if energy else ""
        lines.append(f"| {r['label']} | {_pct(r['bytes_rel'])} | {_pct(r['top1_agreement'])} | {r['mean_kl']:.4f} "
                     f"| {r['perplexity']:.2f} | {kept} | {r['matched_to'] or ''} |")
    lines += ["", "Energy kept: the share of each head's squared singular values (Frobenius norm) in the top r, "
              "averaged over layers, heads and passages."]
    lines += ["", "## Verdict", "", report["claim"]["text"]]
    if report["skipped"]:
        lines += ["", "Skipped (shorter than context + continuation + 1 tokens): " +
                  ", ".join(f"{s['id']} ({s['tokens']} tokens)" for s in report["skipped"])]
    return "\n".join(lines) + "\n"


def render_svg(report: dict[str, Any]) -> str:
    """Two panels, top-1 agreement and mean KL (log scale) against bytes relative to the full cache."""
    rows = report["results"]
    x_max = max(1.0, max(r["bytes_rel"] for r in rows))
    x_max = math.ceil(x_max * 10) / 10
    kls = [r["mean_kl"] for r in rows if r["mean_kl"] > 0]
    kl_lo = 10 ** math.floor(math.log10(min(kls))) if kls else 1e-4
    kl_hi = 10 ** math.ceil(math.log10(max(kls))) if kls else 1.0
    kl_hi = max(kl_hi, kl_lo * 10)
    width, height = 920, 410
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="12">',
           f'<rect width="{width}" height="{height}" fill="white"/>',
           f'<text x="{width / 2}" y="20" text-anchor="middle" font-size="14">'
           f'{escape(report["model"])}: context {report["context"]}, continuation {report["continuation"]}</text>']
    agree = _Panel(60, 40, 360, 300, (0, x_max), (0, 1), log_y=False)
    kl = _Panel(520, 40, 360, 300, (0, x_max), (kl_lo, kl_hi), log_y=True)
    out += agree.axes("bytes relative to the full cache", "top-1 agreement with full cache",
                      [i / 4 for i in range(5)], lambda v: f"{v:.0%}")
    decades = range(round(math.log10(kl_lo)), round(math.log10(kl_hi)) + 1)
    out += kl.axes("bytes relative to the full cache", "mean KL(full || variant), nats",
                   [10.0 ** e for e in decades], lambda v: f"1e{round(math.log10(v))}")
    for method in METHODS:
        pts = sorted((r["bytes_rel"], r["top1_agreement"], r["mean_kl"], r["label"])
                     for r in rows if r["method"] == method)
        if not pts:
            continue
        color = COLORS[method]
        out += agree.series([(x, a) for x, a, _, _ in pts], color, [lab for *_, lab in pts],
                            annotate=method in ("svd", "int"))
        out += kl.series([(x, k) for x, _, k, _ in pts if k > 0], color, [lab for _, _, k, lab in pts if k > 0])
    for i, method in enumerate(METHODS):
        x, y = 40 + 175 * i, 400
        out += [f'<line x1="{x}" y1="{y - 4}" x2="{x + 24}" y2="{y - 4}" stroke="{COLORS[method]}" stroke-width="2"/>',
                f'<text x="{x + 30}" y="{y}">{METHOD_NAMES[method]}</text>']
    return "\n".join(out + ["</svg>"]) + "\n"


class _Panel:
    """One plot area: maps data to pixels and draws axes, ticks and a labelled polyline."""

    def __init__(self, left: float, top: float, w: float, h: float, xr: tuple, yr: tuple, log_y: bool) -> None:
        self.left, self.top, self.w, self.h, self.xr, self.yr, self.log_y = left, top, w, h, xr, yr, log_y

    def px(self, x: float, y: float) -> tuple[float, float]:
        fx = (x - self.xr[0]) / (self.xr[1] - self.xr[0])
        if self.log_y:
            y = min(max(y, self.yr[0]), self.yr[1])
            fy = (math.log10(y) - math.log10(self.yr[0])) / (math.log10(self.yr[1]) - math.log10(self.yr[0]))
        else:
            fy = (y - self.yr[0]) / (self.yr[1] - self.yr[0])
        return round(self.left + fx * self.w, 1), round(self.top + (1 - fy) * self.h, 1)

    def axes(self, xlabel: str, ylabel: str, yticks: list[float], fmt) -> list[str]:
        l, t, w, h = self.left, self.top, self.w, self.h
        out = [f'<rect x="{l}" y="{t}" width="{w}" height="{h}" fill="none" stroke="#888"/>']
        for i in range(int(round(self.xr[1] * 10)) + 1):
            x = i / 10
            if i % 2 and self.xr[1] > 1:
                continue
            px, _ = self.px(x, self.yr[0])
            out += [f'<line x1="{px}" y1="{t + h}" x2="{px}" y2="{t + h + 4}" stroke="#888"/>',
                    f'<text x="{px}" y="{t + h + 17}" text-anchor="middle">{x:.0%}</text>']
        for v in yticks:
            _, py = self.px(self.xr[0], v)
            out += [f'<line x1="{l}" y1="{py}" x2="{l + w}" y2="{py}" stroke="#eee"/>',
                    f'<text x="{l - 6}" y="{py + 4}" text-anchor="end">{fmt(v)}</text>']
        out += [f'<text x="{l + w / 2}" y="{t + h + 34}" text-anchor="middle">{escape(xlabel)}</text>',
                f'<text x="{l - 46}" y="{t + h / 2}" text-anchor="middle" '
                f'transform="rotate(-90 {l - 46} {t + h / 2})">{escape(ylabel)}</text>']
        return out

    def series(self, pts: list[tuple[float, float]], color: str, labels: list[str],
               annotate: bool = False) -> list[str]:
        if not pts:
            return []
        coords = [self.px(x, y) for x, y in pts]
        out = [f'<polyline fill="none" stroke="{color}" stroke-width="2" '
               f'points="{" ".join(f"{x},{y}" for x, y in coords)}"/>']
        for i, ((x, y), label) in enumerate(zip(coords, labels)):
            out += [f'<circle cx="{x}" cy="{y}" r="3" fill="{color}"><title>{escape(label)}</title></circle>']
            if annotate:  # alternately below and above: neighbouring small ranks sit a few pixels apart
                dy = 15 if i % 2 == 0 else -6
                out += [f'<text x="{x + 3}" y="{y + dy}" font-size="10" fill="{color}">'
                        f'{escape(label.replace("svd ", ""))}</text>']
        return out
