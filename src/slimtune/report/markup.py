"""Markup primitives of the report pages: `Html` (text built here) and the helpers that escape everything
else on the way in. Kept apart from the pages so that the parts of a page (html.py, figures.py) share them
without importing each other."""
from __future__ import annotations

import html


class Html(str):
    """Markup this module built. It is the only text that goes into a page as it is: everything else
    (names, metrics, labels, config values, warnings from a run folder, which may come from anywhere)
    is escaped on the way in, by `esc` and by `h`, so no value can open a tag or an attribute."""

    __slots__ = ()

    def __add__(self, other) -> "Html":  # Html + data: the data is escaped, the result stays Html
        return Html(str.__add__(self, esc(other)))

    def __radd__(self, other) -> "Html":
        return Html(str.__add__(esc(other), self))


def esc(x) -> Html:
    """Html stays as it is; anything else becomes its escaped text (quotes too: safe in attributes)."""
    if isinstance(x, Html):
        return x
    return Html(html.escape("" if x is None else str(x), quote=True))


def h(template: str, *args, **kwargs) -> Html:
    """`template` (markup written here, never data) with every argument escaped unless it is Html."""
    return Html(template.format(*(esc(a) for a in args), **{k: esc(v) for k, v in kwargs.items()}))


def join(parts) -> Html:
    return Html("".join(esc(p) for p in parts))


def table(headers: list, rows: list[list], numeric: set[int] | None = None, row_class: list[str] | None = None) -> Html:
    """Cells are escaped unless they are Html."""
    numeric = numeric or set()
    out = [Html('<div class="scroll"><table><thead><tr>'), *(h("<th>{}</th>", c) for c in headers),
           Html("</tr></thead><tbody>")]
    for i, row in enumerate(rows):
        cls = row_class[i] if row_class else ""
        out.append(h('<tr class="{}">', cls) if cls else Html("<tr>"))
        out += [h('<td class="num">{}</td>' if j in numeric else "<td>{}</td>", cell) for j, cell in enumerate(row)]
        out.append(Html("</tr>"))
    out.append(Html("</tbody></table></div>"))
    return join(out)


def kv_table(pairs: list[tuple[str, object]]) -> Html:
    rows = join(h("<tr><th>{}</th><td>{}</td></tr>", k, v) for k, v in pairs)
    return h('<div class="scroll"><table><tbody>{}</tbody></table></div>', rows)


def figure(uri: str | None, caption: str, alt: str, wide: bool = False) -> Html:
    if not uri:
        return Html("")
    return h('<figure{}><img src="{}" alt="{}"><figcaption>{}</figcaption></figure>',
             Html(' class="wide"') if wide else Html(""), uri, alt, caption)


def section(title: str, body, anchor: str | None = None) -> Html:
    if not body:
        return Html("")
    return h("<section{}><h2>{}</h2>{}</section>", h(' id="{}"', anchor) if anchor else Html(""), title, body)
