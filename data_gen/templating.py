"""Prompts are data: Jinja templates in files, rendered in a sandbox."""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from jinja2 import FileSystemLoader, StrictUndefined
from jinja2.sandbox import SandboxedEnvironment

TEMPLATES = Path(__file__).parent / "templates"


@lru_cache(maxsize=None)
def environment(directory: str) -> SandboxedEnvironment:
    return SandboxedEnvironment(
        loader=FileSystemLoader(directory),
        undefined=StrictUndefined,
        keep_trailing_newline=True,
        trim_blocks=True,
        lstrip_blocks=True,
    )


def render_from(directory: str | Path, template: str, /, **values) -> str:
    return environment(str(directory)).get_template(template).render(**values)


def render(template: str, /, **values) -> str:
    """Render one of data_gen's own templates."""
    return render_from(TEMPLATES, template, **values)
