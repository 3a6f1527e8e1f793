"""Does `BLIP_CUDA_GRAPHS` decode what `generate()` decodes on this device? Run it before timing the graphs.

    python benchmarks/gpu_check.py                          # cuda, float32, the tiny and small models
    python benchmarks/gpu_check.py --sizes tiny --device cpu   # smoke test (the step runs without graphs)

For each size it builds two runtimes on the same checkpoint, `generate()` and the graph decoding loop, and
decodes the same batches (1 to 20 rows, captions and prompts mixed) with greedy, min-tokens + repetition
penalty and seeded sampling. In float32 the texts must be equal row for row (log-probabilities to rounding);
on CUDA the graphs must really have been captured and replayed. Prints one JSON line per batch, writes
`gpu_check.json` to `--out`, and exits 1 when a check fails.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PROMPTS = [None, "Question: what is in the picture? Answer:", "a photo of"]


def _param_sets() -> dict[str, Any]:
    from blip_tools.params import GenerationParams

    return {
        "greedy": GenerationParams(max_new_tokens=20),
        "min-tokens+repetition": GenerationParams(max_new_tokens=12, min_new_tokens=12, repetition_penalty=1.3),
        "sampled-2-per-image": GenerationParams(do_sample=True, seed=3, num_return_sequences=2, top_p=0.9),
    }


def check(size: str, device: str, dtype: str, batches: list[int], report: Any) -> bool:
    """Compare both runtimes on `size`; report one row per (batch, parameters); True when every check held."""
    from benchmarks.sizes import checkpoint, make_images
    from blip_tools.runtime import Blip2Runtime, GenerationItem
    from blip_tools.settings import BlipSettings
    from blip_tools.testing import tiny_settings_kwargs

    kw = tiny_settings_kwargs(checkpoint(size)) | {"device": device, "dtype": dtype, "feature_cache_size": 0}
    runtimes = {flag: Blip2Runtime(BlipSettings(**kw, cuda_graphs=flag)) for flag in (False, True)}
    images = make_images(max(batches), size, seed=5)
    ok = True
    for b in batches:
        for name, params in _param_sets().items():
            texts: dict[bool, list[list[str]]] = {}
            logprobs: dict[bool, list[float]] = {}
            seconds: dict[bool, float] = {}
            for flag, rt in runtimes.items():
                items = [
                    GenerationItem(rt.preprocess(images[i], f"{size}-{i}"), rt.encode_prompt(PROMPTS[i % 3]))
                    for i in range(b)
                ]
                start = time.perf_counter()
                results = rt.generate(items, params)
                seconds[flag] = time.perf_counter() - start
                groups = [r for r in results if isinstance(r, list)]
                if len(groups) != b:
                    raise RuntimeError(f"{size}, batch {b}, {name}: a row failed: {results}")
                texts[flag] = [[g.text for g in group] for group in groups]
                logprobs[flag] = [g.mean_logprob for group in groups for g in group]
            decoder = runtimes[True]._decoder
            equal = sum(x == y for x, y in zip(texts[False], texts[True], strict=True))
            row = {
                "size": size,
                "batch": b,
                "params": name,
                "rows_equal": equal,
                "max_logprob_diff": max(abs(x - y) for x, y in zip(logprobs[False], logprobs[True], strict=True)),
                "generate_s": seconds[False],
                "loop_s": seconds[True],
                "loop_batches": decoder.batches if decoder else 0,
                "graphs_used": bool(decoder and decoder.use_graphs),
                "graphs_captured": decoder.captured if decoder else 0,
                "graph_error": decoder.graph_error if decoder else None,
            }
            row["ok"] = (
                (equal == b or dtype != "float32")
                and row["loop_batches"] > 0
                and (not device.startswith("cuda") or (row["graphs_used"] and row["graphs_captured"] > 0))
            )
            ok = ok and row["ok"]
            report(row)
    return ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="float32", help="float32 makes greedy decoding comparable row for row")
    parser.add_argument("--sizes", nargs="+", choices=["tiny", "small", "real"], default=["tiny", "small"])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 3, 8, 20])
    parser.add_argument("--out", type=Path, default=Path("bench-results"))
    args = parser.parse_args(argv)
    import torch
    import transformers

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("error: no CUDA device here (use --device cpu for a smoke test)", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    machine = {
        "device": torch.cuda.get_device_name(0) if args.device.startswith("cuda") else args.device,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "dtype": args.dtype,
    }
    rows: list[dict[str, Any]] = []
    errors: list[str] = []

    def report(row: dict[str, Any]) -> None:
        rows.append(row)
        print(json.dumps({k: round(v, 5) if isinstance(v, float) else v for k, v in row.items()}), flush=True)

    ok = True
    for size in args.sizes:
        try:
            ok = check(size, args.device, args.dtype, args.batches, report) and ok
        except Exception as exc:  # report it with the rest, then fail
            import traceback

            traceback.print_exc()
            errors.append(f"{size}: {type(exc).__name__}: {exc}"[:2000])
            ok = False
    (args.out / "gpu_check.json").write_text(
        json.dumps({"machine": machine, "rows": rows, "errors": errors, "ok": ok}, indent=2) + "\n"
    )
    print(f"{'PASS' if ok else 'FAIL'}: BLIP_CUDA_GRAPHS decodes as generate() does on {machine['device']}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
