"""Layout advisor: which inference layouts fit beside a training layout, and which refits fastest.

Given the training (source) layout, the GPU count and kind and the inference TP (or several),
it tries every inference layout of those TPs: EP over the divisors of the expert count that
divide the GPU count, from the smallest at which the inference model alone fits the GPU; expert
TP 1, and TP where it divides the expert FFN; PP 1 (and more on request); aliasing off and on
(collocated only: `plan(..., alias=True)`). Each candidate gets the memory check first (in
milliseconds), then, where it may fit, the dry run of every rank's plan (one plan serves both
aliasing variants): memory per GPU, the busiest NVLink and network link, the predicted refit
time. Those that fit come fastest first; the others say why not.

    python -m refit_engine.memory --advise --src tp=8,ep=64 --dst-tp 4,2,1 --gpus 128 --gpu h100

The sweep's automatic EP choice (harness/sweep.py) is the advisor's fastest that fits.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import asdict, dataclass

from refit_engine.compiler import DEFAULT_BUCKET_BYTES
from refit_engine.errors import RefitError
from refit_engine.harness import dry_run as dry
from refit_engine.harness.config import check_layouts
from refit_engine.harness.grid import ParallelGrid
from refit_engine.harness.models.kimi_k2 import KimiK2Config, kimi_k2_tables
from refit_engine.harness.topology import Topology, check_transport, preset

GIB = dry.GIB


@dataclass
class Candidate:
    """One inference layout with aliasing on or off, and what the advisor found. GiB figures
    are per GPU, the largest over ranks; `memory_gib` of a refused one is what it needs (at
    least, where the memory check refused it before any plan)."""

    tp: int
    ep: int
    etp: int
    pp: int
    alias: bool
    fits: bool = False
    reason: str | None = None      # why it does not fit (None where it fits)
    memory_gib: float | None = None
    aliased_gib: float | None = None
    local_gib: float | None = None
    nvlink_gib: float | None = None   # the busiest NVLink port, either direction
    network_gib: float | None = None  # the busiest NIC, either direction
    predicted_s: float | None = None
    floor_s: float | None = None
    bound: str | None = None          # what sets the predicted time (rank and stage)
    # A variant the memory check refused, where the plan was built for the other one: what the
    # plan itself needs (its staging can be below the check's allowance, e.g. all peers IPC).
    plan_gib: float | None = None

    @property
    def layout(self) -> str:
        return f"TP{self.tp}/EP{self.ep}/ETP{self.etp}/PP{self.pp}"

    @property
    def spec(self) -> str:
        """As --dst / RunConfig take it."""
        return f"tp={self.tp},ep={self.ep},etp={self.etp},pp={self.pp}"

    def as_dict(self) -> dict:
        return {"layout": self.layout, **asdict(self)}


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _layouts(cfg: KimiK2Config, side: int, tps, pps) -> list[tuple[int, int, int, int]]:
    """(TP, EP, ETP, PP) to try: EP over the divisors of the expert count that divide the GPUs;
    ETP 1, and TP where it divides the expert FFN; the PPs asked for; where the GPUs divide."""
    eps = _divisors(math.gcd(cfg.num_experts, side))
    out = []
    for tp in tps:
        etps = [1] + ([tp] if tp > 1 and cfg.moe_ffn % tp == 0 else [])
        for pp in pps:
            for etp in etps:
                out += [(tp, ep, etp, pp) for ep in eps
                        if side % (tp * pp) == 0 and side % (ep * etp * pp) == 0]
    return out


def advise(cfg: KimiK2Config, src: ParallelGrid, dst_tps, topo: Topology, collocated: bool = True,
           aliases=(False, True), pps=(1,), etps=None, transport: str = "auto",
           headroom: float = 0.9, bucket_bytes: int = DEFAULT_BUCKET_BYTES,
           progress=None, dst_format: str = "bf16") -> dict:
    """Every inference layout of the TPs `dst_tps` beside training layout `src` on `topo`:
    {"fits": [Candidate], fastest first, "refused": [Candidate], "not_tried": [str],
    "best": the fastest Candidate that fits or None}. `aliases`: the variants to try (aliasing
    applies to collocated refits only); `etps`: expert TPs to keep (None: 1 and TP); `progress`:
    called with a line before each candidate's plan (they take seconds at full size);
    `dst_format`: the inference model's formats (dry_run.DST_FORMATS: bf16, fp8).
    RefitError where the training layout itself cannot be built."""
    check_transport(topo, transport)
    side = src.world
    aliases = [a for a in dict.fromkeys(aliases) if collocated or not a]
    if not aliases:
        raise ValueError("aliasing needs a collocated refit: no variant left to try")
    budget = topo.memory_gib * headroom
    layouts = [l for l in _layouts(cfg, side, dst_tps, pps) if etps is None or l[2] in etps]
    src_spec = {"tp": src.tp, "pp": src.pp, "ep": src.ep, "etp": src.etp}
    world = side if collocated else 2 * side
    check_layouts(cfg, src_spec, src_spec, world, not collocated)  # the source's own reason
    fits, refused, not_tried, src_tables = [], [], [], None
    smallest: dict[tuple, list] = {}  # (tp, etp, pp) -> [(EP, GiB)] below the smallest sensible
    todo = []
    for tp, ep, etp, pp in layouts:
        spec = {"tp": tp, "pp": pp, "ep": ep, "etp": etp}
        try:
            check_layouts(cfg, src_spec, spec, world, not collocated)
        except RefitError as exc:
            refused += [Candidate(tp, ep, etp, pp, a, reason=exc.reason) for a in aliases]
            continue
        grid = ParallelGrid(side, tp=tp, ep=ep, etp=etp, pp=pp, offset=0 if collocated else side)
        alone = dry.weights_per_gpu_gib(cfg, grid, dry.dst_rules(dst_format))
        if alone > budget:  # no aliasing helps: below the smallest sensible EP
            smallest.setdefault((tp, etp, pp), []).append((ep, alone))
            continue
        todo.append((grid, (tp, ep, etp, pp)))
    for (tp, etp, pp), eps in smallest.items():
        ep, alone = eps[-1]
        not_tried.append(f"TP{tp}/ETP{etp}/PP{pp} at EP {', '.join(str(e) for e, _ in eps)}: "
                         f"not tried, the inference model alone needs {alone:.1f} GiB per GPU "
                         f"at EP{ep}, more than the {budget:.0f} GiB usable")
    for i, (grid, (tp, ep, etp, pp)) in enumerate(todo):
        variants, checked = {}, []
        for a in aliases:
            c = Candidate(tp, ep, etp, pp, a)
            m = dry.memory_need(cfg, src, grid, topo, collocated, bucket_bytes, transport, a,
                                dst_format)
            c.memory_gib = m["need"]
            if m["need"] > budget:
                c.reason = _short_reason(m, budget, a)
                checked.append(c)
            else:
                variants[a] = c
        refused += checked
        if not variants:
            continue
        t0 = time.perf_counter()
        if progress:
            progress(f"{i + 1}/{len(todo)} {grid_text(grid)}: planning {world} ranks")
        if src_tables is None:
            src_tables = kimi_k2_tables(cfg, src)
        planned = dry.plan_tables(cfg, src, grid, topo, bucket_bytes, src_tables, dst_format)
        shared = dry.aliases_per_rank(planned) if variants.get(True) else None
        for a, c in variants.items():
            result = dry.figures(planned, topo, transport, headroom, shared if a else None)
            _fill(c, result)
            (fits if c.fits else refused).append(c)
        for c in checked:  # refused before any plan: say what the plan built anyway needs
            if c.alias and shared is None:
                continue
            result = dry.figures(planned, topo, transport, headroom, shared if c.alias else None)
            worst = max(result["ranks"], key=lambda f: f.total_bytes)
            c.plan_gib = worst.total_bytes / GIB
            c.reason += (f" (the plan itself: {c.plan_gib:.1f} GiB, staging "
                         f"{worst.staging_bytes / GIB:.1f})")
        if progress:
            progress(f"{i + 1}/{len(todo)} {grid_text(grid)}: done in "
                     f"{time.perf_counter() - t0:.1f} s")
    fits.sort(key=lambda c: (c.predicted_s, c.memory_gib, c.alias))
    refused.sort(key=lambda c: (c.tp, c.etp, c.pp, c.ep, c.alias))
    return {"fits": fits, "refused": refused, "not_tried": not_tried,
            "best": fits[0] if fits else None, "source": src, "topology": topo,
            "collocated": collocated, "transport": transport, "usable_gib": budget,
            "dst_format": dst_format}


def grid_text(g: ParallelGrid) -> str:
    return f"TP{g.tp}/EP{g.ep}/ETP{g.etp}/PP{g.pp}"


def _short_reason(m: dict, budget: float, alias: bool) -> str:
    shared = f" - at most {m['shared']:.1f} aliased" if alias and m["shared"] else ""
    return (f"memory check: source {m['src']:.1f} + destination {m['dst']:.1f}{shared} + "
            f"staging {m['staging']:.1f} = {m['need']:.1f} GiB > {budget:.0f} usable")


def _fill(c: Candidate, result: dict) -> None:
    ranks = result["ranks"]
    worst = max(ranks, key=lambda f: f.total_bytes)
    c.fits, c.reason = result["fits"], result.get("reason")
    c.memory_gib = worst.total_bytes / GIB
    c.aliased_gib = max(f.aliased_bytes for f in ranks) / GIB
    c.local_gib = max(f.local_bytes for f in ranks) / GIB
    c.nvlink_gib = max(max(f.sent_intra, f.received_intra) for f in ranks) / GIB
    c.network_gib = max(max(f.sent_inter, f.received_inter) for f in ranks) / GIB
    c.predicted_s, c.floor_s = result["predicted"]["seconds"], result["floor"]["seconds"]
    c.bound = f"rank {result['predicted']['rank']}, {result['predicted']['term']}"


def best_expert_parallel(cfg: KimiK2Config, src: ParallelGrid, dst_tp: int, topo: Topology,
                         collocated: bool = True, bucket_bytes: int = DEFAULT_BUCKET_BYTES,
                         progress=None) -> Candidate | None:
    """The sweep's choice: the fastest destination layout that fits beside `src` at TP
    `dst_tp`, with expert TP 1, PP 1 and every local tensor copied (the sweep's runs do not
    alias); None where none fits."""
    return advise(cfg, src, [dst_tp], topo, collocated, aliases=(False,), etps=(1,),
                  bucket_bytes=bucket_bytes, progress=progress)["best"]


def report(advice: dict) -> str:
    """The table: those that fit, fastest first, then those that do not and why."""
    topo, src = advice["topology"], advice["source"]
    gpus = src.world * (1 if advice["collocated"] else 2)
    mode = "collocated" if advice["collocated"] else "non-collocated"
    lines = [(f"inference layouts beside training {grid_text(src)} on {topo.describe(gpus)} "
              f"({mode}), transport {advice['transport']}, {advice['usable_gib']:.0f} GiB "
              "usable per GPU"
              + (f", inference model in {advice['dst_format']}"
                 if advice.get("dst_format", "bf16") != "bf16" else "")),
             "fit, fastest first (GiB per GPU, busiest rank; links: busiest direction):",
             (f"{'#':>3}  {'inference layout':<20}{'alias':>6}{'memory':>9}{'aliased':>9}"
              f"{'local':>8}{'NVLink':>8}{'network':>9}{'predicted':>12}{'floor':>11}  bound by")]
    for i, c in enumerate(advice["fits"], 1):
        lines.append(f"{i:>3}  {c.layout:<20}{'on' if c.alias else 'off':>6}"
                     f"{c.memory_gib:>9.2f}{c.aliased_gib:>9.2f}{c.local_gib:>8.2f}"
                     f"{c.nvlink_gib:>8.2f}{c.network_gib:>9.2f}"
                     f"{c.predicted_s * 1e3:>9.2f} ms{c.floor_s * 1e3:>8.2f} ms  {c.bound}")
    if not advice["fits"]:
        lines.append("  (none)")
    if advice["refused"] or advice["not_tried"]:
        lines.append("do not fit:")
        lines.append(f"     {'inference layout':<20}{'alias':>6}{'needs':>9}  why")
    for c in advice["refused"]:
        need = f"{c.memory_gib:>9.2f}" if c.memory_gib is not None else f"{'':>9}"
        lines.append(f"     {c.layout:<20}{'on' if c.alias else 'off':>6}{need}  {c.reason}")
    for line in advice["not_tried"]:
        lines.append(f"     {line}")
    return "\n".join(lines)


def as_json(advice: dict) -> dict:
    src, topo = advice["source"], advice["topology"]
    best = advice["best"]
    return {"source": grid_text(src), "gpus": src.world, "gpu": topo.name,
            "collocated": advice["collocated"], "transport": advice["transport"],
            "usable_gib": advice["usable_gib"], "dst_format": advice.get("dst_format", "bf16"),
            "best": best.as_dict() if best else None,
            "fits": [c.as_dict() for c in advice["fits"]],
            "refused": [c.as_dict() for c in advice["refused"]],
            "not_tried": advice["not_tried"]}


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.replace(" ", "").split(",") if v]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of integers: {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"positive integers, e.g. 4,2,1, not {text!r}")
    return values


def build_parser() -> argparse.ArgumentParser:
    """The dry run's options, plus --advise and its own."""
    parser = dry.build_parser()
    parser.description = ("Kimi K2 refit memory planner and dry run; --advise: the inference "
                          "layouts that fit beside --src, fastest first")
    group = parser.add_argument_group("layout advisor (--advise)")
    group.add_argument("--advise", action="store_true",
                       help="list every inference layout of --dst-tp that fits beside --src "
                            "(EP, ETP, PP, aliasing off and on), fastest first, then those that "
                            "do not and why; --alias tries aliasing on only")
    group.add_argument("--dst-tp", type=_int_list, default=None,
                       help="inference TP, or several: 4,2,1 (with --advise)")
    group.add_argument("--pp", type=_int_list, default=None,
                       help="inference PP sizes to try (with --advise; default 1)")
    return parser


def main(argv=None) -> int:
    """`python -m refit_engine.memory`: the dry run, or with --advise the advisor."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.advise:
        if args.dst_tp is not None or args.pp is not None:
            parser.error("--dst-tp and --pp go with --advise")
        return dry.main(argv)
    if args.dst_tp is None:
        parser.error("--advise needs --dst-tp (the inference TP, or a list: 4,2,1)")
    if args.headroom > 1:
        parser.error(f"--headroom is a fraction of GPU memory, at most 1, not {args.headroom}")
    if args.alias and args.non_collocated:
        parser.error("--alias: aliasing shares the storage of one rank's two models, so it needs "
                     "a collocated refit (not --non-collocated)")
    try:
        cfg = KimiK2Config(**{"num_layers": args.layers, **args.model})
    except TypeError as exc:
        parser.error(f"--model: {exc}")
    try:
        src = dry.parse_grid(args.src, args.gpus)
    except RefitError as exc:
        parser.error(f"{exc.reason} (--gpus {args.gpus})")
    topo = preset(args.gpu, args.gpus * (2 if args.non_collocated else 1))
    try:
        check_transport(topo, args.transport)
    except ValueError as exc:
        parser.error(f"--transport: {exc} (--gpu {args.gpu})")
    start = time.perf_counter()

    def progress(line: str) -> None:  # on stderr, for runs that take a while (full size)
        if args.gpus >= 64 or time.perf_counter() - start > 1.0:
            print(f"[advisor {time.perf_counter() - start:6.1f} s] {line}", file=sys.stderr,
                  flush=True)
    try:
        advice = advise(cfg, src, args.dst_tp, topo, not args.non_collocated,
                        aliases=(True,) if args.alias else (False, True), pps=args.pp or (1,),
                        transport=args.transport, headroom=args.headroom,
                        bucket_bytes=args.bucket_mib << 20, progress=progress,
                        dst_format=args.dst_format)
    except RefitError as exc:  # the training layout itself
        print(f"refused: {exc.reason}", file=sys.stderr)
        if args.json:
            print(json.dumps({"best": None, "reason": exc.reason}))
        return 2
    if args.json:
        print(json.dumps(as_json(advice)))
    else:
        print(f"Kimi K2 ({cfg.num_layers} layers) " + report(advice))
    return 0 if advice["best"] else 2


if __name__ == "__main__":
    sys.exit(main())
