"""Persona adapter algebra: compose, re-compress, orthogonalize, scale and inspect LoRA adapters.

Reads adapter files only (``adapter_config.json`` + ``adapter_model.safetensors``), never the
base model, and writes PEFT adapter directories (the same two files, plus a ``README.md`` model
card recording the operation, its inputs with their sha256 and weights, and what it changed).

Per adapted module an adapter's delta is ``dW = s * B @ A`` (B: out x r, A: r x in;
s = alpha/r, or alpha/sqrt(r) with rsLoRA; per-module r and alpha from ``rank_pattern`` /
``alpha_pattern``, matched as PEFT matches them):

- compose: ``sum_i w_i dW_i`` exactly, by concatenation: ``B' = [B_1 ... B_n]``,
  ``A' = [w_1 s_1 A_1; ...; w_n s_n A_n]``, scaling 1. A module missing from an adapter is zero.
- re-compress to rank k without an out x in matrix: QR of B' and of A'^T, SVD of the small core
  ``R_B R_A^T``; the top k give the best rank-k approximation, at O((out + in) r^2).
- orthogonalize A against B: remove from B_A its part in the output space of B's delta
  (``B_A <- B_A - Q Q^T B_A``), or from A_A its part in the input space (``--side input``), or
  both; rank kept. A's delta then has zero inner product with B's.
- inner products without dense deltas: ``<B_i A_i, B_j A_j> = sum((B_i^T B_j) * (A_i A_j^T))``.

Outputs are in one canonical form: every module has scaling 1 (alpha == rank per module, through
``rank_pattern`` / ``alpha_pattern``; ``r`` == ``lora_alpha`` == the largest rank, so a server that
ignores the patterns still applies scaling 1), ``use_rslora`` off, fp32 factors, and
``target_modules`` listing the adapted modules by full name (so PEFT adapts exactly those).

    compose([("a", 1.0), ("b", -0.5)], "out", rank=32)
    compose_onto(previous_adapter, new_adapter, "out")   # chained training stages
    orthogonalize("a", ["b"], "out", side="output")
    scale("a", 0.5, "out", layers="10-20", modules="q_proj,v_proj")
    report = inspect(["a", "b"], png="overlap.png"); print(format_inspect(report))
"""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence, Union

import torch

from character_training.errors import UserError, did_you_mean

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PREFIX = "base_model.model."  # PEFT's key prefix in adapter_model.safetensors
# A singular value below this share of the largest is numerically zero (factors are fp32 data,
# the decompositions run in float64).
RANK_RTOL = 1e-9
GRAM_RTOL = 1e-14  # the same for eigenvalues of a Gram matrix (squared singular values): 1e-7
# PEFT inits that rewrite the base weights when the adapter loads: the saved factors alone are
# not the adapter's delta, so no algebra on them is meaningful.
_BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq")
_MODULE_ORDER = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
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
        rest of this module avoids forming)."""
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
    from safetensors.torch import load_file

    from data_gen.store import file_sha256

    path = Path(path)
    if not path.is_dir():
        raise UserError(f"{path}: adapter directory not found")
    config_path, weights_path = path / CONFIG_FILE, path / WEIGHTS_FILE
    if not config_path.is_file():
        raise UserError(f"{path}: not a PEFT adapter directory ({CONFIG_FILE} missing)")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise UserError(f"{config_path}: not valid JSON ({exc})") from None
    _check_config(path, config)
    if not weights_path.is_file():
        hint = (" (only adapter_model.bin is there: re-save it with PEFT's save_pretrained, which writes "
                "safetensors)" if (path / "adapter_model.bin").is_file() else "")
        raise UserError(f"{path}: {WEIGHTS_FILE} missing{hint}")
    tensors = load_file(str(weights_path))
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
    return Adapter(path=path, config=config, modules=modules, sha256=file_sha256(weights_path), skipped=skipped)


def _as_adapter(item: AdapterLike) -> Adapter:
    return item if isinstance(item, Adapter) else load_adapter(item)


def _same_base(a: str | None, b: str | None) -> bool:
    if a is None or b is None or a == b:
        return True
    pa, pb = Path(a), Path(b)
    return pa.exists() and pb.exists() and pa.resolve() == pb.resolve()


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


# ------------------------------------------------------------------------- linear algebra

@contextmanager
def one_thread():
    """Per-module algebra is many small factorizations (r x r cores, out x r panels): intra-op
    threads gain little there and, on a machine busy with other work, wait on each other
    (measured on 2 busy cores: compose --rank 64 of the benchmark's adapters took 9.7 s on 2
    threads, 1.2 s on one)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def inner_product(f: Factors, g: Factors) -> float:
    """Frobenius inner product of two deltas, from their factors."""
    gb = f.B.double().T @ g.B.double()
    ga = f.A.double() @ g.A.double().T
    return float(f.scaling * g.scaling * (gb * ga).sum())


def frobenius_norm(f: Factors) -> float:
    return math.sqrt(max(inner_product(f, f), 0.0))


def svd_factors(f: Factors) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(U, S, V) with ``delta = U diag(S) V^T`` (float64, reduced), from QR of B and A^T and the
    SVD of the small core: O((out + in) r^2), no out x in matrix."""
    qb, rb = torch.linalg.qr(f.B.double())
    qa, ra = torch.linalg.qr(f.A.double().T)
    u, s, vh = torch.linalg.svd(f.scaling * (rb @ ra.T), full_matrices=False)
    return qb @ u, s, qa @ vh.T


def numerical_rank(s: torch.Tensor) -> int:
    if s.numel() == 0 or float(s[0]) == 0.0:
        return 0
    return int((s > RANK_RTOL * s[0]).sum())


def effective_rank(s: torch.Tensor) -> float:
    """Roy & Vetterli's effective rank: exp of the entropy of the normalized singular values."""
    total = float(s.sum())
    if total <= 0.0:
        return 0.0
    p = s[s > 0] / total
    return float(torch.exp(-(p * p.log()).sum()))


def recompress(f: Factors, k: int) -> tuple[Factors, dict]:
    """The best rank-k approximation of a delta, as balanced factors with scaling 1.

    Through the Gram matrices (r x r) rather than QR: ``B = U_B S_B V_B^T`` from the
    eigendecomposition of ``B^T B`` (and the same for ``A^T``), so the delta is
    ``U_B (S_B V_B^T V_A S_A) U_A^T`` and the SVD of that small core gives the top k. Matrix
    products instead of Householder steps: several times faster, and in float64 the kept
    directions stay exact to far below fp32 (only directions under 1e-7 of the largest singular
    value, numerically zero in fp32 factors, are dropped)."""
    B, A = f.B.double(), f.A.double() * f.scaling
    lb, vb = torch.linalg.eigh(B.T @ B)
    la, va = torch.linalg.eigh(A @ A.T)
    keep_b, keep_a = lb > GRAM_RTOL * lb.max().clamp(min=0), la > GRAM_RTOL * la.max().clamp(min=0)
    sb, vb = lb[keep_b].sqrt(), vb[:, keep_b]
    sa, va = la[keep_a].sqrt(), va[:, keep_a]
    u, s, wh = torch.linalg.svd(sb[:, None] * (vb.T @ va) * sa[None, :], full_matrices=False)
    k = min(k, int(s.numel()))
    root = s[:k].sqrt()
    out = Factors(B=(B @ (vb @ (u[:, :k] / sb[:, None]))) * root,
                  A=((root[:, None] * wh[:k] / sa[None, :]) @ va.T) @ A, embedding=f.embedding)
    out.B, out.A = out.B.float(), out.A.float()
    total = float((s ** 2).sum())
    dropped = float((s[k:] ** 2).sum())
    return out, {"rank_before": f.rank, "rank": k,
                 "relative_error": math.sqrt(dropped / total) if total > 0 else 0.0}


def _orthonormal_basis(blocks: list[torch.Tensor]) -> torch.Tensor | None:
    """An orthonormal basis of the span of the columns of the given (float64) blocks."""
    blocks = [b for b in blocks if b.shape[1]]
    if not blocks:
        return None
    u, s, _ = torch.linalg.svd(torch.cat(blocks, dim=1), full_matrices=False)
    keep = numerical_rank(s)
    return u[:, :keep] if keep else None


def concatenate(terms: Iterable[tuple[Factors, float]]) -> Factors | None:
    """``sum_i w_i dW_i`` as one LoRA with scaling 1 (None when every weight is zero)."""
    Bs, As, embedding = [], [], False
    for f, w in terms:
        if w == 0.0:
            continue
        Bs.append(f.B.float())
        As.append(f.A.float() * (w * f.scaling))
        embedding = f.embedding
    if not Bs:
        return None
    return Factors(B=torch.cat(Bs, dim=1), A=torch.cat(As, dim=0), embedding=embedding)


# --------------------------------------------------------------------------------- writing

def save_adapter(out: str | Path, modules: dict[str, Factors], *, like: Adapter, card: dict,
                 overwrite: bool = False) -> Path:
    """Write modules (scaling 1 each) as a PEFT adapter directory; atomic: a half-written
    output never takes the final name."""
    from safetensors.torch import save_file

    out = Path(out)
    if out.exists() and not overwrite:
        raise UserError(f"{out}: already exists; choose another -o path or pass --force to overwrite it")
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
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
    (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    _write_card(tmp, config, card, ranks)
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out


def _write_card(directory: Path, config: dict, card: dict, ranks: dict[str, int]) -> None:
    from data_gen.store import versions

    lines = ["---", "library_name: peft", f"base_model: {config.get('base_model_name_or_path')}",
             "tags: [character-training, persona, lora, adapter-algebra]", "---",
             f"# {card['title']}", "", card["summary"], "",
             f"- operation: `{card['operation']}`",
             f"- modules: {len(ranks)}; rank {min(ranks.values())}-{max(ranks.values())} "
             "(scaling 1 per module: lora_alpha == rank, rank_pattern / alpha_pattern per module)",
             f"- written: {time.strftime('%Y-%m-%dT%H:%M:%S%z')} by character-training "
             f"({', '.join(f'{k} {v}' for k, v in versions('torch', 'peft', 'safetensors').items())})",
             "", "## Inputs", "", "| adapter | weight / role | sha256 of adapter_model.safetensors |",
             "| --- | --- | --- |"]
    lines += [f"| {i['path']} | {i['role']} | `{i['sha256']}` |" for i in card["inputs"]]
    lines.append("")
    skipped = sorted({k for i in card["inputs"] for k in i["skipped"]})
    if skipped:
        lines += ["Not carried over: base-layer weights PEFT saved next to an embedding LoRA (copies of the base "
                  "model's, not part of any delta): " + ", ".join(f"`{k}`" for k in skipped), ""]
    for title, value in card.get("sections", {}).items():
        lines += [f"## {title}", "", "```json", json.dumps(value, indent=2, default=str), "```", ""]
    (directory / "README.md").write_text("\n".join(lines), encoding="utf-8")


def _input_record(adapter: Adapter, role) -> dict:
    return {"path": str(adapter.path) if adapter.path else "(in memory)", "sha256": adapter.sha256, "role": role,
            "skipped": adapter.skipped}


# ------------------------------------------------------------------------------ operations

def compose(terms: Sequence[tuple[AdapterLike, float]], out: str | Path, *, rank: int | None = None,
            overwrite: bool = False) -> dict:
    """Write ``sum_i w_i dW_i`` as one adapter: exact (rank = the sum of the ranks) or, with
    ``rank``, re-compressed to the best rank-``rank`` approximation per module."""
    if not terms:
        raise UserError("compose: give at least one ADAPTER:WEIGHT")
    if rank is not None and rank < 1:
        raise UserError(f"--rank {rank}: a rank is a positive integer")
    adapters = [_as_adapter(a) for a, _ in terms]
    weights = [float(w) for _, w in terms]
    for w in weights:
        if not math.isfinite(w):
            raise UserError(f"compose: weight {w} is not a finite number")
    check_compatible(adapters)
    names = sorted({n for a in adapters for n in a.modules})
    modules, compression = {}, {}
    with one_thread():
        for name in names:
            f = concatenate((a.modules[name], w) for a, w in zip(adapters, weights) if name in a.modules)
            if f is None:
                continue
            if rank is not None and f.rank > rank:
                f, compression[name] = recompress(f, rank)
            modules[name] = f
    report = {"operation": "compose", "weights": weights, "inputs": [str(a.path) for a in adapters],
              "modules": len(modules), "rank": _rank_range(modules), "recompressed_to": rank}
    if compression:
        errors = [c["relative_error"] for c in compression.values()]
        report["recompression"] = {"modules": len(compression), "max_relative_error": max(errors),
                                   "mean_relative_error": sum(errors) / len(errors)}
    formula = " + ".join(f"{w:g} * {_label(a)}" for a, w in zip(adapters, weights)).replace("+ -", "- ")
    card = {"title": "Composed persona adapter", "operation": "compose",
            "summary": f"The weighted sum of the inputs' deltas, {formula}, computed exactly by concatenating "
                       "their LoRA factors" + (f", then re-compressed per module to its best rank-{rank} "
                                                "approximation (truncated SVD, from the factors)." if rank else "."),
            "inputs": [_input_record(a, w) for a, w in zip(adapters, weights)],
            "sections": {"Report": report, **({"Re-compression per module": compression} if compression else {})}}
    save_adapter(out, modules, like=adapters[0], card=card, overwrite=overwrite)
    return report


def compose_onto(previous_adapter: AdapterLike, new_adapter: AdapterLike, out: str | Path, *,
                 overwrite: bool = False) -> dict:
    """One LoRA on the original base for a chain of training stages: ``new_adapter`` was trained
    on a base into which ``previous_adapter`` had been merged, so the chain's delta is the sum."""
    return compose([(previous_adapter, 1.0), (new_adapter, 1.0)], out, overwrite=overwrite)


def orthogonalize(adapter: AdapterLike, against: Sequence[AdapterLike], out: str | Path, *,
                  side: str = "output", overwrite: bool = False) -> dict:
    """Remove from ``adapter``'s delta, module by module, its part in the output space (columns)
    or input space (rows), or both, of every ``against`` adapter's delta. Ranks are kept; the
    report gives the share of the squared norm each module lost."""
    if side not in ("output", "input", "both"):
        raise UserError(f"--side {side}: use output, input or both")
    if not against:
        raise UserError("orthogonalize: give at least one --against adapter")
    target = _as_adapter(adapter)
    others = [_as_adapter(a) for a in against]
    check_compatible([target, *others])
    modules, removed = {}, {}
    total_before = total_after = 0.0
    with one_thread():
        for name, f in target.modules.items():
            g = Factors(B=f.B.double(), A=f.A.double() * f.scaling, embedding=f.embedding)
            before = frobenius_norm(g) ** 2
            spaces = [svd_factors(o.modules[name]) for o in others if name in o.modules]
            if spaces:
                if side in ("output", "both"):
                    q = _orthonormal_basis([u[:, :numerical_rank(s)] for u, s, _ in spaces])
                    if q is not None:
                        g.B = g.B - q @ (q.T @ g.B)
                if side in ("input", "both"):
                    p = _orthonormal_basis([v[:, :numerical_rank(s)] for _, s, v in spaces])
                    if p is not None:
                        g.A = g.A - (g.A @ p) @ p.T
            after = frobenius_norm(g) ** 2
            total_before += before
            total_after += after
            removed[name] = {"norm_before": math.sqrt(before), "norm_after": math.sqrt(after),
                             "removed_fraction": 1.0 - after / before if before > 0 else 0.0}
            modules[name] = Factors(B=g.B.float(), A=g.A.float(), embedding=f.embedding)
    overall = 1.0 - total_after / total_before if total_before > 0 else 0.0
    report = {"operation": "orthogonalize", "side": side, "input": str(target.path),
              "against": [str(o.path) for o in others], "modules": len(modules),
              "removed_fraction": overall, "per_layer": _per_layer_removed(removed), "per_module": removed}
    card = {"title": "Orthogonalized persona adapter", "operation": f"orthogonalize --side {side}",
            "summary": f"{_label(target)} with the part of its delta in the {side} space"
                       f"{'s' if side == 'both' else ''} of {', '.join(_label(o) for o in others)}'s deltas removed, "
                       f"module by module; its delta now has zero inner product with theirs. It lost "
                       f"{overall:.1%} of its squared norm.",
            "inputs": [_input_record(target, "adapter"), *[_input_record(o, "against") for o in others]],
            "sections": {"Share of squared norm removed, per layer": report["per_layer"],
                         "Per module": removed}}
    save_adapter(out, modules, like=target, card=card, overwrite=overwrite)
    return report


def _per_layer_removed(removed: dict[str, dict]) -> dict[str, float]:
    sums: dict[str, list[float]] = {}
    for name, r in removed.items():
        s = sums.setdefault(_layer_label(module_layer(name)), [0.0, 0.0])
        s[0] += r["norm_before"] ** 2
        s[1] += r["norm_after"] ** 2
    return {layer: (1.0 - after / before if before > 0 else 0.0) for layer, (before, after) in sums.items()}


def parse_layers(spec: str | Iterable[int] | None) -> set[int] | None:
    """``"10-20"`` (inclusive), ``"3,5,7-9"`` or an iterable of ints."""
    if spec is None:
        return None
    if not isinstance(spec, str):
        return {int(x) for x in spec}
    layers: set[int] = set()
    for part in filter(None, (p.strip() for p in spec.split(","))):
        match = re.fullmatch(r"(\d+)(?:\s*-\s*(\d+))?", part)
        if not match:
            raise UserError(f"--layers {spec}: '{part}' is not a layer number or range; write e.g. 10-20 or 3,5,7-9")
        lo, hi = int(match[1]), int(match[2] or match[1])
        if hi < lo:
            raise UserError(f"--layers {spec}: the range {part} runs backwards; write {hi}-{lo}")
        layers.update(range(lo, hi + 1))
    if not layers:
        raise UserError(f"--layers '{spec}': no layers given")
    return layers


def scale(adapter: AdapterLike, weight: float, out: str | Path, *, layers: str | Iterable[int] | None = None,
          modules: str | Sequence[str] | None = None, overwrite: bool = False) -> dict:
    """Multiply the delta of the chosen modules (all, or those in ``layers`` and/or matching
    ``modules``: a module type such as ``q_proj`` or a dotted suffix) by ``weight``; the rest
    keep weight 1."""
    source = _as_adapter(adapter)
    weight = float(weight)
    if not math.isfinite(weight):
        raise UserError(f"--weight {weight}: not a finite number")
    chosen_layers = parse_layers(layers)
    wanted = [m.strip() for m in modules.split(",")] if isinstance(modules, str) else list(modules or [])
    wanted = [m for m in wanted if m]
    present_layers = {module_layer(n) for n in source.modules} - {None}
    if chosen_layers is not None:
        missing = sorted(chosen_layers - present_layers)
        if missing:
            have = f"{min(present_layers)}-{max(present_layers)}" if present_layers else "none"
            raise UserError(f"--layers: {source.path} adapts no module in layer(s) {_ranges(missing)} "
                            f"(its layers: {have})")
    for m in wanted:
        if not any(_matches(n, m) for n in source.modules):
            types = {n.rsplit('.', 1)[-1] for n in source.modules}
            raise UserError(f"--modules: {source.path} adapts no module '{m}'{did_you_mean(m, types)}; "
                            f"it adapts {', '.join(sorted(types))}")

    def selected(name: str) -> bool:
        return ((chosen_layers is None or module_layer(name) in chosen_layers)
                and (not wanted or any(_matches(name, m) for m in wanted)))

    scaled = sorted(n for n in source.modules if selected(n))
    out_modules = {}
    for name, f in source.modules.items():
        g = concatenate([(f, weight if name in scaled else 1.0)])
        if g is not None:
            out_modules[name] = g
    report = {"operation": "scale", "input": str(source.path), "weight": weight,
              "layers": _ranges(sorted(chosen_layers)) if chosen_layers is not None else "all",
              "module_filter": wanted or "all", "scaled_modules": len(scaled), "modules": len(source.modules)}
    card = {"title": "Scaled persona adapter", "operation": "scale",
            "summary": f"{_label(source)} with the delta of {len(scaled)} of its {len(source.modules)} modules "
                       f"multiplied by {weight:g} (layers: {report['layers']}; modules: "
                       f"{', '.join(wanted) or 'all'}); the others unchanged.",
            "inputs": [_input_record(source, weight)],
            "sections": {"Report": report, "Scaled modules": scaled}}
    save_adapter(out, out_modules, like=source, card=card, overwrite=overwrite)
    return report


def _matches(name: str, pattern: str) -> bool:
    return name == pattern or name.endswith("." + pattern)


def _ranges(values: Sequence[int]) -> str:
    values = sorted(values)
    parts, start = [], None
    for i, v in enumerate(values):
        if start is None:
            start = v
        if i + 1 == len(values) or values[i + 1] != v + 1:
            parts.append(f"{start}" if start == v else f"{start}-{v}")
            start = None
    return ",".join(parts)


def _rank_range(modules: dict[str, Factors]) -> list[int]:
    ranks = [f.rank for f in modules.values()]
    return [min(ranks), max(ranks)] if ranks else [0, 0]


def _label(adapter: Adapter) -> str:
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


def _layer_label(layer: int | None) -> str:
    return "other" if layer is None else str(layer)


# -------------------------------------------------------------------------------- inspect

@dataclass
class _Spectrum:
    u: torch.Tensor
    s: torch.Tensor
    v: torch.Tensor
    rank: int = field(init=False)

    def __post_init__(self):
        self.rank = numerical_rank(self.s)


def _overlap(x: torch.Tensor, y: torch.Tensor) -> float:
    """||X^T Y||_F^2 / min(k_x, k_y) for orthonormal X, Y: 1 when one space contains the other."""
    k = min(x.shape[1], y.shape[1])
    return float(((x.T @ y) ** 2).sum()) / k if k else 0.0


def inspect(adapters: Sequence[AdapterLike], *, png: str | Path | None = None) -> dict:
    """Per module and per layer: each adapter's delta norm and effective rank; for every pair:
    cosine of the deltas (overall, per layer, per module) and subspace overlap of their output
    and input spaces against chance (a random k-dim subspace overlaps another by max(k)/d)."""
    items = [_as_adapter(a) for a in adapters]
    if not items:
        raise UserError("inspect: give at least one adapter directory")
    check_compatible(items)
    labels = _unique_labels(items)
    names = sorted({n for a in items for n in a.modules}, key=_module_sort_key)
    with one_thread():
        spectra = [{n: _Spectrum(*svd_factors(f)) for n, f in a.modules.items()} for a in items]
    modules = {}
    for name in names:
        modules[name] = {"layer": module_layer(name), "type": module_type(name), "per_adapter": [
            {"norm": float(sp[name].s.norm()), "rank": items[i].modules[name].rank,
             "effective_rank": effective_rank(sp[name].s)} if name in sp else None
            for i, sp in enumerate(spectra)]}
    layers: dict[str, dict] = {}
    for name, m in modules.items():
        row = layers.setdefault(_layer_label(m["layer"]), {"sq": [0.0] * len(items), "erank": [[] for _ in items]})
        for i, entry in enumerate(m["per_adapter"]):
            if entry:
                row["sq"][i] += entry["norm"] ** 2
                row["erank"][i].append(entry["effective_rank"])
    per_layer = [{"layer": layer, "norm": [math.sqrt(x) for x in row["sq"]],
                  "effective_rank": [sum(e) / len(e) if e else 0.0 for e in row["erank"]]}
                 for layer, row in layers.items()]
    summary = []
    for i, a in enumerate(items):
        entries = [m["per_adapter"][i] for m in modules.values() if m["per_adapter"][i]]
        summary.append({"label": labels[i], "path": str(a.path), "sha256": a.sha256, "base_model": a.base_model,
                        "modules": len(entries), "rank": _rank_range(a.modules),
                        "norm": math.sqrt(sum(e["norm"] ** 2 for e in entries)),
                        "mean_effective_rank": sum(e["effective_rank"] for e in entries) / len(entries)})
    with one_thread():
        pairs = [_pair_report(i, j, items, spectra, modules)
                 for i in range(len(items)) for j in range(i + 1, len(items))]
    report = {"adapters": summary, "layers": per_layer, "pairs": pairs, "modules": modules}
    if png is not None:
        report["png"] = str(plot_inspect(report, png))
    return report


def _pair_report(i: int, j: int, items: list[Adapter], spectra: list[dict], modules: dict) -> dict:
    a, b = items[i], items[j]
    dot, sq_a, sq_b = 0.0, 0.0, 0.0
    layer_dot: dict[str, list[float]] = {}
    per_module, out_ov, out_ch, in_ov, in_ch = {}, [], [], [], []
    for name, m in modules.items():
        na = m["per_adapter"][i]["norm"] if m["per_adapter"][i] else 0.0
        nb = m["per_adapter"][j]["norm"] if m["per_adapter"][j] else 0.0
        sq_a += na ** 2
        sq_b += nb ** 2
        acc = layer_dot.setdefault(_layer_label(m["layer"]), [0.0, 0.0, 0.0])
        acc[1] += na ** 2
        acc[2] += nb ** 2
        if name not in a.modules or name not in b.modules:
            continue
        d = inner_product(a.modules[name], b.modules[name])
        dot += d
        acc[0] += d
        per_module[name] = d / (na * nb) if na > 0 and nb > 0 else 0.0
        sa, sb = spectra[i][name], spectra[j][name]
        if sa.rank and sb.rank:
            out_dim, in_dim = a.modules[name].shape
            out_ov.append(_overlap(sa.u[:, :sa.rank], sb.u[:, :sb.rank]))
            out_ch.append(min(1.0, max(sa.rank, sb.rank) / out_dim))
            in_ov.append(_overlap(sa.v[:, :sa.rank], sb.v[:, :sb.rank]))
            in_ch.append(min(1.0, max(sa.rank, sb.rank) / in_dim))

    def mean(x):
        return sum(x) / len(x) if x else 0.0

    return {"a": i, "b": j, "cosine": dot / math.sqrt(sq_a * sq_b) if sq_a > 0 and sq_b > 0 else 0.0,
            "shared_modules": len(per_module),
            "output_overlap": mean(out_ov), "output_chance": mean(out_ch),
            "input_overlap": mean(in_ov), "input_chance": mean(in_ch),
            "per_layer_cosine": {layer: (d / math.sqrt(x * y) if x > 0 and y > 0 else 0.0)
                                 for layer, (d, x, y) in layer_dot.items()},
            "per_module_cosine": per_module}


def _module_sort_key(name: str):
    layer = module_layer(name)
    kind = module_type(name)
    order = _MODULE_ORDER.index(kind) if kind in _MODULE_ORDER else len(_MODULE_ORDER)
    return (layer is None, layer if layer is not None else 0, order, name)


def _unique_labels(items: list[Adapter]) -> list[str]:
    paths = [a.path.resolve().parts if a.path else ("adapter",) for a in items]
    for depth in range(1, max(len(p) for p in paths) + 1):
        labels = ["/".join(p[-depth:]) for p in paths]
        if len(set(labels)) == len(labels):
            return labels
    return [f"{i}:{'/'.join(p[-2:])}" for i, p in enumerate(paths)]


def format_inspect(report: dict) -> str:
    """The inspect report as plain-text tables."""
    adapters = report["adapters"]
    width = max(len(a["label"]) for a in adapters)
    lines = [f"{'#':>2}  {'adapter':<{width}}  {'modules':>7}  {'rank':>7}  {'norm':>10}  {'eff. rank':>9}"]
    for i, a in enumerate(adapters):
        r = a["rank"]
        rank = f"{r[0]}" if r[0] == r[1] else f"{r[0]}-{r[1]}"
        lines.append(f"{i:>2}  {a['label']:<{width}}  {a['modules']:>7}  {rank:>7}  {a['norm']:>10.4g}  "
                     f"{a['mean_effective_rank']:>9.2f}")
    lines += ["", "per layer: delta norm / mean effective rank" + (", cosine per pair" if report["pairs"] else "")]
    head = f"{'layer':>5}  " + "  ".join(f"{f'[{i}] norm':>10} {'erank':>6}" for i in range(len(adapters)))
    head += "".join(f"  {'cos[%d,%d]' % (p['a'], p['b']):>9}" for p in report["pairs"])
    lines.append(head)
    for row in report["layers"]:
        line = f"{row['layer']:>5}  " + "  ".join(f"{n:>10.4g} {e:>6.2f}"
                                                for n, e in zip(row["norm"], row["effective_rank"]))
        line += "".join(f"  {p['per_layer_cosine'].get(row['layer'], 0.0):>9.4f}" for p in report["pairs"])
        lines.append(line)
    if report["pairs"]:
        lines += ["", "pairs: cosine of the deltas; subspace overlap ||U_a^T U_b||^2 / min rank, "
                      "against chance max rank / d",
                  f"{'pair':>6}  {'cosine':>8}  {'modules':>7}  {'output overlap (chance)':>24}  "
                  f"{'input overlap (chance)':>23}"]
        for p in report["pairs"]:
            lines.append(f"{p['a']:>2} - {p['b']:<1}  {p['cosine']:>8.4f}  {p['shared_modules']:>7}  "
                         f"{p['output_overlap']:>14.4f} ({p['output_chance']:.4f})  "
                         f"{p['input_overlap']:>13.4f} ({p['input_chance']:.4f})")
    if report.get("png"):
        lines += ["", f"heatmap: {report['png']}"]
    return "\n".join(lines)


def _grid(report: dict, values: Callable[[dict], float | None]):
    """(matrix layers x module types, layer labels, type labels) from a per-module value."""
    import numpy as np

    mods = report["modules"]
    layers = sorted({m["layer"] for m in mods.values()}, key=lambda x: (x is None, x if x is not None else 0))
    types = sorted({m["type"] for m in mods.values()},
                   key=lambda t: (_MODULE_ORDER.index(t) if t in _MODULE_ORDER else len(_MODULE_ORDER), t))
    grid = np.full((len(layers), len(types)), np.nan)
    for name, m in mods.items():
        value = values({"name": name, **m})
        if value is not None:
            grid[layers.index(m["layer"]), types.index(m["type"])] = value
    return grid, [_layer_label(x) for x in layers], types


def plot_inspect(report: dict, png: str | Path) -> Path:
    """Heatmaps: each adapter's delta norm per layer and module type; for two or more adapters,
    the pairwise cosine and subspace-overlap matrices and each pair's cosine per layer and module."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    n = len(report["adapters"])
    labels = [a["label"] for a in report["adapters"]]
    panels: list[tuple] = []
    for i in range(min(n, 4)):
        grid, rows, cols = _grid(report, lambda m, i=i: m["per_adapter"][i]["norm"] if m["per_adapter"][i] else None)
        panels.append(("map", f"[{i}] {labels[i]}: delta norm", grid, rows, cols, "viridis", None, None))
    if n >= 2:
        cos, overlap = np.eye(n), np.eye(n)
        notes = [["" for _ in range(n)] for _ in range(n)]
        for p in report["pairs"]:
            a, b = p["a"], p["b"]
            cos[a, b] = cos[b, a] = p["cosine"]
            overlap[a, b] = overlap[b, a] = p["output_overlap"]
            notes[a][b] = notes[b][a] = f"{p['output_overlap']:.3g}\n(chance {p['output_chance']:.2g})"
        names = [f"[{i}]" for i in range(n)]
        panels.append(("matrix", "cosine of the deltas", cos, names, names, "coolwarm", (-1.0, 1.0), None))
        panels.append(("matrix", "output subspace overlap", overlap, names, names, "magma", (0.0, 1.0), notes))
        for p in report["pairs"][:3]:
            grid, rows, cols = _grid(report, lambda m, p=p: p["per_module_cosine"].get(m["name"]))
            lim = float(np.nanmax(np.abs(grid))) if np.isfinite(grid).any() else 1.0
            panels.append(("map", f"cosine [{p['a']}] vs [{p['b']}]", grid, rows, cols, "coolwarm",
                           (-lim or -1.0, lim or 1.0), None))
    ncols = min(3, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.6 * ncols, 4.2 * nrows), squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.axis("off")
    for ax, (kind, title, grid, rows, cols, cmap, lims, notes) in zip(axes.flat, panels):
        image = ax.imshow(grid, aspect="auto", cmap=cmap, vmin=lims[0] if lims else None,
                          vmax=lims[1] if lims else None, interpolation="nearest")
        ax.set_title(title, fontsize=9)
        ax.set_xticks(range(len(cols)), cols, rotation=45, ha="right", fontsize=7)
        step = max(1, len(rows) // 16)
        ax.set_yticks(range(0, len(rows), step), rows[::step], fontsize=7)
        if kind == "map":
            ax.set_ylabel("layer", fontsize=8)
        else:
            for (r, c), value in np.ndenumerate(grid):
                text = notes[r][c] if notes and notes[r][c] else f"{value:.3g}"
                ax.text(c, r, text, ha="center", va="center", fontsize=8,
                        color="white" if cmap == "magma" and value < 0.5 else "black")
        fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    fig.suptitle("  ".join(f"[{i}] {label}" for i, label in enumerate(labels)), fontsize=9)
    fig.tight_layout()
    png = Path(png)
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return png
