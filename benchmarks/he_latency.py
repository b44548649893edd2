"""Encrypted (CKKS) inference of the digits polynomial ViT, beside STIP and plaintext, in one run.

Trains the `digits` polynomial ViT (16 tokens of 2×2 pixels, 40 epochs), swaps in degree-6
polynomials, then encrypts the whole digits test split (359 images, 32 a ciphertext) and runs
it: N=16384, 7 levels, 128-bit. Prints the time, amortised time per image, bytes, rounds,
peak memory and errors; then STIP on the same model and batch (P1 seals it with a fresh key, P3
embeds and permutes, P2 runs the sealed blocks, P3 un-permutes; in one process, with the bytes
of the wire messages it would send) and the plaintext polynomial model.

    python benchmarks/he_latency.py [--images 359] [--degree 6] [--json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time

import torch

from stip import wire
from stip.he.runner import run
from stip.models import data, polyformer as pf
from stip.seal import polyformer as seal_polyformer


def best_of(f, repeats: int = 5) -> tuple[float, object]:
    f()  # warm-up
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = f()
        times.append(time.perf_counter() - t0)
    return min(times), out


def stip_run(model, images, plain) -> dict:
    sealed = seal_polyformer.seal(model)
    client, server = sealed.client, sealed.server
    with torch.no_grad():
        up_s, x = best_of(lambda: client.embed(images))
        server_s, y = best_of(lambda: server.body(x))
        down_s, logits = best_of(lambda: client.decode(y))
    return {"seconds": up_s + server_s + down_s, "server_seconds": server_s, "client_seconds": up_s + down_s,
            "bytes_up": len(wire.encode({"x": x})), "bytes_down": len(wire.encode({"logits": y})),
            "max_abs_error": float((logits - plain).abs().max()),
            "argmax_agreement": float((logits.argmax(-1) == plain.argmax(-1)).float().mean()), "logits": logits}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=None, help="default: the whole test split")
    ap.add_argument("--degree", type=int, default=6)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        summary = pf.train_polyformer(tmp, degree=args.degree)
        model = pf.load(tmp)[0]
    _, test = data.load("digits")
    images = test.images[: args.images]
    patches = model.patches(images).numpy()
    report, logits = run(pf.he_plan(model), patches)
    with torch.no_grad():
        plain_s, plain = best_of(lambda: model(images))
    stip = stip_run(model, images, plain)
    labels = test.labels[: len(images)]
    he_acc = float((torch.as_tensor(logits).argmax(-1) == labels).float().mean())
    agree = float((torch.as_tensor(logits).argmax(-1) == plain.argmax(-1)).float().mean())
    stip_acc = float((stip.pop("logits").argmax(-1) == labels).float().mean())
    result = {"he": report.to_json(), "stip": stip, "plaintext_seconds": plain_s, "he_over_plaintext": report.seconds / plain_s,
              "stip_over_plaintext": stip["seconds"] / plain_s,
              "accuracy": {"gelu_twin": summary["twin_accuracy"], "polynomial": summary["polynomial_accuracy"], "encrypted": he_acc,
                           "encrypted_vs_plaintext_top1": agree, "stip": stip_acc}}
    if args.json:
        print(json.dumps(result))
        return 0
    r = report
    print(f"CKKS N={r.params['poly_modulus_degree']}, log q={r.params['log_q']}, {r.params['levels']} levels, 128-bit; "
          f"{r.inputs} images in {r.ciphertexts} ciphertexts, {r.rotations:,} rotations")
    print(f"  encrypted: {r.seconds:.1f} s in all, {r.seconds_per_input:.3f} s per image (amortised); "
          f"server {r.server_seconds:.1f} s, client {r.client_seconds:.1f} s")
    print(f"  bytes up {r.bytes_up / 1e6:.1f} MB, down {r.bytes_down / 1e6:.1f} MB, keys {r.key_bytes / 1e6:.1f} MB; "
          f"{r.refresh_rounds} refresh rounds ({r.refreshed_ciphertexts} ciphertexts); peak memory {r.peak_memory_bytes / 2**30:.2f} GiB")
    print(f"  max abs error vs plaintext polynomial model {r.max_abs_error:.2e}, argmax agreement {100 * r.argmax_agreement:.1f} %")
    print(f"  STIP (sealed PolyViT, same batch): {stip['seconds'] * 1e3:.2f} ms (server {stip['server_seconds'] * 1e3:.2f} ms), "
          f"bytes up {stip['bytes_up'] / 1e3:.1f} kB, down {stip['bytes_down'] / 1e3:.1f} kB, 1 round trip; "
          f"max abs error {stip['max_abs_error']:.1e}, argmax agreement {100 * stip['argmax_agreement']:.1f} %")
    print(f"  plaintext polynomial model, same batch: {plain_s * 1e3:.2f} ms  "
          f"(HE / plaintext = {result['he_over_plaintext']:,.0f}×, STIP / plaintext = {result['stip_over_plaintext']:.2f}×)")
    print(f"  accuracy: GELU twin {100 * summary['twin_accuracy']:.2f} %, polynomial {100 * summary['polynomial_accuracy']:.2f} %, "
          f"encrypted {100 * he_acc:.2f} %, STIP {100 * stip_acc:.2f} %")
    print("  timings: HE one run; STIP and plaintext best of 5 after a warm-up")
    return 0


if __name__ == "__main__":
    sys.exit(main())
