"""A small, safe Markdown subset for a study's instructions and consent text (no dependency, no raw HTML).

Everything is HTML-escaped first, so a study file cannot put markup, scripts or event handlers on an annotator's
page; then these constructs become tags: ``#`` to ``###`` headings, paragraphs (blank-line separated; a single
newline is a line break), ``- `` / ``* `` bullet lists, ``1. `` numbered lists, ``> `` quotes, pipe tables (a
header row, a ``|---|---:|`` separator row, body rows; ``---:`` aligns a column right), ``**bold**``, ``*italic*``,
```code``` and ``[text](https://...)`` links (http, https and mailto only; they open in a new tab).
"""

from __future__ import annotations

import html
import re

from markupsafe import Markup

_BULLET, _NUMBER = re.compile(r"^\s*[-*]\s+"), re.compile(r"^\s*\d+[.)]\s+")
_QUOTE = re.compile(r"^\s*&gt;\s?")  # text is escaped before it is parsed: ">" arrives as "&gt;"
_TABLE_SEP = re.compile(r"^\|(\s*:?-{3,}:?\s*\|)+$")
_LINK = re.compile(r"\[([^\]\n]+)\]\(((?:https?://|mailto:)[^\s()<>\"']+)\)")
_INLINE = ((re.compile(r"`([^`\n]+)`"), r"<code>\1</code>"), (re.compile(r"\*\*([^*\n]+)\*\*"), r"<strong>\1</strong>"),
           (re.compile(r"(?<![*\w])\*([^*\n]+)\*(?![*\w])"), r"<em>\1</em>"))


def _inline(text: str) -> str:
    """Inline markup of already escaped text."""
    out = _LINK.sub(lambda m: f'<a href="{m[2]}" target="_blank" rel="noopener noreferrer">{m[1]}</a>', text)
    for pattern, repl in _INLINE:
        out = pattern.sub(repl, out)
    return out


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def _table(lines: list[str]) -> str:
    """A pipe table: header, separator (its ``---:`` columns are right-aligned), rows (short rows are padded)."""
    head, rows = _cells(lines[0]), [_cells(ln) for ln in lines[2:]]
    right = [c.endswith(":") for c in _cells(lines[1])]

    def row(cells: list[str], tag: str) -> str:
        cells = (cells + [""] * len(head))[:len(head)]
        align = [' style="text-align:right"' if k < len(right) and right[k] else "" for k in range(len(head))]
        return "<tr>" + "".join(f"<{tag}{align[k]}>{_inline(c)}</{tag}>" for k, c in enumerate(cells)) + "</tr>"

    return ("<table><thead>" + row(head, "th") + "</thead><tbody>" + "".join(row(r, "td") for r in rows)
            + "</tbody></table>")


def render(text: str) -> Markup:
    """HTML of ``text`` in the subset above; safe to put on a page as is."""
    blocks, out = re.split(r"\n\s*\n", html.escape(text.strip().replace("\r\n", "\n"), quote=True)), []
    for block in blocks:
        lines = [ln.rstrip() for ln in block.strip("\n").split("\n") if ln.strip()]
        if not lines:
            continue
        heading = re.match(r"^(#{1,3})\s+(.*)$", lines[0])
        if heading and len(lines) == 1:
            level = len(heading[1]) + 1  # the page's own title is h1
            out.append(f"<h{level}>{_inline(heading[2])}</h{level}>")
        elif len(lines) >= 2 and _TABLE_SEP.match(lines[1].strip()) and all(ln.lstrip().startswith("|")
                                                                              for ln in lines):
            out.append(_table(lines))
        elif all(_QUOTE.match(ln) for ln in lines):
            out.append("<blockquote><p>" + "<br>".join(_inline(_QUOTE.sub("", ln)) for ln in lines)
                       + "</p></blockquote>")
        elif all(_BULLET.match(ln) for ln in lines):
            out.append("<ul>" + "".join(f"<li>{_inline(_BULLET.sub('', ln))}</li>" for ln in lines) + "</ul>")
        elif all(_NUMBER.match(ln) for ln in lines):
            out.append("<ol>" + "".join(f"<li>{_inline(_NUMBER.sub('', ln))}</li>" for ln in lines) + "</ol>")
        else:
            out.append("<p>" + "<br>".join(_inline(ln) for ln in lines) + "</p>")
    return Markup("\n".join(out))
