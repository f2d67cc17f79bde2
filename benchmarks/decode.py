"""Decoding speed: gptkit's `generate` against Hugging Face transformers, same weights.

A random GPT-2 124M (`GPT2Config()`, built locally, nothing downloaded) is copied into a
gptkit `GPT` with `gptkit.convert`, then both decode greedily from the same random
prompt with their KV caches. The two run alternately in one process, `--repeats` times,
at the default thread count; the table shows the best and the median tokens/s of each.
In float32 the two must also produce the same tokens.

bfloat16 means the same bf16-rounded weights on both sides, each library's way: HF's
model cast whole to bf16 (`model.to(torch.bfloat16)`, its documented CPU path), gptkit's
`quantize_model(model, "bf16")` (`gptkit sample --weights bf16`: bf16 matrices read by
gptkit's native kernel, fp32 activations and KV cache).

    .venv/bin/python benchmarks/decode.py
    .venv/bin/python benchmarks/decode.py --batch-sizes 1 --dtypes float32 --repeats 5 \\
        --json decode.json
    .venv/bin/python benchmarks/decode.py --tiny --repeats 1   # a tiny model: a dry run
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

from gptkit.convert import config_from_hf, state_dict_from_hf
from gptkit.generate import generate
from gptkit.model import GPT
from gptkit.quantize import quantize_model

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def _csv(cast: Callable[[str], Any]) -> Callable[[str], list[Any]]:
    return lambda text: [cast(part) for part in text.split(",") if part]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="a tiny GPT-2 (a dry run)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each (alternating)")
    parser.add_argument("--new-tokens", type=int, default=128, help="tokens generated per run")
    parser.add_argument("--prompt-tokens", type=int, default=16, help="random prompt length")
    parser.add_argument("--batch-sizes", type=_csv(int), default=[1, 8], help="e.g. 1,8")
    parser.add_argument(
        "--dtypes", type=_csv(str), default=["float32", "bfloat16"], help="float32,bfloat16"
    )
    parser.add_argument("--json", metavar="OUT", help="also write the results as JSON here")
    args = parser.parse_args(argv)
    unknown = [d for d in args.dtypes if d not in DTYPES]
    if unknown:
        parser.error(f"unknown dtype {unknown[0]!r}; choose from {', '.join(DTYPES)}")
    return args


def hf_config(tiny: bool) -> Any:
    """GPT-2 124M's `GPT2Config`, or a tiny one of the same family for a dry run."""
    import transformers

    if tiny:
        # No end-of-text id: HF's min_new_tokens masks it, which gptkit's decoding does not
        # (at 512 ids greedy decoding would pick it now and then, and the two would part).
        return transformers.GPT2Config(
            vocab_size=512, n_positions=128, n_embd=64, n_layer=2, n_head=2,
            bos_token_id=None, eos_token_id=None,
        )  # fmt: skip
    return transformers.GPT2Config()


def _timed(fn: Callable[[], torch.Tensor]) -> tuple[float, torch.Tensor]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def bench_case(
    ours: GPT, hf: Any, batch: int, prompt_tokens: int, new_tokens: int, repeats: int
) -> dict[str, Any]:
    """Alternate gptkit and HF on one (batch, dtype) case; tokens/s of every run, counting
    the new tokens each returned."""
    g = torch.Generator().manual_seed(batch)
    idx = torch.randint(0, ours.config.vocab_size, (batch, prompt_tokens), generator=g)

    def run_ours(n: int = new_tokens) -> torch.Tensor:
        return generate(ours, idx, n, temperature=0)

    def run_hf(n: int = new_tokens) -> torch.Tensor:
        with torch.inference_mode():
            return hf.generate(
                idx,
                attention_mask=torch.ones_like(idx),
                do_sample=False,
                max_new_tokens=n,
                min_new_tokens=n,  # no early stop: both produce exactly n tokens
                use_cache=True,
                pad_token_id=0,
            )

    run_ours(4), run_hf(4)  # warm-up: first-call allocations and lazy initialisation
    speeds: dict[str, list[float]] = {"ours": [], "hf": []}
    outputs = {}
    for r in range(repeats):
        order = ("ours", "hf") if r % 2 == 0 else ("hf", "ours")  # neither always goes first
        for name in order:
            seconds, outputs[name] = _timed(run_ours if name == "ours" else run_hf)
            new = outputs[name].shape[1] - prompt_tokens  # (batch, prompt_tokens + new)
            speeds[name].append(batch * new / seconds)
    return {
        "batch": batch,
        "ours_tok_s": speeds["ours"],
        "hf_tok_s": speeds["hf"],
        "same_tokens": bool(torch.equal(outputs["ours"], outputs["hf"])),
    }


def table(results: list[dict[str, Any]]) -> str:
    lines = [
        "| batch | dtype | ours tok/s (best / median) | HF tok/s (best / median) "
        "| ratio best | ratio median | same tokens |",
        "|---:|---|---:|---:|---:|---:|---|",
    ]
    for r in results:
        ob, om = max(r["ours_tok_s"]), statistics.median(r["ours_tok_s"])
        hb, hm = max(r["hf_tok_s"]), statistics.median(r["hf_tok_s"])
        lines.append(
            f"| {r['batch']} | {r['dtype']} | {ob:.1f} / {om:.1f} | {hb:.1f} / {hm:.1f} "
            f"| {ob / hb:.2f}x | {om / hm:.2f}x | {'yes' if r['same_tokens'] else 'no'} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    args = parse_args(argv)
    import transformers  # only this benchmark needs it

    torch.manual_seed(0)
    hf_fp32 = transformers.GPT2LMHeadModel(hf_config(args.tiny)).eval()
    config = config_from_hf(hf_fp32.config.to_dict())
    ours_fp32 = GPT(config).eval()
    ours_fp32.load_state_dict(state_dict_from_hf(hf_fp32.state_dict(), config))
    print(
        f"torch {torch.__version__}, transformers {transformers.__version__}, "
        f"{torch.get_num_threads()} threads, HF attention "
        f"{hf_fp32.config._attn_implementation}, {platform.processor() or platform.machine()}"
    )
    results = []
    for dtype_name in args.dtypes:
        dtype = DTYPES[dtype_name]
        # Copies, so the float32 weights stay exact whatever the order of --dtypes.
        if dtype == torch.float32:
            ours, hf = ours_fp32, hf_fp32
        else:
            ours = quantize_model(copy.deepcopy(ours_fp32), "bf16")
            hf = copy.deepcopy(hf_fp32).to(dtype)
        for batch in args.batch_sizes:
            r = bench_case(ours, hf, batch, args.prompt_tokens, args.new_tokens, args.repeats)
            r["dtype"] = dtype_name
            results.append(r)
            print(table([r]).splitlines()[-1], flush=True)
    print()
    print(table(results))
    mismatched = [r for r in results if r["dtype"] == "float32" and not r["same_tokens"]]
    if mismatched:
        print(f"WARNING: float32 tokens differ from HF for batch {mismatched[0]['batch']}")
    if args.json:
        meta = {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "threads": torch.get_num_threads(),
            "new_tokens": args.new_tokens,
            "prompt_tokens": args.prompt_tokens,
            "repeats": args.repeats,
        }
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "results": results}, f, indent=2)
    return results


if __name__ == "__main__":
    main()
