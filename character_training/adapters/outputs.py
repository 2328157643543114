"""Where an adapter operation may write: never over what is not ours.

``check_output``: an output is never an input, the current directory (or one above it), home or
``/``, nor a file; ``--force`` replaces only an empty directory or an adapter this tool wrote
(``written_here``: config and weights beside a README.md model card tagged character-training).
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Sequence

from character_training.card import CARD_FILE
from character_training.errors import UserError
from character_training.util import unsafe_place as _unsafe_place

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
CARD_TAG = "character-training"  # in the tags of the README.md model card of every adapter this tool writes


def written_here(directory: str | Path) -> bool:
    """Whether ``directory`` is an adapter this tool wrote: adapter_config.json and
    adapter_model.safetensors beside a README.md model card tagged character-training."""
    directory = Path(directory)
    if not ((directory / CONFIG_FILE).is_file() and (directory / WEIGHTS_FILE).is_file()):
        return False
    try:
        with (directory / CARD_FILE).open(encoding="utf-8") as f:
            head = f.read(4096)
    except (OSError, UnicodeDecodeError):
        return False
    front = head.split("\n---", 1)[0] if head.startswith("---") else ""
    return re.search(rf"^tags: \[{re.escape(CARD_TAG)}[,\]]", front, re.M) is not None


def check_output(out: str | Path, inputs: Sequence[str | Path | None] = (), *, overwrite: bool = False,
                 flag: str = "-o") -> None:
    """Before anything is computed: refuse an output directory that writing would harm. It may not
    be the current directory (or one above it), home or ``/``, nor be or hold an input, nor be a
    file; an existing one is replaced only with ``overwrite`` (``--force``), and only when it is
    empty or an adapter this tool wrote (``written_here``)."""
    given, out = out, Path(out).expanduser()
    resolved = out.resolve()
    fix = f"give {flag} a new directory, e.g. {flag} adapters/NAME"
    place = _unsafe_place(resolved)
    if place:
        raise UserError(f"{flag} {given}: is {place}; an adapter is written as a directory of its own, which "
                        f"--force would replace with everything in it; nothing was changed; {fix}")
    for item in inputs:
        if item is None:
            continue
        source = Path(item).expanduser().resolve()
        if source == resolved or resolved in source.parents:
            what = "is" if source == resolved else "holds"
            raise UserError(f"{flag} {given}: {what} the input {item}; writing there would replace it; nothing was "
                            f"changed; {fix}")
    if out.exists() and not out.is_dir():
        raise UserError(f"{flag} {given}: is a file, not a directory; an adapter is written as a directory; "
                        f"nothing was changed; {fix}")
    if not out.exists():
        return
    if not overwrite:
        raise UserError(f"{out}: already exists; choose another -o path or pass --force to overwrite it")
    if any(out.iterdir()) and not written_here(out):
        raise UserError(f"{flag} {given}: not an adapter character-training wrote (no {CARD_FILE} model card of "
                        f"ours beside {CONFIG_FILE} and {WEIGHTS_FILE}); --force replaces only such a directory; "
                        f"nothing was changed; {fix}")
