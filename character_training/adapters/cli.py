"""`character-training adapters ...`: persona adapter algebra from the command line.

    character-training adapters compose A:1.0 B:0.5 C:-0.3 -o OUT [--rank K] [--force]
    character-training adapters orthogonalize A --against B [--against C ...] [--side output|input|both] -o OUT
    character-training adapters scale A --weight W [--layers 10-20] [--modules q_proj,v_proj] -o OUT
    character-training adapters inspect A [B ...] [--png FILE] [--json FILE]

Only adapter files are read, never the base model; every output is a PEFT adapter directory
(see ``character_training.adapters.algebra``, ``.io`` and ``.inspect``). Outputs never destroy
anything: ``-o`` is never an input, the current directory, home or ``/``; ``--force`` replaces
only an adapter directory this tool wrote; ``--png`` / ``--json`` never overwrite an input or a
file ``inspect`` did not write. ``add_adapter_commands(sub)`` registers the commands on the main
parser's subparsers; each returns an exit code and raises UserError for user errors.
"""
from __future__ import annotations

from pathlib import Path

from character_training.errors import UserError

# vLLM's default --max-lora-rank; a larger adapter needs the flag raised (or --rank).
VLLM_DEFAULT_MAX_LORA_RANK = 16


def parse_term(text: str) -> tuple[str, float]:
    """``PATH:WEIGHT`` (``PATH`` alone means weight 1)."""
    path, sep, weight = text.rpartition(":")
    if not sep:
        return text, 1.0
    if not path.strip():
        raise UserError(f"'{text}': no adapter before the weight; write ADAPTER:WEIGHT, e.g. personas/pirate:0.5")
    try:
        return path, float(weight)
    except ValueError:
        if Path(text).is_dir():  # a directory whose name holds a colon
            return text, 1.0
        raise UserError(f"{text}: the weight '{weight}' is not a number; write ADAPTER:WEIGHT, "
                        "e.g. personas/pirate:0.5 or personas/formal:-0.3") from None


def _rank_note(report: dict) -> str:
    top = report["rank"][1]
    if top <= VLLM_DEFAULT_MAX_LORA_RANK:
        return ""
    return (f"note: rank up to {top}: serve it with vLLM's --max-lora-rank >= {top}, "
            f"or re-compress with --rank")


def _compose(args) -> int:
    from character_training.adapters.algebra import compose

    terms = [parse_term(t) for t in args.terms]
    report = compose(terms, args.output, rank=args.rank, overwrite=args.force)
    rank = report["rank"]
    print(f"wrote {args.output}: {report['modules']} modules, rank {rank[0]}-{rank[1]}")
    if "recompression" in report:
        r = report["recompression"]
        print(f"re-compressed {r['modules']} modules to rank {args.rank}: relative error mean "
              f"{r['mean_relative_error']:.3g}, max {r['max_relative_error']:.3g} (the best any rank-{args.rank} "
              "adapter can do)")
    note = _rank_note(report)
    if note:
        print(note)
    return 0


def _orthogonalize(args) -> int:
    from character_training.adapters.algebra import orthogonalize

    report = orthogonalize(args.adapter, args.against, args.output, side=args.side, overwrite=args.force)
    print(f"wrote {args.output}: {report['modules']} modules; removed {report['removed_fraction']:.2%} of the "
          f"squared norm ({args.side} side)")
    worst = sorted(report["per_module"].items(), key=lambda kv: -kv[1]["removed_fraction"])[:5]
    for name, r in worst:
        print(f"  {name}: removed {r['removed_fraction']:.2%} ({r['norm_before']:.4g} -> {r['norm_after']:.4g})")
    return 0


def _scale(args) -> int:
    from character_training.adapters.algebra import scale

    modules = args.modules.split(",") if args.modules else None
    report = scale(args.adapter, args.weight, args.output, layers=args.layers, modules=modules, overwrite=args.force)
    print(f"wrote {args.output}: {report['scaled_modules']} of {report['modules']} modules scaled by {args.weight:g}")
    return 0


def _inspect(args) -> int:
    import json

    from character_training.adapters.inspect import check_report_path, format_inspect, inspect

    if args.json:  # before anything is computed: a report never overwrites an input or a file not ours
        check_report_path(args.json, "--json", args.adapters)
        if args.png and Path(args.json).resolve() == Path(args.png).resolve():
            raise UserError(f"--json {args.json}: is also the --png file; give the report and the heatmap "
                            "different names")
    report = inspect(args.adapters, png=args.png)
    print(format_inspect(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        print(f"report: {args.json}")
    return 0


def add_adapter_commands(subparsers) -> None:
    """Register ``adapters compose|orthogonalize|scale|inspect`` on the main parser's subparsers."""
    parser = subparsers.add_parser("adapters", help="combine, orthogonalize, scale and inspect LoRA adapters "
                                                    "(reads adapter files only, never the base model)")
    sub = parser.add_subparsers(dest="adapters_action", required=True)

    p = sub.add_parser("compose", help="weighted sum of adapters' deltas, exact (or re-compressed with --rank)")
    p.add_argument("terms", nargs="+", metavar="ADAPTER:WEIGHT",
                   help="adapter directory and weight, e.g. pirate:1.0 formal:-0.3 (negative weights subtract)")
    p.add_argument("-o", "--output", required=True, help="output adapter directory")
    p.add_argument("--rank", type=int, help="re-compress each module to its best rank-K approximation")
    p.add_argument("--force", action="store_true",
                   help="replace an existing output (only an adapter this tool wrote)")
    p.set_defaults(func=_compose)

    p = sub.add_parser("orthogonalize", help="remove from an adapter the part of its delta that other adapters' "
                                             "deltas span, so that editing it leaves them undisturbed")
    p.add_argument("adapter")
    p.add_argument("--against", action="append", required=True, help="adapter to be orthogonal to (repeatable)")
    p.add_argument("--side", choices=["output", "input", "both"], default="output",
                   help="project out their output space (columns), input space (rows), or both")
    p.add_argument("-o", "--output", required=True, help="output adapter directory")
    p.add_argument("--force", action="store_true",
                   help="replace an existing output (only an adapter this tool wrote)")
    p.set_defaults(func=_orthogonalize)

    p = sub.add_parser("scale", help="turn a persona up or down, everywhere or in chosen layers and modules")
    p.add_argument("adapter")
    p.add_argument("--weight", type=float, required=True, help="factor for the chosen modules' delta")
    p.add_argument("--layers", help="layers to scale, e.g. 10-20 or 3,5,7-9 (default: all)")
    p.add_argument("--modules", help="module types to scale, e.g. q_proj,v_proj (default: all)")
    p.add_argument("-o", "--output", required=True, help="output adapter directory")
    p.add_argument("--force", action="store_true",
                   help="replace an existing output (only an adapter this tool wrote)")
    p.set_defaults(func=_scale)

    p = sub.add_parser("inspect", help="norms and effective ranks; for two or more adapters, pairwise cosine and "
                                       "subspace overlap (table and heatmap PNG)")
    p.add_argument("adapters", nargs="+")
    p.add_argument("--png", default="adapters_inspect.png",
                   help="heatmap file (default: adapters_inspect.png); an existing file is replaced only when "
                        "inspect wrote it")
    p.add_argument("--json", help="also write the full report (per module) as JSON")
    p.set_defaults(func=_inspect)
