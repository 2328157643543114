"""character_training's prompt templates (files in ``templates/``)."""
from __future__ import annotations

from pathlib import Path

from data_gen.templating import render_from

TEMPLATES = Path(__file__).parents[1] / "templates"


def render(template: str, /, **values) -> str:
    return render_from(TEMPLATES, template, **values)
