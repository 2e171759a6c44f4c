"""A griffe extension (mkdocs.yml loads it) that reads the docstrings as they are written.

The docstrings are Google style, with three habits griffe's parser does not know:

- Sphinx roles (``:func:`~lora_layers.inject_lora```). mkdocstrings renders
  Markdown, where a role would show as written; it becomes inline code of the
  name it shows (the last part after a ``~``).
- ``Text::`` before a literal block. It becomes ``Text:``, so the indented block
  after it reads as code and ``Example::`` as griffe's Examples section.
- One entry for several arguments (``r, lora_alpha: as Linear.``). griffe would
  take ``r, lora_alpha`` for one unknown argument; the entry is repeated for
  each name, so every argument gets its line and griffe can check the names.
"""
from __future__ import annotations

import re

from griffe import Extension, Object

ROLE = re.compile(r":(?:func|class|meth|mod|attr|data|exc|obj):`(~?)([^`]+)`")
LITERAL_BLOCK = re.compile(r"::$", re.M)
ITEM_SECTION = re.compile(r"^(\s*)(Args|Arguments|Parameters|Attributes):\s*$")
GROUPED_ITEM = re.compile(r"^(\s+)(\**\w+(?:,\s*\**\w+)+):(\s.*)?$")


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def split_grouped_items(text: str) -> str:
    """Each ``a, b: text`` entry of an Args or Attributes section as one entry per name."""
    lines, out, section_indent, i = text.splitlines(), [], None, 0
    while i < len(lines):
        line = lines[i]
        if line.strip() and section_indent is not None and _indent(line) <= section_indent:
            section_indent = None
        head, item = ITEM_SECTION.match(line), GROUPED_ITEM.match(line)
        i += 1
        if head:
            section_indent = len(head.group(1))
        elif item and section_indent is not None:
            indent, body = item.group(1), [item.group(3) or ""]
            while i < len(lines) and (not lines[i].strip() or _indent(lines[i]) > len(indent)):
                body.append("\n" + lines[i])
                i += 1
            while len(body) > 1 and not body[-1].strip():  # a blank line ends the entry; keep it
                body.pop()
                i -= 1
            for name in re.split(r",\s*", item.group(2)):
                out.append(f"{indent}{name}:{''.join(body)}")
            continue
        out.append(line)
    return "\n".join(out)


def markdown(text: str) -> str:
    """``text`` with the three habits above rewritten for griffe's Google-style parser."""
    text = ROLE.sub(lambda m: f"`{m.group(2).rsplit('.', 1)[-1] if m.group(1) else m.group(2)}`", text)
    return split_grouped_items(LITERAL_BLOCK.sub(":", text))


class RstRoles(Extension):
    def on_object(self, *, obj: Object, **kwargs) -> None:
        if obj.docstring is not None:
            obj.docstring.value = markdown(obj.docstring.value)
