"""CPU benchmark of MetaMixer mixing: local (CutMix box) + global (whole-sample blend) mixing.

Two entry points:
  pytest bench/bench_mix.py                       pytest-benchmark timings of every row
  python bench/bench_mix.py --report [--threads 2]  one interleaved run: markdown table + JSON in
                                                  bench/results/mix_cpu_2threads.json
  python bench/bench_mix.py --report --alone      the input stage without the reference and
                                                  kornia rows (whose temporaries evict the batch
                                                  between rounds), plus the parts of mix2 alone
                                                  and mix2 with cached or streamed stores
  --retain-memory on                              glibc keeps freed memory, as the training loop
                                                  does by default (JSON *_retain-memory.json; the
                                                  README's tables)
  --fresh-batches                                 the input stage, each call on the next batch of
                                                  a 128 MB ring (its own plan each): the batch
                                                  comes from memory, not the cache

Rows, per case (threads fixed by --threads, default 2):
  input stage, forward - the batch x [N, C, H, W] gets a CutMix box from a local partner, then a
  whole-sample blend with a global partner:
    clone           one x.clone(): the floor (reads and writes the batch once)
    add             torch.add of x and a second batch: a point of reference, not a floor (it
                    reads two batches; the global blend reads one batch twice)
    mix x2          metamixer::mix twice (box call, then blend call), as two separate ops
    mix2 fused      metamixer::mix2: both stages in one pass
    mix2, cached stores / mix2, streamed stores
                    mix2 with its output stored through the cache or streamed past it
                    (METAMIXER_STREAM_STORES=off / on); mix2 fused picks one (see docs/mixing-performance.md)
    mix2 + plan     mix2 plus drawing the plan (partners, Beta weights, boxes) with torch ops,
                    comparable with kornia, whose modules draw their own parameters
    reference x2    metamixer_fast.reference.mix twice (eager PyTorch)
    reference x2, compiled  the same two calls under torch.compile (fullgraph, static shapes),
                    compiled before timing
    kornia          kornia RandomCutMixV2 then RandomMixUpV2 (draw + apply), if installed
  feature stage, forward + backward - a whole-sample blend of features h (requires grad) and
  its backward for a fixed upstream gradient: mix, reference (eager and compiled), kornia
  RandomMixUpV2, clone.
Every ratio compares medians measured in the same run, the implementations interleaved
round by round (in a random order each round) so machine noise hits them alike.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from collections.abc import Callable
from functools import partial
from pathlib import Path

import pytest
import torch
from _meta import commit, cpu_name, interleaved_times  # bench/ is on sys.path
from torch import Tensor

import metamixer_fast as mf
from metamixer_fast import reference

try:
    import kornia.augmentation as K

    KORNIA_SKIP = None
except ImportError as exc:  # kornia is a bench-only extra (requirements-bench.txt)
    K = None
    KORNIA_SKIP = f"kornia is not installed ({exc}); pip install -r requirements-bench.txt"

INPUT_CASES = {  # name: (shape, dtype)
    "input 256x3x32x32 fp32": ((256, 3, 32, 32), torch.float32),
    "input 64x3x224x224 fp32": ((64, 3, 224, 224), torch.float32),
    "input 64x3x224x224 uint8": ((64, 3, 224, 224), torch.uint8),
}
FEATURE_CASES = {  # layer2 outputs of a CIFAR ResNet and of an ImageNet ResNet-18
    "features 256x128x16x16 fp32 fwd+bwd": ((256, 128, 16, 16), torch.float32),
    "features 64x128x28x28 fp32 fwd+bwd": ((64, 128, 28, 28), torch.float32),
}
RESULTS = Path(__file__).resolve().parent / "results" / "mix_cpu_{threads}threads.json"
RESULTS_ALONE = RESULTS.with_name("mix_cpu_{threads}threads_alone.json")


# ------------------------------------------------------------------------------------ inputs

def make_batch(shape: tuple[int, ...], dtype: torch.dtype, g: torch.Generator) -> Tensor:
    if dtype == torch.uint8:
        return torch.randint(0, 256, shape, generator=g, dtype=torch.uint8)
    return torch.randn(shape, generator=g, dtype=dtype)


def sample_plan(n: int, h: int, w: int, g: torch.Generator | None = None
                ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(sigma, boxes [N, 4], pi, mu): CutMix boxes of area 1 - lam, lam ~ Beta(1, 1), clipped to
    the image, and a global blend weight mu ~ Beta(1, 1) (uniform draws here)."""
    sigma = torch.randperm(n, generator=g)
    pi = torch.randperm(n, generator=g)
    lam = torch.rand(n, generator=g)
    mu = torch.rand(n, generator=g)
    cut = (1 - lam).sqrt()
    ch, cw = (cut * h).long(), (cut * w).long()
    cy = torch.randint(0, h, (n,), generator=g)
    cx = torch.randint(0, w, (n,), generator=g)
    boxes = torch.stack([(cy - ch // 2).clamp(0, h), (cy + ch // 2).clamp(0, h),
                         (cx - cw // 2).clamp(0, w), (cx + cw // 2).clamp(0, w)], 1)
    return sigma, boxes, pi, mu


FRESH_BYTES = 128 << 20  # four times the EPYC's 32 MB L3 cache


class Batches:
    """The input-stage batch and plan that each call of a row works on.

    By default one batch x (and one plan), as in the README's tables: after the first round it
    is in the cache. With ``fresh=True`` a ring of batches (each with its own plan) totalling at
    least FRESH_BYTES, and every call (of any row) takes the next one, so the batch a call reads
    was last touched a ring's worth of data earlier and comes from memory, as a new batch from
    a data loader can."""

    def __init__(self, shape: tuple[int, ...], dtype: torch.dtype, g: torch.Generator,
                 fresh: bool = False) -> None:
        n, _, h, w = shape
        batch_bytes = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
        count = max(2, -(-FRESH_BYTES // batch_bytes)) if fresh else 1
        plans = torch.Generator().manual_seed(0)
        self.entries = []
        for _ in range(count):
            x = make_batch(shape, dtype, g)
            self.entries.append((x, x.flip(0).clone(), mix2_plan(n, h, w, plans)))
        self.calls = 0

    def __call__(self) -> tuple[Tensor, Tensor, tuple[Tensor, ...]]:
        """(x, a second batch for ``add``, the plan (sigma, zeros, boxes, pi, mu))."""
        entry = self.entries[self.calls % len(self.entries)]
        self.calls += 1
        return entry


# mix2 fused with its output's stores forced through the cache or past it (by default mix2
# picks the mode by timing its calls, see csrc/core/store_choice.h)
STORE_ROWS = {"mix2, cached stores": "off", "mix2, streamed stores": "on"}


class WithStores:
    """A row: ``step`` with METAMIXER_STREAM_STORES=mode (read by mix2 on every call), set and
    restored by ``interleaved_times`` outside the row's time."""

    def __init__(self, mode: str, step: Callable[[], object]) -> None:
        self.mode, self.step, self.saved = mode, step, None

    def before(self) -> None:
        self.saved = os.environ.get("METAMIXER_STREAM_STORES")
        os.environ["METAMIXER_STREAM_STORES"] = self.mode

    def after(self) -> None:
        if self.saved is None:
            os.environ.pop("METAMIXER_STREAM_STORES", None)
        else:
            os.environ["METAMIXER_STREAM_STORES"] = self.saved

    def __call__(self) -> object:
        return self.step()


def core_rows(batches: Batches) -> dict[str, Callable[[], object] | str]:
    """The floor (clone), a point of reference (add of two different batches, which reads twice
    the data the blend does), our two ways of doing the input stage, and the fused one with its
    store mode forced each way (see the module docstring)."""
    def clone() -> object:
        return batches()[0].clone()

    def add() -> object:
        x, other, _ = batches()
        return torch.add(x, other)

    def mix_x2() -> object:
        x, _, (sigma, zeros, boxes, pi, mu) = batches()
        return mf.mix(mf.mix(x, sigma, zeros, boxes), pi, mu)

    def mix2() -> object:
        x, _, plan = batches()
        return mf.mix2(x, *plan)

    stores = {name: WithStores(mode, mix2) for name, mode in STORE_ROWS.items()}
    return {"clone": clone, "add": add, "mix x2": mix_x2, "mix2 fused": mix2, **stores}


def input_rows(batches: Batches) -> dict[str, Callable[[], object] | str]:
    """name -> callable (or the reason the row is skipped) for the input-stage benchmark."""
    x = batches.entries[0][0]
    n, _, h, w = x.shape
    compiled_mix2 = compiled(reference.mix2)
    rows = core_rows(batches)

    def eager_reference() -> object:
        x, _, plan = batches()
        return reference.mix2(x, *plan)

    def compiled_reference() -> object:
        x, _, plan = batches()
        return compiled_mix2(x, *plan)

    rows["mix2 + plan"] = lambda: mf.mix2(batches()[0], *mix2_plan(n, h, w))
    rows["reference x2"] = eager_reference
    rows["reference x2, compiled"] = warmed(compiled_reference)
    if K is None:
        rows["kornia CutMixV2+MixUpV2"] = KORNIA_SKIP
    elif not x.is_floating_point():
        rows["kornia CutMixV2+MixUpV2"] = (f"kornia's mix augmentations accept floating images only, "
                                           f"not {x.dtype}")
    else:
        cutmix = K.RandomCutMixV2(p=1.0, use_correct_lambda=True)
        mixup = K.RandomMixUpV2(p=1.0)
        rows["kornia CutMixV2+MixUpV2"] = lambda: mixup(cutmix(batches()[0]))
    return rows


ALONE_PARTS = ("mix, blend only", "mix, box only", "mix2, no boxes")


def alone_rows(batches: Batches) -> dict[str, Callable[[], object] | str]:
    """The input-stage rows without the slow comparators (the reference, kornia), whose
    temporaries evict the batch between rounds, plus the parts of mix2 on their own: the
    whole-sample blend, the CutMix box, and mix2 with empty boxes."""
    no_boxes = torch.zeros(batches.entries[0][0].shape[0], 4, dtype=torch.long)

    def blend() -> object:
        x, _, (_, _, _, pi, mu) = batches()
        return mf.mix(x, pi, mu)

    def box() -> object:
        x, _, (sigma, zeros, boxes, _, _) = batches()
        return mf.mix(x, sigma, zeros, boxes)

    def mix2_no_boxes() -> object:
        x, _, (sigma, zeros, _, pi, mu) = batches()
        return mf.mix2(x, sigma, zeros, no_boxes, pi, mu)

    return {**core_rows(batches), ALONE_PARTS[0]: blend, ALONE_PARTS[1]: box,
            ALONE_PARTS[2]: mix2_no_boxes}


def compiled(fn: Callable[..., Tensor]) -> Callable[..., Tensor]:
    """torch.compile of a reference function: the whole graph, static shapes."""
    return torch.compile(fn, fullgraph=True, dynamic=False)


def warmed(step: Callable[[], object]) -> Callable[[], object] | str:
    """step after one call (which compiles it, outside the timing), or why it failed
    (torch.compile needs a C++ compiler on the CPU)."""
    try:
        step()
    except Exception as exc:  # a failed compile only skips its row
        return f"torch.compile failed: {type(exc).__name__}: {str(exc).splitlines()[0]}"
    return step


def mix2_plan(n: int, h: int, w: int, g: torch.Generator | None = None
              ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """sample_plan as mix2's arguments after x: (sigma, zeros (CutMix), boxes, pi, mu)."""
    sigma, boxes, pi, mu = sample_plan(n, h, w, g)
    return sigma, torch.zeros(n), boxes, pi, mu


def feature_rows(h: Tensor) -> dict[str, Callable[[], object] | str]:
    """Forward + backward of a whole-sample blend at a feature stage."""
    n = h.shape[0]
    g = torch.Generator().manual_seed(1)
    pi, mu = torch.randperm(n, generator=g), torch.rand(n, generator=g)
    grad = torch.randn(h.shape, generator=g)
    leaf = h.detach().requires_grad_(True)

    def run(fn: Callable[[Tensor], Tensor]) -> Callable[[], object]:
        def step() -> object:
            leaf.grad = None
            out = fn(leaf)
            out.backward(grad)
            return leaf.grad
        return step

    rows: dict[str, Callable[[], object] | str] = {
        "clone": lambda: h.clone(),
        "mix fwd+bwd": run(lambda t: mf.mix(t, pi, mu)),
        "reference fwd+bwd": run(lambda t: reference.mix(t, pi, mu)),
        "reference fwd+bwd, compiled": warmed(run(partial(compiled(reference.mix), src=pi, w=mu))),
    }
    if K is None:
        rows["kornia MixUpV2 fwd+bwd"] = KORNIA_SKIP
    else:
        mixup = K.RandomMixUpV2(p=1.0)
        rows["kornia MixUpV2 fwd+bwd"] = run(lambda t: mixup(t))
    return rows


# ------------------------------------------------------------------------------------ timing

def report(threads: int, rounds: int, out_path: Path, alone: bool = False,
           retain_memory: bool = False, fresh: bool = False) -> dict:
    from metamixer_fast.memory import retain_freed_memory

    # glibc's defaults give large freed blocks back to the kernel, depending on the heap's
    # layout, and an op's fresh output then pays its page faults again; the training loop's
    # retain_memory setting keeps them (for every row alike)
    retained = retain_freed_memory() if retain_memory else False
    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(0)
    result = {"commit": commit(), "threads": threads, "rounds": rounds, "retain_memory": retained,
              "torch": torch.__version__, "fresh_batches": fresh,
              "cpu": cpu_name(), "cores": os.cpu_count(), "loadavg_before": os.getloadavg(),
              "backend": mf._backend.backend_for("mix", torch.device("cpu")), "skipped": {}, "cases": {}}
    cases: list[tuple[str, Batches | Tensor, Callable]] = [
        (name, Batches(shape, dtype, g, fresh), alone_rows if alone else input_rows)
        for name, (shape, dtype) in INPUT_CASES.items()]
    if not (alone or fresh):  # features come straight from the layer before: no fresh mode
        cases += [(name, make_batch(shape, dtype, g), feature_rows)
                  for name, (shape, dtype) in FEATURE_CASES.items()]
    for name, data, make_rows in cases:
        rows = make_rows(data)
        if isinstance(data, Batches):
            result.setdefault("batches_per_case", {})[name] = len(data.entries)
        for row, fn in list(rows.items()):
            if isinstance(fn, str):
                result["skipped"][row] = fn
                print(f"skipping {row}: {fn}", file=sys.stderr)
                del rows[row]
        times = interleaved_times(rows, rounds)  # type: ignore[arg-type]
        result["cases"][name] = {row: {"median_ms": 1e3 * statistics.median(ts), "min_ms": 1e3 * min(ts)}
                                 for row, ts in times.items()}
        print(f"{name}: " + ", ".join(f"{k} {v['median_ms']:.2f} ms" for k, v in
                                      result["cases"][name].items()), file=sys.stderr)
    result["loadavg_after"] = os.getloadavg()
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(result, indent=2) + "\n")
    print(markdown(result))
    return result


def markdown(result: dict) -> str:
    ring = ", ".join(str(k) for k in result.get("batches_per_case", {}).values())
    load = ", ".join(f"{v:.1f}" for v in result["loadavg_before"])
    lines = [f"CPU: {result['cpu']} ({result['cores']} cores, load average {load} before the run); "
             f"{result['threads']} threads; "
             f"{'retain_memory on' if result.get('retain_memory') else 'glibc malloc defaults'}; "
             f"torch {result['torch']}; commit {result['commit']}; "
             f"backend {result['backend']}; median and min of {result['rounds']} interleaved "
             f"rounds" + (f"; a fresh batch every call (rings of {ring} batches)"
                          if result.get("fresh_batches") else "") + ".", "",
             "| case | implementation | median ms | min ms | median / clone median | "
             "min / clone min | fused (median) is x faster |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for case, rows in result["cases"].items():
        clone, clone_min = rows["clone"]["median_ms"], rows["clone"]["min_ms"]
        ours = rows.get("mix2 fused", rows.get("mix fwd+bwd"))["median_ms"]
        for row, v in rows.items():
            t, tmin = v["median_ms"], v["min_ms"]
            mine = ("clone", "add", "mix2 fused", "mix fwd+bwd", *ALONE_PARTS, *STORE_ROWS)
            faster = "" if row in mine else f"{t / ours:.1f}"
            lines.append(f"| {case} | {row} | {t:.2f} | {tmin:.2f} | {t / clone:.2f} | "
                         f"{tmin / clone_min:.2f} | {faster} |")
    for row, why in result["skipped"].items():
        lines.append(f"\nSkipped {row}: {why}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------ pytest-benchmark

def _pytest_params() -> list:
    params = []
    for case, (shape, dtype) in {**INPUT_CASES, **FEATURE_CASES}.items():
        kind = "features" if case in FEATURE_CASES else "input"
        names = ["clone", "add", "mix x2", "mix2 fused", *STORE_ROWS, "mix2 + plan", "reference x2",
                 "reference x2, compiled", "kornia CutMixV2+MixUpV2"] if kind == "input" else [
            "clone", "mix fwd+bwd", "reference fwd+bwd", "reference fwd+bwd, compiled",
            "kornia MixUpV2 fwd+bwd"]
        params += [pytest.param(case, shape, dtype, kind, row, id=f"{case}-{row}") for row in names]
    return params


@pytest.mark.parametrize("case, shape, dtype, kind, row", _pytest_params())
def test_mix_benchmark(benchmark, case, shape, dtype, kind, row):
    g = torch.Generator().manual_seed(0)
    fn = (input_rows(Batches(shape, dtype, g)) if kind == "input"
          else feature_rows(make_batch(shape, dtype, g)))[row]
    if isinstance(fn, str):
        pytest.skip(fn)
    threads = torch.get_num_threads()
    torch.set_num_threads(int(os.environ.get("METAMIXER_BENCH_THREADS", "2")))
    getattr(fn, "before", lambda: None)()  # a store-mode row's mode, as interleaved_times sets it
    try:
        benchmark.extra_info.update(case=case, threads=torch.get_num_threads())
        benchmark(fn)
    finally:
        getattr(fn, "after", lambda: None)()
        torch.set_num_threads(threads)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--report", action="store_true", help="print the markdown table, write JSON")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--alone", action="store_true",
                        help="input stage only, without the reference and kornia rows, plus "
                             "the parts of mix2 (default 301 rounds, JSON *_alone.json)")
    parser.add_argument("--rounds", type=int, default=None, help="default 41 (301 with --alone)")
    parser.add_argument("--retain-memory", choices=["on", "off"], default="off",
                        help="keep freed memory in the process, as the training loop's "
                             "retain_memory option does (default off: malloc's defaults)")
    parser.add_argument("--fresh-batches", action="store_true",
                        help="input stage only: every call takes the next batch of a ring of "
                             f"{FRESH_BYTES >> 20} MB, so the batch comes from memory, not the "
                             "cache (JSON *_fresh.json)")
    parser.add_argument("--out", type=str, default=None,
                        help="JSON path ({threads} is filled in)")
    args = parser.parse_args()
    if not args.report:
        parser.print_help()
        return
    rounds = args.rounds or (301 if args.alone else 41)
    out = args.out or str(RESULTS_ALONE if args.alone else RESULTS)
    if args.retain_memory == "on" and not args.out:
        out = out.replace(".json", "_retain-memory.json")
    if args.fresh_batches and not args.out:
        out = out.replace(".json", "_fresh.json")
    report(args.threads, rounds, Path(out.format(threads=args.threads)), alone=args.alone,
           retain_memory=args.retain_memory == "on", fresh=args.fresh_batches)


if __name__ == "__main__":
    main()
