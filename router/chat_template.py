"""`--chat-template`: a chat template for a checkpoint that has none, or in place of its own (vLLM's flag).

Base checkpoints (Mixtral-8x7B-v0.1 among them) ship no chat template, so every chat request to them is a
422 until one is given. The value is a file's path, or the template's text itself where it is no file and
reads as Jinja; in that inline form backslash escapes (`\\n`) are unescaped, as vLLM does, so a one-line
shell argument can hold newlines. The template is compiled at start-up in transformers' own Jinja
environment, the one `apply_chat_template` renders in, so a template that would fail every chat request
stops the launch with the reason instead.
"""

import codecs
from dataclasses import dataclass
from pathlib import Path

import jinja2

# What any Jinja template holds: an expression, a statement or a comment.
_JINJA_MARKS = ("{{", "{%", "{#")


@dataclass(frozen=True, slots=True)
class ChatTemplate:
    """A template given by flag: its text, and where it came from (a file's path, or `inline`)."""

    text: str
    source: str


def read_chat_template(value: str) -> ChatTemplate:
    """The template `value` names: a file's text, else `value` itself (unescaped) where it reads as Jinja.
    Raises ValueError where it is neither, or where the template does not compile."""
    path = Path(value).expanduser()
    try:
        is_file = path.is_file()
    except OSError:  # a long inline template is no valid path ("File name too long")
        is_file = False
    if is_file:
        template = ChatTemplate(path.read_text(encoding="utf-8"), str(path))
    elif any(mark in value for mark in _JINJA_MARKS):
        # Non-ASCII characters go through as escapes of their own, so that only the backslashes typed change.
        try:
            text = codecs.decode(value.encode("latin-1", "backslashreplace"), "unicode_escape")
        except UnicodeDecodeError as e:
            raise ValueError(f"the inline chat template has a malformed backslash escape: {e.reason}") from None
        template = ChatTemplate(text, "inline")
    else:
        raise ValueError(f"{value!r} is no file, and no Jinja template (no {{{{, {{% or {{#)")
    from transformers.utils.chat_template_utils import _compile_jinja_template

    try:
        _compile_jinja_template(template.text)
    except jinja2.TemplateError as e:
        line = f" (line {e.lineno})" if getattr(e, "lineno", None) else ""
        raise ValueError(f"the chat template from {template.source} does not compile{line}: {e}") from None
    return template
