"""The terminal rendering of an explanation, with rich: the text coloured by surprisal, the next-token table and
the logit lens.

Colours follow the surprisal of each token given the tokens before it, in bits: green (expected, < 1 bit, the
model gave it more than 50%), through yellow, to red (> 10 bits, less than 1 in 1,000).
"""

from __future__ import annotations

import math

from scratchlm.explain.views import Explanation

# (upper bound in bits, background colour): the first bound the surprisal stays under picks the colour.
SURPRISAL_COLOURS = ((1.0, "green4"), (3.0, "chartreuse4"), (6.0, "yellow4"), (10.0, "dark_orange3"),
                     (math.inf, "red3"))
LENS_COLUMNS = 8  # the logit lens shows the last few positions: one column per token does not fit a terminal


def surprisal_style(bits: float | None) -> str:
    if bits is None:
        return "on grey30"
    return "on " + next(colour for bound, colour in SURPRISAL_COLOURS if bits < bound)


def pct(p: float) -> str:
    return f"{100 * p:.1f}%" if p >= 0.001 else f"{100 * p:.3f}%"


def render(view: Explanation, console=None, lens_columns: int = LENS_COLUMNS) -> None:
    """Print ``view`` to ``console`` (a ``rich.console.Console``; stdout by default)."""
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    console = console or Console()
    positions = view.positions
    mean = view.mean_surprisal
    console.print(f"[bold]{view.model}[/bold]: {len(view.ids)} tokens"
                  + (f", mean surprisal {mean:.2f} bits (perplexity {2 ** mean:.1f})" if not math.isnan(mean) else ""))
    legend = Text("surprisal: ")
    for bound, colour in SURPRISAL_COLOURS:
        legend.append(f" < {bound:g} bits " if bound != math.inf else " more ", style=f"on {colour}")
    console.print(legend)

    text = Text()
    for i, label in enumerate(view.tokens):
        bits = positions[i - 1]["next"]["surprisal"] if i else None
        style = surprisal_style(bits) + (" underline" if i >= view.prompt_tokens else "")
        text.append(label, style=style)
    console.print(text)
    if view.prompt_tokens < len(view.ids):
        console.print(f"[dim](underlined: the model's reply, {len(view.ids) - view.prompt_tokens} tokens)[/dim]")

    table = Table(title="next-token view: after each token, what the model expected next", title_justify="left")
    for name, justify in (("#", "right"), ("token", "left"), ("top next tokens", "left"), ("actual next", "left"),
                          ("p", "right"), ("rank", "right"), ("bits", "right"), ("entropy", "right")):
        table.add_column(name, justify=justify)
    for pos in positions:
        top = "  ".join(f"{t['token']} {pct(t['prob'])}" for t in pos["top"])
        nxt = pos["next"]
        cells = [nxt["token"], pct(nxt["prob"]), str(nxt["rank"]), f"{nxt['surprisal']:.2f}"] if nxt else [""] * 4
        table.add_row(str(pos["index"]), pos["token"], top, Text(cells[0], style=surprisal_style(
            nxt["surprisal"] if nxt else None)), *cells[1:], f"{pos['entropy']:.2f}")
    console.print(table)

    if view.lens:
        shown = range(max(0, len(view.ids) - lens_columns), len(view.ids))
        lens = Table(title="logit lens: each layer's top prediction after the token (green: the actual next token)",
                     title_justify="left")
        lens.add_column("layer", justify="right")
        for t in shown:
            lens.add_column(f"#{t} {view.tokens[t]}")
        for layer in view.lens:
            cells = []
            for t in shown:
                best = layer["positions"][t]["top"][0]
                hit = t + 1 < len(view.ids) and best["id"] == view.ids[t + 1]
                cells.append(Text(f"{best['token']} {100 * best['prob']:.0f}%", style="bold green" if hit else ""))
            lens.add_row(layer["layer"], *cells)
        console.print(lens)
