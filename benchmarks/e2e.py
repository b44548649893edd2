"""STIP end to end over loopback, against plaintext over the same stack, in one run.

Two `stip serve` subprocesses run the same code: one serves the sealed model, the other the
*unsealed* one (the same checkpoint format, sealed with identity permutations). The STIP side
goes through `stip.client.Client` (embed, permute, send, un-permute); the plaintext side
sends unpermuted embeddings with the same wire codec and reads the outputs as they come.
Requests alternate between the two sides, round by round.

Measured:
  1. MiniLM-L6, 128 tokens, batch 1: STIP end to end / plaintext end to end  (target ≤ 1.05),
     with the in-process plaintext forward beside it;
  2. P3's cost per request: embed + permute + un-permute                       (target ≤ 2 ms);
  3. generation on a GPT-2-small-shaped config (random weights), 64 new tokens, greedy:
     STIP tokens/s / plaintext tokens/s over the same stack                    (target ≥ 0.9).

    python benchmarks/e2e.py [--rounds 40] [--gen-rounds 5] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import httpx
import numpy as np
import torch
import transformers

from stip import keys, wire
from stip.client.api import Client
from stip.models import default
from stip.seal import identity, load_source, seal, seal_folder, write
from stip.serve.process import ServerProcess

TOKENS = 128
NEW_TOKENS = 64


def plaintext_folder(model, out: Path, preprocessing_from=None) -> Path:
    """The unsealed model in the sealed format: every permutation is the identity."""
    from stip.seal import family_of

    layout = family_of(model).layout(model)
    perms = {}
    for name, spec in layout.items():
        if isinstance(spec, keys.Free):
            perms[name] = np.arange(spec.n)
        else:
            for part, n in spec.lengths().items():
                perms[f"{name}.{part}"] = np.arange(n)
    key = keys.Key(perms, layout, identity(model))
    write(seal(model, key), out, preprocessing_from=preprocessing_from)
    return out


class PlainSide:
    """Same HTTP stack and wire codec, no permutation: the baseline."""

    def __init__(self, folder: Path, url: str):
        from stip.client.bundle import ClientBundle

        self.embedder = ClientBundle.load(folder / "client").embedder
        self.http = httpx.Client(base_url=url, timeout=120)

    def post(self, path: str, tensors: dict) -> tuple[dict, dict]:
        r = self.http.post(path, content=wire.encode(tensors), headers={"Content-Type": wire.MEDIA_TYPE})
        r.raise_for_status()
        return wire.decode(r.content)

    def forward(self, ids, mask):
        return self.post("/v1/forward", {"embeddings": self.embedder(ids), "attention_mask": mask})[0]

    def generate(self, prompt: list[int], n: int) -> list[int]:
        out, meta = self.post("/v1/sessions", {"embeddings": self.embedder(torch.tensor([prompt]))})
        sid, new = meta["session"], []
        try:
            while True:
                new.append(int(out["logits"][0].argmax()))
                if len(new) == n:
                    return new
                x = self.embedder(torch.tensor([[new[-1]]]), position_offset=len(prompt) + len(new) - 1)
                out, _ = self.post(f"/v1/sessions/{sid}/step", {"embeddings": x})
        finally:
            self.http.delete(f"/v1/sessions/{sid}")


def timed(fn):
    t0 = time.perf_counter()
    result = fn()
    return time.perf_counter() - t0, result


def bench_encoder(tmp: Path, rounds: int) -> dict:
    src = default.path()
    model = load_source(src)
    seal_folder(src, tmp / "stip")
    plaintext_folder(load_source(src), tmp / "plain", preprocessing_from=src)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, model.config.vocab_size, (1, TOKENS), generator=gen)
    mask = torch.ones_like(ids)
    with ServerProcess(tmp / "stip" / "server") as s_srv, ServerProcess(tmp / "plain" / "server") as p_srv:
        client = Client(tmp / "stip" / "client", s_srv.url)
        plain = PlainSide(tmp / "plain", p_srv.url)
        stip_fwd = lambda: client.forward({"input_ids": ids, "attention_mask": mask})  # noqa: E731
        plain_fwd = lambda: plain.forward(ids, mask)  # noqa: E731
        for _ in range(3):
            stip_fwd(), plain_fwd()
        ref = plain_fwd()["last_hidden_state"]
        err = float((stip_fwd()["last_hidden_state"] - ref).abs().max())
        t_stip, t_plain, t_client, bytes_up, bytes_down = [], [], [], [], []
        for r in range(rounds):
            before = (client.stats.client_seconds, client.stats.bytes_up, client.stats.bytes_down)
            order = [("s", stip_fwd), ("p", plain_fwd)] if r % 2 == 0 else [("p", plain_fwd), ("s", stip_fwd)]
            for side, fn in order:
                t, _ = timed(fn)
                (t_stip if side == "s" else t_plain).append(t)
            t_client.append(client.stats.client_seconds - before[0])
            bytes_up.append(client.stats.bytes_up - before[1])
            bytes_down.append(client.stats.bytes_down - before[2])
        client.close()
    with torch.no_grad():
        for _ in range(3):
            model(input_ids=ids, attention_mask=mask)
        t_inproc = [timed(lambda: model(input_ids=ids, attention_mask=mask))[0] for _ in range(rounds)]
    paired = [s / p for s, p in zip(t_stip, t_plain)]
    return {
        "model": default.NAME,
        "tokens": TOKENS,
        "batch": 1,
        "rounds": rounds,
        "stip_ms": statistics.median(t_stip) * 1e3,
        "plain_same_stack_ms": statistics.median(t_plain) * 1e3,
        "ratio": statistics.median(paired),
        "plain_in_process_ms": statistics.median(t_inproc) * 1e3,
        "client_ms": statistics.median(t_client) * 1e3,
        "bytes_up": int(statistics.median(bytes_up)),
        "bytes_down": int(statistics.median(bytes_down)),
        "max_abs_error": err,
    }


def bench_generation(tmp: Path, rounds: int) -> dict:
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_embd=768, n_layer=12, n_head=12, vocab_size=50257, n_positions=1024)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    src = tmp / "gpt2-src"
    model.save_pretrained(src)
    seal_folder(src, tmp / "gpt2-stip")
    plaintext_folder(load_source(src), tmp / "gpt2-plain")
    prompt = list(range(100, 116))
    with ServerProcess(tmp / "gpt2-stip" / "server") as s_srv, ServerProcess(tmp / "gpt2-plain" / "server") as p_srv:
        client = Client(tmp / "gpt2-stip" / "client", s_srv.url)
        plain = PlainSide(tmp / "gpt2-plain", p_srv.url)
        stip_gen = lambda: client.generate(prompt, NEW_TOKENS, stop_at_eos=False).token_ids  # noqa: E731
        plain_gen = lambda: plain.generate(prompt, NEW_TOKENS)  # noqa: E731
        stip_gen(), plain_gen()  # warm-up
        t_stip, t_plain, same = [], [], True
        for r in range(rounds):
            order = [("s", stip_gen), ("p", plain_gen)] if r % 2 == 0 else [("p", plain_gen), ("s", stip_gen)]
            got = {}
            for side, fn in order:
                t, got[side] = timed(fn)
                (t_stip if side == "s" else t_plain).append(t)
            same &= got["s"] == got["p"]
        client.close()
    tps_stip = NEW_TOKENS / statistics.median(t_stip)
    tps_plain = NEW_TOKENS / statistics.median(t_plain)
    return {
        "model": "GPT-2-small shape (random weights)",
        "prompt_tokens": len(prompt),
        "new_tokens": NEW_TOKENS,
        "rounds": rounds,
        "stip_tokens_per_s": tps_stip,
        "plain_tokens_per_s": tps_plain,
        "ratio": tps_stip / tps_plain,
        "same_tokens": bool(same),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=40, help="alternating rounds for the encoder")
    ap.add_argument("--gen-rounds", type=int, default=5, help="alternating rounds of 64-token generation")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    args = ap.parse_args(argv)
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()

    with tempfile.TemporaryDirectory(prefix="stip-e2e-") as tmp:
        tmp = Path(tmp)
        print("encoder: MiniLM-L6, 128 tokens …", file=sys.stderr)
        enc = bench_encoder(tmp, args.rounds)
        print("generation: GPT-2-small shape, 64 new tokens …", file=sys.stderr)
        gen = bench_generation(tmp, args.gen_rounds)
    checks = {
        "e2e_ratio_le_1.05": enc["ratio"] <= 1.05,
        "client_ms_le_2": enc["client_ms"] <= 2.0,
        "generation_ratio_ge_0.9": gen["ratio"] >= 0.9,
    }
    result = {"encoder": enc, "generation": gen, "checks": checks, "torch_threads": torch.get_num_threads()}
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"MiniLM-L6, batch 1 × {TOKENS} tokens, {args.rounds} alternating rounds (medians)")
    print(f"  STIP end to end over loopback    {enc['stip_ms']:8.2f} ms")
    print(f"  plaintext, same server stack     {enc['plain_same_stack_ms']:8.2f} ms")
    print(f"  ratio (median of pairs)          {enc['ratio']:8.3f}   target ≤ 1.05  {'ok' if checks['e2e_ratio_le_1.05'] else 'MISSED'}")
    print(f"  plaintext forward, in process    {enc['plain_in_process_ms']:8.2f} ms")
    print(f"  P3 embed + permute + un-permute  {enc['client_ms']:8.3f} ms   target ≤ 2 ms  {'ok' if checks['client_ms_le_2'] else 'MISSED'}")
    print(f"  bytes up / down per request      {enc['bytes_up']:,} / {enc['bytes_down']:,}")
    print(f"  max abs error vs plaintext       {enc['max_abs_error']:.1e}")
    print(f"GPT-2-small shape, greedy, {NEW_TOKENS} new tokens, {args.gen_rounds} alternating rounds")
    print(f"  STIP                             {gen['stip_tokens_per_s']:8.2f} tokens/s")
    print(f"  plaintext, same server stack     {gen['plain_tokens_per_s']:8.2f} tokens/s")
    print(f"  ratio                            {gen['ratio']:8.3f}   target ≥ 0.9   {'ok' if checks['generation_ratio_ge_0.9'] else 'MISSED'}")
    print(f"  identical tokens on both sides   {gen['same_tokens']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
