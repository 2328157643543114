"""YAML loading for recipes, constitutions and ``--set`` values.

- YAML 1.2 floats: PyYAML follows YAML 1.1, where `5e-5` is the string '5e-5'. Recipes are full
  of learning rates written that way.
- Safe against malformed input: a key given twice in one mapping is an error naming the key and
  both lines (YAML would silently keep the second, dropping the first's data); aliases are
  bounded in number and in what they add once expanded (an alias bomb of a few hundred bytes
  expands to gigabytes); nesting is bounded in depth (deeper input would overflow Python's stack);
  a control character YAML does not allow (NUL, BEL, ESC as raw bytes) is named with its line.
  Each is a ``yaml.YAMLError`` with the line, so callers report it as they report a syntax error.
- ``read_text``: a file's text, refusing a missing path, a directory, a file over ``MAX_BYTES``
  and text that is not UTF-8, each as one line naming the path. A UTF-8 byte-order mark is
  dropped: editors (Notepad, PowerShell) write one, and it says nothing about the content.
- ``shown``: a value quoted in an error, cut to ``MAX_QUOTED`` characters (a value can be
  megabytes: a long string, or a list that aliases expanded), so an error stays one short line.
"""
from __future__ import annotations

import re
import reprlib
from pathlib import Path
from typing import Any

import yaml
from yaml.composer import ComposerError
from yaml.constructor import ConstructorError
from yaml.error import Mark, MarkedYAMLError
from yaml.events import AliasEvent
from yaml.reader import ReaderError

from character_training.errors import UserError

MAX_BYTES = 1024 * 1024       # a recipe or constitution is a few kB; the largest shipped is under 10 kB
MAX_ALIASES = 100             # '*name' references in one document
MAX_EXPANDED = 1_000_000      # values plus text characters that expanding the aliases adds
MAX_DEPTH = 64                # nested mappings and lists
MAX_QUOTED = 200              # characters of a value that an error message quotes


class Loader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2 floats, duplicate keys refused, aliases and nesting bounded."""

    def __init__(self, stream):
        super().__init__(stream)
        self._aliases = 0
        self._depth = 0

    def compose_node(self, parent, index):
        if self.check_event(AliasEvent):
            self._aliases += 1
            if self._aliases > MAX_ALIASES:
                raise ComposerError(None, None, f"more than {MAX_ALIASES} aliases ('*name' references); "
                                    "write the values out instead", self.peek_event().start_mark)
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                raise ComposerError(None, None, f"nested more than {MAX_DEPTH} levels deep; flatten it",
                                    self.peek_event().start_mark)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_document(self, node):
        if self._aliases:  # without aliases the document is no bigger than its text (MAX_BYTES)
            _check_expansion(node)
        return super().construct_document(node)

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True) if isinstance(key_node, yaml.ScalarNode) else None
                try:
                    hash(key)
                except TypeError:
                    continue  # the constructor reports an unhashable key itself
                if key is not None and key in seen:
                    raise ConstructorError(None, None, f"duplicate key {shown(key)} (first given at line "
                                           f"{seen[key].line + 1}); give each key once", key_node.start_mark)
                seen[key] = key_node.start_mark
        return super().construct_mapping(node, deep=deep)


Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                  |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                  |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
                  |[-+]?\.(?:inf|Inf|INF)
                  |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."),
)


def _check_expansion(root) -> None:
    """Refuse a document whose aliases add more than ``MAX_EXPANDED`` values and characters of text
    to what is written (a long file without aliases is ``MAX_BYTES``'s business, not this), or that
    contains itself through an alias. Linear in the distinct nodes (memoized)."""
    sizes: dict[int, int] = {}
    open_nodes: set[int] = set()
    written = 0          # each distinct node counted once: the document as written
    first_big = None     # the innermost node that alone expands past MAX_EXPANDED: where to point

    def size(node) -> int:
        nonlocal written, first_big
        key = id(node)
        if key in sizes:
            return sizes[key]
        if key in open_nodes:
            raise ComposerError(None, None, "an alias refers to a node that contains it; remove the "
                                "recursive reference", node.start_mark)
        open_nodes.add(key)
        own = 1 + len(node.value) if isinstance(node, yaml.ScalarNode) else 1
        written += own
        if isinstance(node, yaml.SequenceNode):
            total = own + sum(size(child) for child in node.value)
        elif isinstance(node, yaml.MappingNode):
            total = own + sum(size(k) + size(v) for k, v in node.value)
        else:
            total = own
        open_nodes.discard(key)
        if total > MAX_EXPANDED and first_big is None:
            first_big = node
        sizes[key] = total
        return total

    if size(root) - written > MAX_EXPANDED:
        raise ComposerError(None, None, f"its aliases expand it to more than {MAX_EXPANDED:,} values and "
                            "characters beyond what is written; write the values out instead of nesting aliases",
                            first_big.start_mark)


def load(text: str) -> Any:
    """Parse YAML text; every problem (syntax, duplicate key, alias bound, depth, a control
    character) is a YAMLError."""
    if len(text) > MAX_BYTES:
        raise yaml.YAMLError(f"{len(text):,} characters, over the {MAX_BYTES // (1024 * 1024)} MiB limit for a "
                             "YAML input (recipes and constitutions are a few kB); check it is the right text")
    try:
        return yaml.load(text, Loader=Loader)
    except ReaderError as exc:  # PyYAML's message has a character offset; say the line and the character
        raise _reader_error(text, exc) from None
    except RecursionError:  # a guard above missed a path: still one line, not a traceback
        raise yaml.YAMLError(f"nested too deeply to read; keep nesting under {MAX_DEPTH} levels") from None


def _reader_error(text: str, exc: ReaderError) -> MarkedYAMLError:
    position = exc.position
    line = text.count("\n", 0, position)
    column = position - (text.rfind("\n", 0, position) + 1)
    char = exc.character if isinstance(exc.character, str) else chr(exc.character)
    return MarkedYAMLError(problem=f"the character {char_name(char)}, which YAML text cannot hold; remove it "
                           "(only tab, newline and carriage return of the control characters are allowed)",
                           problem_mark=Mark("<text>", position, line, column, None, None))


def char_name(char: str) -> str:
    """A character as Python writes it in a string: '\\x00', '\\x1b', '\\u200b'."""
    return repr(char)[1:-1] if not char.isprintable() else repr(char)


_repr = reprlib.Repr()
_repr.maxstring = _repr.maxother = MAX_QUOTED
_repr.maxlist = _repr.maxdict = _repr.maxtuple = _repr.maxset = 10


def shown(value: Any, limit: int = MAX_QUOTED) -> str:
    """``value`` quoted for a one-line error: its repr, at most ``limit`` characters (a value read
    from a file can be megabytes, or a list of a million items once aliases are expanded)."""
    text = _repr.repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def read_text(path: str | Path, what: str, hint: str = "check the path") -> str:
    """A text file's content; a missing path, a directory, a file over ``MAX_BYTES`` or one that is
    not UTF-8 is a UserError naming the path (``what``: 'recipe', 'constitution', ...)."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: {what} not found; {hint}")
    if path.is_dir():
        raise UserError(f"{path}: is a directory, not a {what} file; give the path of the {what} file")
    try:
        size = path.stat().st_size
        if size > MAX_BYTES:
            raise UserError(f"{path}: {size:,} bytes, over the {MAX_BYTES // (1024 * 1024)} MiB limit for a "
                            f"{what} file ({what}s are a few kB); check it is the right file, or make it smaller")
        data = path.read_bytes()
    except OSError as exc:
        raise UserError(f"{path}: cannot read the {what}: {exc.strerror or exc}") from None
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise UserError(f"{path}: UTF-16 text (it starts with a UTF-16 byte-order mark), not UTF-8; "
                        f"save the {what} as UTF-8")
    try:
        return data.decode("utf-8-sig")  # UTF-8, less a leading byte-order mark if there is one
    except UnicodeDecodeError as exc:
        line = data[:exc.start].count(b"\n") + 1
        raise UserError(f"{path}:{line}: not UTF-8 text (byte {exc.start}); save the {what} as UTF-8") from None


def describe_error(exc: yaml.YAMLError) -> tuple[str, str]:
    """(':LINE:COL' or '', the problem in words) of a YAML parse error."""
    mark = getattr(exc, "problem_mark", None)
    loc = f":{mark.line + 1}:{mark.column + 1}" if mark else ""
    problem = getattr(exc, "problem", None) or (str(exc).splitlines() or ["not readable"])[0]
    problem = " ".join(problem.split())
    return loc, problem if len(problem) <= 2 * MAX_QUOTED else problem[:2 * MAX_QUOTED - 3] + "..."
