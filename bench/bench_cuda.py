"""GPU benchmark of the Triton kernels: mixing and the multi-peer loss, on CUDA tensors.

    python bench/bench_cuda.py --out bench/results/<commit>/cuda.json [--no-compile] [--no-graphs]
    python bench/bench_cuda.py --render bench/results/gpu-h200/cuda.json   # a JSON's table again

Every call is timed alone: the L2 cache is flushed (a 256 MB write), the GPU is synchronised,
and CUDA events bracket the call, so its inputs come from memory as a new batch's do and the
call's host work (Python, the op's dispatch, the launches) lies inside its time: a call whose
GPU work is shorter than its launch shows the launch. (``triton.testing.do_bench``, which timed
the JSON of 455a162+gpu-check3, records its start event right behind its own flush without
waiting for it, so up to the flush's duration of a call's host work fell outside that time.) A row's
figure is the median over its calls in about 200 ms; the table gives the median of the passes.

Rows ending in ", CUDA graph" time the same call captured once in a CUDA graph (after a
warm-up on a side stream) and replayed: one launch of the graph replaces the call's Python,
dispatch and launches, so the row shows what the GPU work costs once the host is out of the
way (as ``torch.compile(mode="reduce-overhead")`` or a captured training step gets it). A row
that cannot be captured is listed under the table with the capture's error.

The GB/s column divides the fewest bytes the row's job must move by its time, in passes over
the batch (or the logits):

- input stage (local CutMix box + global blend, forward): read the batch once, write it once
  (2); ``clone`` moves the same bytes and is the floor;
- feature stage, forward + backward of the global blend: the forward reads h and writes the
  output, the backward reads the upstream gradient and writes dh (4; the blend weight needs no
  gradient, so h is not read again); ``clone``: 2;
- loss, forward + backward of ``mixed_kd_loss``: read the logits [K, B, C] in the forward, read
  them again and write their gradient in the backward (3); the softmax row (``softmax`` forward
  + backward of one [K*B, C] tensor, a floor for anything that exponentiates the logits): 5
  (x, y, y, dy, dx).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from _meta import commit  # bench/ is on sys.path
from bench_mix import make_batch, mix2_plan
from bench_mixed_kd_loss import Shape, dml_pair_loop
from torch import Tensor

import metamixer_fast as mf
from metamixer_fast import reference

CUDA = torch.device("cuda")
INPUT_CASES = {  # the CPU benchmark's cases, and one batch large enough to fill the GPU
    "input 256x3x32x32 fp32": ((256, 3, 32, 32), torch.float32),
    "input 64x3x224x224 fp32": ((64, 3, 224, 224), torch.float32),
    "input 64x3x224x224 uint8": ((64, 3, 224, 224), torch.uint8),
    "input 512x3x224x224 bf16": ((512, 3, 224, 224), torch.bfloat16),
}
FEATURE_CASES = {
    "features 256x128x16x16 fp32 fwd+bwd": ((256, 128, 16, 16), torch.float32),
    "features 256x256x28x28 bf16 fwd+bwd": ((256, 256, 28, 28), torch.bfloat16),
}
LOSS_CASES = {
    "loss K=4,B=1024,C=1000 fp32": Shape(4, 1024, 1000),
    "loss K=2,B=128,C=100 fp32": Shape(2, 128, 100),
    "loss K=4,B=1024,C=1000 fp32 ensemble": Shape(4, 1024, 1000, mode="ensemble"),
    "loss K=2,B=4096,C=32000 bf16": Shape(2, 4096, 32000, dtype=torch.bfloat16),
}
COMPILED = {"input 64x3x224x224 fp32", "features 256x128x16x16 fp32 fwd+bwd",
            "loss K=4,B=1024,C=1000 fp32"}  # compiling costs tens of seconds per case


GRAPH = ", CUDA graph"
GRAPHED = ("clone", "mix2 fused", "mix x2", "reference x2", "mix fwd+bwd", "reference fwd+bwd",
           "softmax fwd+bwd", "fused", "reference")  # host sampling and compiled rows are not


def nbytes(t: Tensor) -> int:
    return t.numel() * t.element_size()


def input_rows(shape: tuple[int, ...], dtype: torch.dtype, compile_: bool
               ) -> tuple[dict[str, Callable[[], object]], int]:
    g = torch.Generator().manual_seed(0)
    x = make_batch(shape, dtype, g).to(CUDA)
    n, _, h, w = shape
    plan = [t.to(CUDA) for t in mix2_plan(n, h, w, g)]
    sigma, zeros, boxes, pi, mu = plan
    labels = torch.randint(0, 10, (n,), generator=g)
    mixer = mf.MetaMixer(stages=["input"], generator=torch.Generator().manual_seed(0))
    rows: dict[str, Callable[[], object]] = {
        "clone": x.clone,
        "mix2 fused": lambda: mf.mix2(x, *plan),
        "mix x2": lambda: mf.mix(mf.mix(x, sigma, zeros, boxes), pi, mu),
        "MetaMixer sample + apply": lambda: mixer.sample(labels, device=CUDA).apply(x),
        "reference x2": lambda: reference.mix2(x, *plan),
    }
    if compile_:
        compiled = torch.compile(reference.mix2, fullgraph=True, dynamic=False)
        rows["reference x2, compiled"] = lambda: compiled(x, *plan)
    return rows, nbytes(x)


def feature_rows(shape: tuple[int, ...], dtype: torch.dtype, compile_: bool
                 ) -> tuple[dict[str, Callable[[], object]], int]:
    g = torch.Generator().manual_seed(1)
    h = torch.randn(shape, generator=g).to(CUDA, dtype).requires_grad_(True)
    grad = torch.randn(shape, generator=g).to(CUDA, dtype)
    pi, mu = torch.randperm(shape[0], generator=g).to(CUDA), torch.rand(shape[0], generator=g).to(CUDA)

    def fwd_bwd(fn: Callable[..., Tensor]) -> Callable[[], object]:
        def step() -> object:
            h.grad = None
            fn(h, pi, mu).backward(grad)
            return h.grad
        return step

    rows = {"clone": lambda: h.detach().clone(), "mix fwd+bwd": fwd_bwd(mf.mix),
            "reference fwd+bwd": fwd_bwd(reference.mix)}
    if compile_:
        rows["reference fwd+bwd, compiled"] = fwd_bwd(torch.compile(reference.mix, dynamic=False))
    return rows, nbytes(h)


def loss_rows(shape: Shape, compile_: bool) -> tuple[dict[str, Callable[[], object]], int]:
    g = torch.Generator().manual_seed(2)
    z = (torch.randn(shape.k, shape.b, shape.c, generator=g) * 2).to(CUDA, shape.dtype)
    z.requires_grad_(True)
    labels = torch.randint(0, shape.c, (shape.b,), generator=g).to(CUDA)
    plan, weights = labels[:, None], torch.ones(shape.b, 1, device=CUDA)
    t = shape.temperature
    flat = z.detach().view(-1, shape.c).clone().requires_grad_(True)
    dflat = torch.randn_like(flat)

    def fwd_bwd(loss: Callable[[Tensor], tuple[Tensor, Tensor]]) -> Callable[[], object]:
        def step() -> object:
            z.grad = None
            ce, kd = loss(z)
            (ce.sum() + kd.sum()).backward()
            return z.grad
        return step

    def softmax() -> object:
        flat.grad = None
        torch.softmax(flat, dim=-1).backward(dflat)
        return flat.grad

    def ref(zz: Tensor) -> tuple[Tensor, Tensor]:
        return reference.mixed_kd_loss(zz, plan, weights, t, 0.0, shape.mode)

    rows = {"softmax fwd+bwd": softmax,
            "fused": fwd_bwd(lambda zz: mf.mixed_kd_loss(zz, labels, temperature=t, mode=shape.mode)),
            "reference": fwd_bwd(ref)}
    if compile_:
        rows["reference, compiled"] = fwd_bwd(torch.compile(ref, dynamic=False))
    if shape.mode == "pairwise":
        def dml() -> object:
            z.grad = None
            dml_pair_loop(z, labels, t).backward()
            return z.grad
        rows["dml_pair_loop"] = dml
    return rows, nbytes(z)


# Passes over one batch (or the logits) that each kind of case's job must move, and the rows
# that move another count; see the module docstring.
PASSES = {"input": (2, {}), "features": (4, {"clone": 2}), "loss": (3, {"softmax fwd+bwd": 5})}
# What the JSON's "bytes" counted before it recorded "pass_bytes" (feature stage: 5 passes).
OLD_PASSES = {"input": 2, "features": 5, "loss": 3}


def captured(fn: Callable[[], object]) -> Callable[[], object] | str:
    """The replay of a CUDA graph of one call of ``fn`` (warmed up on a side stream first, as
    torch.cuda.graph asks), or the capture's error."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            fn()
    except RuntimeError as err:
        torch.cuda.synchronize()
        return f"{type(err).__name__}: {str(err).strip().splitlines()[0]}"
    return graph.replay


def with_graphs(rows: dict[str, Callable[[], object]]
                ) -> tuple[dict[str, Callable[[], object]], dict[str, str]]:
    """``rows`` and the CUDA-graph replay of each of them in GRAPHED; the errors of those that
    could not be captured."""
    out, failed = dict(rows), {}
    for name in (r for r in rows if r in GRAPHED):
        replay = captured(rows[name])
        if isinstance(replay, str):
            failed[name + GRAPH] = replay
        else:
            out[name + GRAPH] = replay
    return out, failed


def time_call(fn: Callable[[], object], flush: Tensor) -> float:
    """ms of one call from a cold L2 cache, its host work included (see the module docstring)."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    flush.zero_()
    torch.cuda.synchronize()  # the flush is over before the call's clock starts
    start.record()
    fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end)


def time_rows(rows: dict[str, Callable[[], object]], budget_ms: float = 200.0) -> dict[str, float]:
    """Median ms per row over its calls in about ``budget_ms`` (at least 10; each row warmed
    and, where compiled, compiled before its timing)."""
    flush = torch.empty(256 * 2**20, dtype=torch.int8, device=CUDA)
    out = {}
    for name, fn in rows.items():
        for _ in range(3):
            fn()  # compile / autotune and warm up outside the timing
        times: list[float] = []
        while len(times) < 10 or sum(times) < budget_ms:
            times.append(time_call(fn, flush))
        out[name] = statistics.median(times)
    return out


def run(compile_: bool, repeats: int, graphs: bool) -> dict:
    props = torch.cuda.get_device_properties(CUDA)
    result = {"commit": commit(), "device": props.name, "torch": torch.__version__,
              "triton": mf._backend.triton_version(), "repeats": repeats,
              "timing": "each call alone: L2 flush, synchronize, CUDA events", "cases": {}}
    cases = [(name, lambda s=s, d=d, name=name: input_rows(s, d, compile_ and name in COMPILED))
             for name, (s, d) in INPUT_CASES.items()]
    cases += [(name, lambda s=s, d=d, name=name: feature_rows(s, d, compile_ and name in COMPILED))
              for name, (s, d) in FEATURE_CASES.items()]
    cases += [(name, lambda s=s, name=name: loss_rows(s, compile_ and name in COMPILED))
              for name, s in LOSS_CASES.items()]
    for name, build in cases:
        rows, moved = build()
        rows, failed = with_graphs(rows) if graphs else (rows, {})
        runs = [time_rows(rows) for _ in range(repeats)]  # the spread between whole passes
        result["cases"][name] = {"pass_bytes": moved, "rows": {
            row: {"median_ms": statistics.median(r[row] for r in runs),
                  "all_ms": [r[row] for r in runs]} for row in rows}}
        if failed:
            result["cases"][name]["not_captured"] = failed
        print(f"{name}: " + ", ".join(f"{row} {v['median_ms']:.3f} ms" for row, v in
                                      result["cases"][name]["rows"].items()), file=sys.stderr)
        del rows
        torch.cuda.empty_cache()
    return result


def row_bytes(case: str, entry: dict, row: str) -> float:
    """The fewest bytes ``row`` of ``case`` must move (older JSON: from its "bytes")."""
    kind = case.split()[0]
    one_pass = entry.get("pass_bytes") or entry["bytes"] / OLD_PASSES[kind]
    passes, other = PASSES[kind]
    return other.get(row.removesuffix(GRAPH), passes) * one_pass


def markdown(result: dict) -> str:
    how = result.get("timing", "triton.testing.do_bench medians")
    lines = [f"GPU: {result['device']}; torch {result['torch']}, triton {result['triton']}; commit "
             f"{result['commit']}; median of {result['repeats']} passes ({how}).", "",
             "| case | implementation | median ms | GB/s (fewest bytes) | ours is x faster |",
             "|---|---|---:|---:|---:|"]
    ours_rows = ("mix2 fused", "mix fwd+bwd", "fused")
    floors = ("clone", "softmax fwd+bwd")
    not_captured = []
    for case, entry in result["cases"].items():
        rows = entry["rows"]
        for row, v in rows.items():
            plain = row.removesuffix(GRAPH)
            suffix = row[len(plain):]  # ours as the same kind of row, graph or not
            ours = next((rows[r + suffix]["median_ms"] for r in ours_rows if r + suffix in rows), None)
            t = v["median_ms"]
            faster = "" if ours is None or plain in ours_rows or plain in floors else f"{t / ours:.1f}"
            gbs = row_bytes(case, entry, row) / t / 1e6
            lines.append(f"| {case} | {row} | {t:.3f} | {gbs:.0f} | {faster} |")
        not_captured += [f"- {case} | {row}: {why}" for row, why in entry.get("not_captured", {}).items()]
    if not_captured:
        lines += ["", "Not captured in a CUDA graph:", *not_captured]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None,
                        help="JSON path, e.g. bench/results/<commit>/cuda.json (default: none written)")
    parser.add_argument("--render", type=Path, default=None, metavar="JSON",
                        help="print the table of a JSON written earlier, run nothing")
    parser.add_argument("--no-compile", action="store_true", help="leave out the torch.compile rows")
    parser.add_argument("--no-graphs", action="store_true", help="leave out the CUDA graph rows")
    parser.add_argument("--repeats", type=int, default=3, help="whole passes over the rows (default 3)")
    args = parser.parse_args()
    if args.render is not None:
        print(markdown(json.loads(args.render.read_text())))
        return
    if args.repeats < 1 or args.repeats % 2 == 0:
        sys.exit("bench_cuda: --repeats must be odd (the median of an even count is a mean)")
    if not torch.cuda.is_available():
        sys.exit("bench_cuda: torch sees no CUDA device; this benchmark runs on a GPU only")
    result = run(not args.no_compile, args.repeats, not args.no_graphs)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(markdown(result))


if __name__ == "__main__":
    main()
