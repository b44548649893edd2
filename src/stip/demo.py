"""``stip demo`` (what ``make demo`` runs): the three-party flow on the embedded models.

MiniLM: P1 seals the model into a temporary folder and audits it; P2 is ``stip serve``
started as a subprocess on a free loopback port, loading only ``server/``; P3 is the Python
client, loading only ``client/``. The answers are checked against the plaintext model.

Shares mode: two `stip share-server` subprocesses hold the public MiniLM, on TLS links that
P3 pins; P3 shares every matmul input between them and computes the rest; the embeddings are
checked the same way.

Chat: P1 seals SmolLM2-135M-Instruct in token mode; P2 is an unmodified vLLM serving
``server/``; P3 is ``stip proxy`` on ``client/``, asked one question by the official openai
client. The greedy answer must equal plaintext ``transformers`` generation.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import torch
from rich.table import Table

SENTENCES = [
    "Secure inference keeps the user's text away from the cloud.",
    "The model provider draws secret permutations and seals the weights.",
    "A permutation hides the order of coordinates, not their values.",
    "Paris is the capital of France.",
    "How many parties does the protocol need?",
    "Sealing changes no arithmetic, so the outputs are the same.",
    "The cloud never sees the key.",
    "Thank you!",
]
ROUNDS = 5
MIN_COSINE = 1 - 1e-5


CHAT_QUESTION = "What is the capital of France? Answer in one sentence."
CHAT_TOKENS = 48


def run(out, err, *, chat: bool = True) -> int:
    code = minilm(out, err)
    code = max(code, shares_step(out, err))
    if chat:
        code = max(code, chat_step(out, err))
    return code


def chat_step(out, err) -> int:
    """The chat model through vLLM and the proxy, beside plaintext generation."""
    from . import audit, seal
    from .models import chat
    from .serve import vllm
    from .serve.process import ServerProcess

    try:
        import openai

        vllm.python()
    except (ImportError, vllm.EngineUnavailable) as e:
        err.print(f"[red]chat step needs the openai client and vLLM[/]: {e} (`make demo` installs both)")
        return 1
    out.print(f"\n[bold]P1[/] seals {chat.NAME} in token mode …")
    src = chat.path(step=lambda msg: out.print(f"    {msg}"))
    with tempfile.TemporaryDirectory(prefix="stip-chat-") as tmp:
        tmp = Path(tmp)
        sealed = seal.seal_folder(src, tmp, mode="tokens")
        out.print(f"    fingerprint {sealed.key.fingerprint}")
        violations = audit.audit(tmp)
        out.print("    audit " + ("[green]passed[/]" if not violations else f"[red]failed: {violations}[/]"))
        del sealed
        out.print("[bold]P2[/] starts vLLM on server/, an ordinary checkpoint (about a minute) …")
        t0 = time.perf_counter()
        # Eager mode skips torch.compile's warm-up (~2.5 min on 2 cores) for this one question.
        with vllm.VLLMProcess(tmp / seal.SERVER, args=("--enforce-eager",)) as engine:
            out.print(f"    {engine.url} ready in {time.perf_counter() - t0:.0f} s")
            with ServerProcess(tmp / seal.CLIENT, "--upstream", engine.url, command="proxy") as proxy:
                out.print(f"[bold]P3[/] runs [italic]stip proxy client/[/] at {proxy.url}; the openai client asks: {CHAT_QUESTION!r}")
                api = openai.OpenAI(base_url=f"{proxy.url}/v1", api_key="local")
                model = api.models.list().data[0].id
                t0 = time.perf_counter()
                reply = api.chat.completions.create(
                    model=model, messages=[{"role": "user", "content": CHAT_QUESTION}], temperature=0, max_tokens=CHAT_TOKENS
                )
                wall = time.perf_counter() - t0
    sealed_answer = reply.choices[0].message.content

    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(src, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(src, local_files_only=True).eval()
    ids = tok.apply_chat_template([{"role": "user", "content": CHAT_QUESTION}], add_generation_prompt=True, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        gen = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=CHAT_TOKENS, do_sample=False)
    plain_answer = tok.decode(gen[0, ids.shape[1]:], skip_special_tokens=True)

    table = Table(title=f"{chat.NAME}: greedy answer, sealed on vLLM vs plaintext transformers", show_header=False)
    table.add_column("")
    table.add_column("")
    table.add_row("sealed: openai → stip proxy → vLLM", sealed_answer)
    table.add_row("plaintext: transformers generate", plain_answer)
    table.add_row("sealed request", f"{wall:.2f} s, {reply.usage.completion_tokens} tokens")
    out.print(table)
    ok = sealed_answer == plain_answer and not violations
    out.print("[green]identical[/]: the sealed chat model answers as the plaintext one" if ok else "[red]MISMATCH[/] between sealed and plaintext answers")
    return 0 if ok else 1


def shares_step(out, err) -> int:
    """Shares mode on the public MiniLM: two share servers as subprocesses, P3 in process."""
    import shutil

    from . import tls
    from .models import default
    from .serve.process import ServerProcess
    from .shares import Servers, SharesModel

    src = default.path()
    out.print("\n[bold]Shares mode[/] (public weights): two share servers, each with its own certificate "
              "([italic]stip tls-cert[/]), start [italic]stip share-server minilm --tls-cert …[/]")  # fmt: skip
    certs = Path(tempfile.mkdtemp(prefix="stip-demo-certs-"))
    pairs = [(certs / f"s{i}.crt", certs / f"s{i}.key") for i in (1, 2)]
    for cert, key in pairs:
        tls.self_signed(cert, key)
    spawn = lambda pair: ServerProcess(src, "--threads", "1", command="share-server", tls=pair)  # noqa: E731
    with spawn(pairs[0]) as s1, spawn(pairs[1]) as s2, \
            Servers([s1.url, s2.url], trust=[tls.Trust(pin=s1.pin), tls.Trust(pin=s2.pin)]) as servers:  # fmt: skip
        out.print(f"    S1 {s1.url} (pin {s1.pin[:23]}…), S2 {s2.url} (pin {s2.pin[:23]}…): TLS 1.3, each pinned by P3")
        out.print(f"[bold]P3[/] embeds {len(SENTENCES)} sentences, shares every matmul input between them, computes the rest …")
        p3 = SharesModel(src, servers)
        t0 = time.perf_counter()
        enc = p3.encode(SENTENCES)
        wall = time.perf_counter() - t0
        st = servers.stats
    shutil.rmtree(certs, ignore_errors=True)
    batch = p3.tokenizer(SENTENCES, padding=True, return_tensors="pt")
    with torch.no_grad():
        plain = p3.hf(**batch).last_hidden_state
    ref = torch.nn.functional.normalize(default.mean_pool(plain, batch["attention_mask"]), dim=-1)
    cos = float(torch.nn.functional.cosine_similarity(ref, enc.embedding).min())
    table = Table(title=f"Shares mode over loopback, TLS 1.3: {default.NAME}, {len(SENTENCES)} sentences", show_header=False)
    table.add_column("")
    table.add_column("", justify="right")
    for k, v in {"min cosine vs plaintext": f"{cos:.7f}", "end to end (P3 wall)": f"{wall * 1e3:.0f} ms",
                 "round trips (both servers at once)": str(st.rounds),
                 "bytes up / down, each server": f"{st.bytes_up[0]:,} / {st.bytes_down[0]:,}"}.items():  # fmt: skip
        table.add_row(k, v)
    out.print(table)
    ok = cos >= MIN_COSINE
    out.print(f"[green]lossless[/]: each server saw only uniform shares; embeddings match plaintext (cosine ≥ {MIN_COSINE})"
              if ok else "[red]MISMATCH[/]: shares mode disagrees with plaintext")  # fmt: skip
    return 0 if ok else 1


def minilm(out, err) -> int:
    from . import audit, seal
    from .client.api import Client
    from .models import default
    from .serve.process import ServerProcess

    src = default.path()
    with tempfile.TemporaryDirectory(prefix="stip-demo-") as tmp:
        tmp = Path(tmp)
        out.print(f"[bold]P1[/] seals {default.NAME} …")
        sealed = seal.seal_folder(src, tmp)
        out.print(f"    fingerprint {sealed.key.fingerprint}")
        violations = audit.audit(tmp, original=src)
        for v in violations:
            err.print(f"[bold red]VIOLATION[/] {v}", highlight=False, soft_wrap=True)
        out.print("    audit " + ("[green]passed[/]" if not violations else f"[red]failed: {len(violations)} violation(s)[/]"))
        del sealed  # P1 is done; the other two parties load only their own folders

        token = "demo-" + tmp.name
        (tmp / "token").write_text(token)
        out.print("[bold]P2[/] starts [italic]stip serve server/[/] on a free loopback port …")
        with ServerProcess(tmp / seal.SERVER, token_file=tmp / "token") as srv:
            out.print(f"    {srv.url}")
            out.print(f"[bold]P3[/] embeds {len(SENTENCES)} sentences locally and queries the cloud …")
            with Client(tmp / seal.CLIENT, srv.url, token=token) as client:
                client.encode(SENTENCES[:1])  # warm-up
                runs = []
                for _ in range(ROUNDS):
                    client.stats = type(client.stats)()
                    t0 = time.perf_counter()
                    enc = client.encode(SENTENCES)
                    wall = time.perf_counter() - t0
                    runs.append((wall, client.stats))

        plain_model = seal.load_source(src)
        batch = client.tokenizer(SENTENCES, padding=True, return_tensors="pt")
        with torch.no_grad():
            plain_model(**batch)  # warm-up
            times = []
            for _ in range(ROUNDS):
                t0 = time.perf_counter()
                plain = plain_model(**batch).last_hidden_state
                times.append(time.perf_counter() - t0)
        mask = batch["attention_mask"]
        e_plain = torch.nn.functional.normalize(default.mean_pool(plain, mask), dim=-1)
        cos = torch.nn.functional.cosine_similarity(e_plain, enc.embedding)
        keep = mask.bool()
        max_err = float((plain[keep] - enc.last_hidden_state[keep]).abs().max())

    med = lambda xs: statistics.median(xs)  # noqa: E731
    stats = [s for _, s in runs]
    table = Table(title=f"STIP over loopback: {default.NAME}, {len(SENTENCES)} sentences, median of {ROUNDS} runs", show_header=False)
    table.add_column("")
    table.add_column("", justify="right")
    rows = {
        "tokens": str(int(mask.sum())),
        "max |Δ| hidden state": f"{max_err:.1e}",
        "min cosine vs plaintext": f"{float(cos.min()):.7f}",
        "end to end (P3 wall)": f"{med([w for w, _ in runs]) * 1e3:.1f} ms",
        "cloud compute (P2)": f"{med([s.server_seconds for s in stats]) * 1e3:.1f} ms",
        "client: embed, permute, un-permute, pool": f"{med([s.client_seconds for s in stats]) * 1e3:.1f} ms",
        "bytes up / down": f"{stats[-1].bytes_up:,} / {stats[-1].bytes_down:,}",
        "plaintext forward, in process": f"{med(times) * 1e3:.1f} ms",
    }
    for k, v in rows.items():
        table.add_row(k, v)
    out.print(table)
    ok = not violations and float(cos.min()) >= MIN_COSINE
    if ok:
        out.print(f"[green]lossless[/]: every sentence embedding matches plaintext (cosine ≥ {MIN_COSINE})")
    else:
        out.print("[red]MISMATCH[/]: the sealed path disagrees with plaintext" + (" (audit failed)" if violations else ""))
    return 0 if ok else 1
