"""Adapter files: read a PEFT LoRA adapter directory into per-module factors, write factors
back as one, and name modules and adapters for reports.

An adapter directory holds ``adapter_config.json`` and ``adapter_model.safetensors``; reading
refuses, with the reason, what is not a plain LoRA (DoRA, biases, saved modules, inits that
rewrite the base weights, ...). Writing puts every module in one canonical form: scaling 1
(alpha == rank per module, through ``rank_pattern`` / ``alpha_pattern``; ``r`` == ``lora_alpha``
== the largest rank, so a server that ignores the patterns still applies scaling 1),
``use_rslora`` off, fp32 factors, ``target_modules`` listing the adapted modules by full name
(so PEFT adapts exactly those), and a ``README.md`` model card (``character_training.card``).

Bad input is refused in one line before anything is computed (``check_adapter_dir``: the config
is a JSON object with a positive integer rank, the weights are a complete safetensors file, not
a pickle, and every factor is finite); outputs.py says where an adapter may be written.
"""
from __future__ import annotations

import json
import math
import os
import re
import shutil
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Sequence, Union

import torch

from character_training.adapters.outputs import CONFIG_FILE, WEIGHTS_FILE, check_output
from character_training.card import AdapterInput, ModelCard, stamp, write_card
from character_training.errors import UserError
from character_training.util import file_sha256

PICKLE_FILE = "adapter_model.bin"
PREFIX = "base_model.model."  # PEFT's key prefix in adapter_model.safetensors
# PEFT inits that rewrite the base weights when the adapter loads: the saved factors alone are
# not the adapter's delta, so no algebra on them is meaningful.
_BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq")
_FACTOR_KEY = re.compile(r"^(?P<module>.+)\.(?P<which>lora_A|lora_B)\.weight$|"
                         r"^(?P<emodule>.+)\.(?P<ewhich>lora_embedding_A|lora_embedding_B)$")
_LAYER = re.compile(r"\.(\d+)(?:\.|$)")


@dataclass
class Factors:
    """One adapted module: ``delta = scaling * B @ A`` (B: out x r, A: r x in). ``embedding``:
    stored as lora_embedding_A/B, whose delta PEFT applies transposed to the embedding matrix."""

    B: torch.Tensor
    A: torch.Tensor
    scaling: float = 1.0
    embedding: bool = False

    @property
    def rank(self) -> int:
        return int(self.A.shape[0])

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.B.shape[0]), int(self.A.shape[1])

    def dense(self) -> torch.Tensor:
        """The out x in delta in float64 (tests and small modules only: it is the matrix the
        algebra avoids forming)."""
        return self.scaling * (self.B.double() @ self.A.double())


@dataclass
class Adapter:
    """A LoRA adapter read from disk: its config and, per module (named as in the base model,
    e.g. ``model.layers.0.self_attn.q_proj``), its factors."""

    path: Path | None
    config: dict
    modules: dict[str, Factors]
    sha256: str | None = None
    skipped: list[str] = field(default_factory=list)  # saved base-layer copies, not carried over

    @property
    def base_model(self) -> str | None:
        return self.config.get("base_model_name_or_path")


AdapterLike = Union[str, Path, Adapter]


# ---------------------------------------------------------------------------------- reading

def _pattern_value(pattern: dict | None, name: str):
    """PEFT's ``get_pattern_key`` rule: the first key that is a dotted suffix of the name."""
    for key, value in (pattern or {}).items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return None


def module_scaling(config: dict, name: str) -> tuple[int, float]:
    """(configured rank, scaling) of one module, as PEFT computes them."""
    r = _pattern_value(config.get("rank_pattern"), name)
    r = int(config.get("r", 8) if r is None else r)
    alpha = _pattern_value(config.get("alpha_pattern"), name)
    alpha = float(config.get("lora_alpha", 8) if alpha is None else alpha)
    return r, alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r


# A header larger than this is not an adapter's (safetensors itself caps it at 100 MB).
_MAX_HEADER_BYTES = 100_000_000
_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8,
                "U32": 4, "U16": 2, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}
_RESAVE = "re-save the adapter with PEFT's save_pretrained, or train it again"


def _adapter_dir(path: Path, flag: str) -> str:
    """Refuse a path that is not a directory; the prefix for messages about it."""
    where = f"{flag} {path}" if flag else str(path)
    if path.is_file():
        raise UserError(f"{where}: is a file, not an adapter directory; give the directory that holds "
                        f"{CONFIG_FILE} and {WEIGHTS_FILE}")
    if not path.is_dir():
        raise UserError(f"{where}: adapter directory not found")
    return where


def _positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _finite_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def read_config(path: str | Path, flag: str = "") -> dict:
    """``adapter_config.json`` of an adapter directory, checked for what reading its factors
    relies on: a JSON object, a positive integer rank (``r`` and ``rank_pattern``), finite alphas.
    ``flag``: the option the path came from (``--init-adapter``), for messages."""
    path = Path(path)
    where = _adapter_dir(path, flag)
    config_path = path / CONFIG_FILE
    if not config_path.is_file():
        raise UserError(f"{where}: not a PEFT adapter directory ({CONFIG_FILE} missing)")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise UserError(f"{config_path}: not UTF-8 text; {CONFIG_FILE} is a JSON file that PEFT writes; {_RESAVE}") \
            from None
    except json.JSONDecodeError as exc:
        raise UserError(f"{config_path}: not valid JSON ({exc})") from None
    except RecursionError:
        raise UserError(f"{config_path}: nested too deeply to be an adapter config; {_RESAVE}") from None
    if not isinstance(config, dict):
        raise UserError(f"{config_path}: a JSON {type(config).__name__}, not an object; {CONFIG_FILE} is one object "
                        f"of LoRA settings (r, lora_alpha, target_modules, ...) as PEFT writes it; {_RESAVE}")
    kind = config.get("peft_type", "LORA")
    if kind != "LORA":
        return config  # not a LoRA: the caller says why it cannot use it
    fix = f"fix it in {config_path} or {_RESAVE}"
    if "r" in config and not _positive_int(config["r"]):
        raise UserError(f"{config_path}: r: {config['r']!r}; the LoRA rank is a positive integer (e.g. 16); {fix}")
    if "lora_alpha" in config and not _finite_number(config["lora_alpha"]):
        raise UserError(f"{config_path}: lora_alpha: {config['lora_alpha']!r}; LoRA's alpha is a number (e.g. 32); "
                        f"{fix}")
    for key, valid, what in (("rank_pattern", _positive_int, "a positive integer rank"),
                             ("alpha_pattern", _finite_number, "a number")):
        pattern = config.get(key)
        if pattern is None:
            continue
        if not isinstance(pattern, dict):
            raise UserError(f"{config_path}: {key}: {pattern!r}; it maps module names to {what}s, e.g. "
                            f"{{\"q_proj\": 8}}; {fix}")
        for name, value in pattern.items():
            if not valid(value):
                raise UserError(f"{config_path}: {key}.{name}: {value!r}; each value is {what}; {fix}")
    targets = config.get("target_modules")
    if targets is not None and not (isinstance(targets, str) or
                                    (isinstance(targets, list) and all(isinstance(t, str) for t in targets))):
        raise UserError(f"{config_path}: target_modules: {targets!r}; a module name or a list of them, e.g. "
                        f"[\"q_proj\", \"v_proj\"]; {fix}")
    base = config.get("base_model_name_or_path")
    if base is not None and not isinstance(base, str):
        raise UserError(f"{config_path}: base_model_name_or_path: {base!r}; a model id or directory; {fix}")
    return config


def check_safetensors(path: str | Path) -> dict:
    """The header of a safetensors file, checked against the file's size without reading the
    tensors: a truncated, empty or foreign file is refused in one line."""
    path = Path(path)
    size = path.stat().st_size
    bad = f"{path}: not a complete safetensors file"
    if size < 8:
        raise UserError(f"{bad} ({'empty' if size == 0 else f'{size} bytes'}); the file is damaged or was never "
                        f"written out; {_RESAVE}")
    with path.open("rb") as f:
        length = int.from_bytes(f.read(8), "little")
        if not 2 <= length <= min(size - 8, _MAX_HEADER_BYTES):
            raise UserError(f"{bad} (its first 8 bytes give a header of {length} bytes, the file has {size}): "
                            f"truncated or not safetensors at all; {_RESAVE}")
        raw = f.read(length)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        header = None
    if not isinstance(header, dict):
        raise UserError(f"{bad} (its header is not a JSON object): truncated or not safetensors at all; {_RESAVE}")
    end = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (start, stop) = info["dtype"], info["shape"], info["data_offsets"]
            ok = (all(isinstance(n, int) and n >= 0 for n in (*shape, start, stop)) and start <= stop
                  and (dtype not in _DTYPE_BYTES or stop - start == math.prod(shape) * _DTYPE_BYTES[dtype]))
        except (KeyError, TypeError, ValueError):
            ok = False
        if not ok:
            raise UserError(f"{bad}: the header's entry for tensor '{name}' is malformed; {_RESAVE}")
        end = max(end, stop)
    if 8 + length + end > size:
        raise UserError(f"{bad}: its header describes {8 + length + end} bytes but the file has {size}; the file is "
                        f"truncated (an interrupted copy or download?); copy it again or {_RESAVE}")
    return header


def read_weights(path: str | Path, flag: str = "") -> dict[str, torch.Tensor]:
    """The tensors of an adapter directory's ``adapter_model.safetensors``: refused in one line
    when missing (a pickle ``adapter_model.bin`` is never loaded), damaged, or not finite."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    where = f"{flag} {path}" if flag else str(path)
    weights_path = path / WEIGHTS_FILE
    if not weights_path.is_file():
        hint = (f" (only {PICKLE_FILE} is there, a pickle, which is never loaded because loading a pickle runs "
                "code: re-save it as safetensors with PEFT's save_pretrained(..., safe_serialization=True))"
                if (path / PICKLE_FILE).is_file() else "")
        raise UserError(f"{where}: {WEIGHTS_FILE} missing{hint}")
    check_safetensors(weights_path)
    try:
        tensors = load_file(str(weights_path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise UserError(f"{weights_path}: cannot be read as safetensors ({type(exc).__name__}: {exc}); "
                        f"{_RESAVE}") from None
    for key, tensor in tensors.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            what = "NaN" if bool(torch.isnan(tensor).any()) else "inf"
            raise UserError(f"{weights_path}: tensor '{key}' holds {what} values; an adapter with non-finite "
                            "weights would make the model's output NaN; train it again (lower the learning rate "
                            "or use gradient clipping) or use another adapter")
    return tensors


def check_adapter_dir(path: str | Path, flag: str = "") -> dict:
    """Check, before any model is loaded, that ``path`` is a LoRA adapter directory PEFT can
    load: its config (``read_config``) and its weights (``read_weights``: safetensors, complete,
    finite). Returns the config. For training on (``--init-adapter``) and evaluating adapters;
    the algebra's stricter rules (plain LoRA only) are ``load_adapter``'s."""
    config = read_config(path, flag)
    kind = config.get("peft_type", "LORA")
    if kind != "LORA":
        raise UserError(f"{flag + ' ' if flag else ''}{path}: a {kind} adapter (peft_type in {CONFIG_FILE}); only LoRA "
                        "adapters are supported")
    read_weights(path, flag)
    return config


def _check_config(path: Path, config: dict) -> None:
    kind = config.get("peft_type", "LORA")
    if kind != "LORA":
        raise UserError(f"{path}: a {kind} adapter (peft_type in {CONFIG_FILE}); adapter algebra works on "
                        "LoRA adapters only")
    init = str(config.get("init_lora_weights", True)).lower()
    problems = {
        "use_dora": (config.get("use_dora"), "DoRA's delta is not linear in its factors"),
        "lora_bias": (config.get("lora_bias"), "LoRA biases are not low-rank factors"),
        "modules_to_save": (config.get("modules_to_save"), "fully trained modules have no base-free delta"),
        "init_lora_weights": (init.startswith(_BASE_CHANGING_INITS),
                              f"'{init}' rewrites the base weights when PEFT loads the adapter; convert it to a "
                              "plain LoRA with PEFT's path_initial_model_for_weight_conversion first"),
        "layer_replication": (config.get("layer_replication"), "replicated layers share factors"),
        "target_parameters": (config.get("target_parameters"), "LoRA on bare parameters is not supported yet"),
        "trainable_token_indices": (config.get("trainable_token_indices"), "trained token rows are not LoRA factors"),
        "alora_invocation_tokens": (config.get("alora_invocation_tokens"),
                                    "an activated LoRA applies only after its invocation tokens"),
    }
    for key, (present, why) in problems.items():
        if present:
            raise UserError(f"{path}: {CONFIG_FILE} sets {key}: {why}; only plain LoRA adapters can be combined")


def load_adapter(path: str | Path) -> Adapter:
    """Read a PEFT LoRA adapter directory; refuse, with the reason, what is not a plain LoRA."""
    path = Path(path)
    config = read_config(path)
    _check_config(path, config)
    tensors = read_weights(path)
    parts: dict[str, dict[str, torch.Tensor]] = {}
    embedding: dict[str, bool] = {}
    skipped = []
    for key, tensor in tensors.items():
        match = _FACTOR_KEY.match(key)
        if not match and key.endswith(".base_layer.weight"):
            # PEFT saves the base embedding next to an embedding LoRA ("save_embedding_layers"):
            # a copy of the base model's weights, not part of the delta.
            skipped.append(key)
            continue
        if not match:
            raise UserError(f"{path}: tensor '{key}' is not a LoRA factor (lora_A/lora_B); adapters with extra "
                            "trained tensors (DoRA magnitudes, biases, saved modules) cannot be combined")
        module = match["module"] or match["emodule"]
        which = (match["which"] or match["ewhich"])[-1]
        name = module[len(PREFIX):] if module.startswith(PREFIX) else module
        parts.setdefault(name, {})[which] = tensor
        embedding[name] = match["emodule"] is not None
    modules = {}
    for name in sorted(parts):
        pair = parts[name]
        if set(pair) != {"A", "B"}:
            have, lacking = ("A", "B") if "A" in pair else ("B", "A")
            raise UserError(f"{path}: module {name} has lora_{have} but not lora_{lacking}")
        A, B = pair["A"], pair["B"]
        if A.dim() != 2 or B.dim() != 2:
            raise UserError(f"{path}: module {name} has {A.dim()}-d factors (a convolution LoRA); only linear and "
                            "embedding LoRA modules are supported")
        if A.shape[0] != B.shape[1]:
            raise UserError(f"{path}: module {name}: lora_A has rank {A.shape[0]} but lora_B has {B.shape[1]}")
        r, scaling = module_scaling(config, name)
        if r != A.shape[0]:
            raise UserError(f"{path}: module {name} has rank {A.shape[0]} in {WEIGHTS_FILE} but {r} in {CONFIG_FILE} "
                            "(r / rank_pattern); the two files do not belong together")
        modules[name] = Factors(B=B.float(), A=A.float(), scaling=scaling, embedding=embedding[name])
    if not modules:
        raise UserError(f"{path}: {WEIGHTS_FILE} holds no LoRA factors")
    return Adapter(path=path, config=config, modules=modules, sha256=file_sha256(path / WEIGHTS_FILE),
                   skipped=skipped)


def as_adapter(item: AdapterLike) -> Adapter:
    """An adapter already read, or the one in the directory given."""
    return item if isinstance(item, Adapter) else load_adapter(item)


def _same_base(a: str | None, b: str | None) -> bool:
    """Two adapters' bases are one model: the same name or directory, or names a user elsewhere
    would load as the same (an adapter written before adapters named their base portably, by its
    local directory, beside one that names the hub id)."""
    from character_training.config.models import portable_model_name

    if a is None or b is None or a == b:
        return True
    pa, pb = Path(a), Path(b)
    if pa.exists() and pb.exists() and pa.resolve() == pb.resolve():
        return True
    return portable_model_name(a) == portable_model_name(b)


def check_compatible(adapters: Sequence[Adapter]) -> None:
    """Same base model, and the same shape wherever two adapters adapt the same module."""
    first = adapters[0]
    for other in adapters[1:]:
        if not _same_base(first.base_model, other.base_model):
            raise UserError(f"{other.path}: trained on base model '{other.base_model}', but {first.path} on "
                            f"'{first.base_model}'; adapters of different base models cannot be combined (if both "
                            "name the same model, make base_model_name_or_path in their adapter_config.json agree)")
        if bool(first.config.get("fan_in_fan_out")) != bool(other.config.get("fan_in_fan_out")):
            raise UserError(f"{other.path}: fan_in_fan_out differs from {first.path}'s; they cannot share a base model")
    seen: dict[str, tuple[Adapter, Factors]] = {}
    for adapter in adapters:
        for name, f in adapter.modules.items():
            if name not in seen:
                seen[name] = (adapter, f)
                continue
            other, g = seen[name]
            if f.shape != g.shape or f.embedding != g.embedding:
                raise UserError(f"module {name}: {adapter.path} adapts it as {_describe(f)} but {other.path} as "
                                f"{_describe(g)}; the adapters were trained on different architectures")


def _describe(f: Factors) -> str:
    return f"{'an embedding ' if f.embedding else ''}{f.shape[0]} x {f.shape[1]} (out x in)"


# --------------------------------------------------------------------------------- writing

def save_adapter(out: str | Path, modules: dict[str, Factors], *, like: Adapter, card: ModelCard,
                 overwrite: bool = False) -> Path:
    """Write modules (scaling 1 each) as a PEFT adapter directory with ``card`` as its model card
    (the base model, the modules' ranks and the library versions added); atomic: a half-written
    output never takes the final name, and an output it replaces (``overwrite``, only an adapter
    this tool wrote: ``check_output``) is removed only once the new one is in place."""
    from safetensors.torch import save_file

    out = Path(out)
    check_output(out, [like.path], overwrite=overwrite)
    if not modules:
        raise UserError("nothing to write: every module's weight is zero")
    for name, f in modules.items():
        if f.scaling != 1.0:  # callers fold the scaling into A before saving
            raise ValueError(f"module {name}: factors must be saved with scaling 1, not {f.scaling}")
    ranks = {name: f.rank for name, f in modules.items()}
    top = max(ranks.values())
    config = dict(like.config)
    config.update(
        peft_type="LORA", r=top, lora_alpha=top, use_rslora=False,
        rank_pattern={n: r for n, r in ranks.items() if r != top},
        alpha_pattern={n: r for n, r in ranks.items() if r != top},
        target_modules=sorted(modules), exclude_modules=None, layers_to_transform=None, layers_pattern=None,
        modules_to_save=None, init_lora_weights=True, inference_mode=True,
    )
    tensors = {}
    for name, f in modules.items():
        a_key, b_key = ("lora_embedding_A", "lora_embedding_B") if f.embedding else ("lora_A.weight", "lora_B.weight")
        tensors[f"{PREFIX}{name}.{a_key}"] = f.A.float().contiguous()
        tensors[f"{PREFIX}{name}.{b_key}"] = f.B.float().contiguous()
        for key in (f"{PREFIX}{name}.{a_key}", f"{PREFIX}{name}.{b_key}"):
            if not bool(torch.isfinite(tensors[key]).all()):  # e.g. a weight so large the product overflows fp32
                raise UserError(f"module {name}: the result's factor '{key}' is not finite (overflow); nothing was "
                                "written; use smaller weights")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
    (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    write_card(_operation_card(card, config, ranks), tmp)
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old)
    return out


def _operation_card(card: ModelCard, config: dict, ranks: dict[str, int]) -> ModelCard:
    modules = (f"Modules: {len(ranks)}; rank {min(ranks.values())}-{max(ranks.values())} (scaling 1 per module: "
               "lora_alpha == rank, rank_pattern / alpha_pattern per module)")
    filled = replace(card, base_model=config.get("base_model_name_or_path"), tags=("adapter-algebra",),
                     facts=(*card.facts, modules))
    return stamp(filled, "torch", "peft", "safetensors")


def adapter_input(adapter: Adapter, role: str | float) -> AdapterInput:
    """An operation's input for its model card."""
    return AdapterInput(path=str(adapter.path) if adapter.path else "(in memory)", sha256=adapter.sha256,
                        role=role, skipped=tuple(adapter.skipped))


# ----------------------------------------------------------------------------------- names

def rank_range(modules: dict[str, Factors]) -> list[int]:
    """[smallest, largest] rank over the modules."""
    ranks = [f.rank for f in modules.values()]
    return [min(ranks), max(ranks)] if ranks else [0, 0]


def adapter_label(adapter: Adapter) -> str:
    """A short name for reports: the directory's name, with its parent's when it is called adapter."""
    if adapter.path is None:
        return "adapter"
    parts = adapter.path.resolve().parts
    return "/".join(parts[-2:]) if parts[-1] == "adapter" and len(parts) > 1 else parts[-1]


def module_layer(name: str) -> int | None:
    """The layer index in a module name (``model.layers.12.mlp.up_proj`` -> 12), or None."""
    match = _LAYER.search(name)
    return int(match[1]) if match else None


def module_type(name: str) -> str:
    return name.rsplit(".", 1)[-1]


def layer_label(layer: int | None) -> str:
    return "other" if layer is None else str(layer)


def lora_rank_for_vllm(configs: list[dict]) -> int:
    """The smallest power-of-two `max_lora_rank` (at least 8) that serves every adapter, per-module
    ranks (`rank_pattern`) included."""
    rank = max((max([int(c["r"]), *map(int, (c.get("rank_pattern") or {}).values())]) for c in configs), default=8)
    return max(8, 1 << (rank - 1).bit_length())
