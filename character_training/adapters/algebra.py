"""Persona adapter algebra: compose, re-compress, orthogonalize and scale LoRA adapters.

Reads adapter files only (``adapter_config.json`` + ``adapter_model.safetensors``), never the
base model, and writes PEFT adapter directories (the same two files, plus a ``README.md`` model
card recording the operation, its inputs with their sha256 and weights, and what it changed).
Reading and writing live in ``adapters.io``; the per-module report in ``adapters.inspect``.

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

Outputs are in one canonical form (``adapters.io``): every module has scaling 1, fp32 factors.

    compose([("a", 1.0), ("b", -0.5)], "out", rank=32)
    compose_onto(previous_adapter, new_adapter, "out")   # chained training stages
    orthogonalize("a", ["b"], "out", side="output")
    scale("a", 0.5, "out", layers="10-20", modules="q_proj,v_proj")
"""
from __future__ import annotations

import math
import re
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Iterable, Sequence

import torch

from character_training.adapters.io import (Adapter, AdapterLike, Factors, adapter_input, adapter_label, as_adapter,
                                            check_compatible, layer_label, module_layer, rank_range,
                                            save_adapter)
from character_training.adapters.outputs import check_output
from character_training.card import ModelCard
from character_training.errors import UserError, did_you_mean

# A singular value below this share of the largest is numerically zero (factors are fp32 data,
# the decompositions run in float64).
RANK_RTOL = 1e-9
GRAM_RTOL = 1e-14  # the same for eigenvalues of a Gram matrix (squared singular values): 1e-7


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


# ------------------------------------------------------------------------------ operations

def _source(item: AdapterLike):
    return item.path if isinstance(item, Adapter) else item



def compose(terms: Sequence[tuple[AdapterLike, float]], out: str | Path, *, rank: int | None = None,
            overwrite: bool = False, card: ModelCard | None = None) -> dict:
    """Write ``sum_i w_i dW_i`` as one adapter: exact (rank = the sum of the ranks) or, with
    ``rank``, re-compressed to the best rank-``rank`` approximation per module. ``card``: what
    the caller knows about the result (persona, provenance) for its model card."""
    if not terms:
        raise UserError("compose: give at least one ADAPTER:WEIGHT")
    if rank is not None and rank < 1:
        raise UserError(f"--rank {rank}: a rank is a positive integer")
    check_output(out, [_source(a) for a, _ in terms], overwrite=overwrite)
    adapters = [as_adapter(a) for a, _ in terms]
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
              "modules": len(modules), "rank": rank_range(modules), "recompressed_to": rank}
    if compression:
        errors = [c["relative_error"] for c in compression.values()]
        report["recompression"] = {"modules": len(compression), "max_relative_error": max(errors),
                                   "mean_relative_error": sum(errors) / len(errors)}
    save_adapter(out, modules, like=adapters[0], overwrite=overwrite,
                 card=_compose_card(card or ModelCard(), adapters, weights, rank, report, compression))
    return report


def _compose_card(card: ModelCard, adapters: list[Adapter], weights: list[float], rank: int | None, report: dict,
                  compression: dict) -> ModelCard:
    formula = " + ".join(f"{w:g} * {adapter_label(a)}" for a, w in zip(adapters, weights)).replace("+ -", "- ")
    summary = (f"The weighted sum of the inputs' deltas, {formula}, computed exactly by concatenating their LoRA "
               "factors" + (f", then re-compressed per module to its best rank-{rank} approximation (truncated SVD, "
                            "from the factors)." if rank else "."))
    title = f"{card.persona}: composed persona LoRA adapter" if card.persona else "Composed persona adapter"
    sections = {"Report": report, **({"Re-compression per module": compression} if compression else {})}
    return replace(card, kind="compose", title=title, summary=summary, operation="compose",
                   inputs=tuple(adapter_input(a, w) for a, w in zip(adapters, weights)),
                   sections={**card.sections, **sections})


def compose_onto(previous_adapter: AdapterLike, new_adapter: AdapterLike, out: str | Path, *,
                 overwrite: bool = False, card: ModelCard | None = None) -> dict:
    """One LoRA on the original base for a chain of training stages: ``new_adapter`` was trained
    on a base into which ``previous_adapter`` had been merged, so the chain's delta is the sum."""
    return compose([(previous_adapter, 1.0), (new_adapter, 1.0)], out, overwrite=overwrite, card=card)


def orthogonalize(adapter: AdapterLike, against: Sequence[AdapterLike], out: str | Path, *,
                  side: str = "output", overwrite: bool = False) -> dict:
    """Remove from ``adapter``'s delta, module by module, its part in the output space (columns)
    or input space (rows), or both, of every ``against`` adapter's delta. Ranks are kept; the
    report gives the share of the squared norm each module lost."""
    if side not in ("output", "input", "both"):
        raise UserError(f"--side {side}: use output, input or both")
    if not against:
        raise UserError("orthogonalize: give at least one --against adapter")
    check_output(out, [_source(adapter), *map(_source, against)], overwrite=overwrite)
    target = as_adapter(adapter)
    others = [as_adapter(a) for a in against]
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
    card = ModelCard(
        kind="orthogonalize", title="Orthogonalized persona adapter", operation=f"orthogonalize --side {side}",
        summary=f"{adapter_label(target)} with the part of its delta in the {side} space"
                f"{'s' if side == 'both' else ''} of {', '.join(adapter_label(o) for o in others)}'s deltas removed, "
                f"module by module; its delta now has zero inner product with theirs. It lost "
                f"{overall:.1%} of its squared norm.",
        inputs=(adapter_input(target, "adapter"), *[adapter_input(o, "against") for o in others]),
        sections={"Share of squared norm removed, per layer": report["per_layer"], "Per module": removed})
    save_adapter(out, modules, like=target, card=card, overwrite=overwrite)
    return report


def _per_layer_removed(removed: dict[str, dict]) -> dict[str, float]:
    sums: dict[str, list[float]] = {}
    for name, r in removed.items():
        s = sums.setdefault(layer_label(module_layer(name)), [0.0, 0.0])
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
    check_output(out, [_source(adapter)], overwrite=overwrite)
    source = as_adapter(adapter)
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
    card = ModelCard(
        kind="scale", title="Scaled persona adapter", operation="scale",
        summary=f"{adapter_label(source)} with the delta of {len(scaled)} of its {len(source.modules)} modules "
                f"multiplied by {weight:g} (layers: {report['layers']}; modules: {', '.join(wanted) or 'all'}); "
                "the others unchanged.",
        inputs=(adapter_input(source, weight),), sections={"Report": report, "Scaled modules": scaled})
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
