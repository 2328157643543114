"""YAML loading with YAML 1.2 floats: PyYAML follows YAML 1.1, where `5e-5` is the string
'5e-5'. Recipes are full of learning rates written that way."""
from __future__ import annotations

import re
from typing import Any

import yaml


class Loader(yaml.SafeLoader):
    pass


Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                  |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                  |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
                  |[-+]?\.(?:inf|Inf|INF)
                  |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."),
)


def load(text: str) -> Any:
    return yaml.load(text, Loader=Loader)


def describe_error(exc: yaml.YAMLError) -> tuple[str, str]:
    """(':LINE:COL' or '', the problem in words) of a YAML parse error."""
    mark = getattr(exc, "problem_mark", None)
    loc = f":{mark.line + 1}:{mark.column + 1}" if mark else ""
    return loc, getattr(exc, "problem", None) or str(exc).splitlines()[0]
