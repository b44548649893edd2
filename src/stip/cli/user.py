"""P3, the user: the OpenAI-compatible proxy, queries, generation, and the end-to-end demo."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

from . import app, embedded, err, fail, listen, out, plain_warning, read_token, server_tls, trusts


ROUNDS_HELP = ("Shares mode's schedule: 2 round trips per layer (norms folded into the servers' block weights; "
               "for distance) or 4 (half the servers' multiply-adds; for a fast LAN).")
PIN_HELP = "The server's certificate pin (sha256:…, as `stip tls-cert` prints it). With --shares: one per party, comma-separated in the order of --shares."
CA_HELP = "A CA file (PEM) that signed the server's certificate (host name checked); with --shares, for both parties."
INSECURE_HELP = "Allow plain HTTP/TCP to a non-loopback server (everything it carries in the clear)."
ADAPTER_HELP = ("Shares mode: a PEFT LoRA adapter folder (stip train lora) that P3 applies itself; "
                "the share servers multiply the public base and never see it.")


@app.command()
def proxy(
    client_dir: Path = typer.Argument(..., metavar="OUT/client|SRC", help="A sealing's client folder: token mode (vLLM upstream) or embedding mode (a `stip serve` upstream: LMs and encoders, /v1/embeddings); with --shares, the public model (a local HF folder, or smollm2)."),
    upstream: Optional[str] = typer.Option(None, "--upstream", help="The cloud's engine holding OUT/server: vLLM's OpenAI server (token mode) or `stip serve` (embedding mode), e.g. https://10.0.0.5:8000 (with --pin or --ca)"),
    shares: Optional[str] = typer.Option(None, "--shares", metavar="S1,S2", help="Shares mode instead: the two share servers' HOST:PORT (stip share-server), e.g. 10.0.0.5:7001,10.1.0.7:7001"),
    upstream_token_file: Optional[Path] = typer.Option(None, "--upstream-token-file", help="File holding the bearer token the engine expects (vLLM --api-key), or the share servers' token."),
    host: str = typer.Option("127.0.0.1", help="Address to bind; keep it on loopback: the proxy sees prompts in the clear."),
    port: int = typer.Option(8080, help="Port to bind; 0 picks a free one (printed on stdout)."),
    model_name: Optional[str] = typer.Option(None, "--model-name", help="The model id applications ask for (default: derived from the sealing)."),
    upstream_model: Optional[str] = typer.Option(None, "--upstream-model", help="The engine's served model name (default: stip-<fingerprint>, as `stip` starts vLLM)."),
    timeout: float = typer.Option(300.0, help="Seconds to wait for the engine before answering 504."),
    max_tokens_limit: Optional[int] = typer.Option(None, "--max-tokens-limit", min=1, help="Refuse requests for more new tokens than this (default: the model's context)."),
    rounds: int = typer.Option(2, "--rounds", min=2, max=4, help=ROUNDS_HELP),
    adapter: Optional[Path] = typer.Option(None, "--adapter", metavar="DIR", help=ADAPTER_HELP),
    prepare_tokens: int = typer.Option(0, "--prepare-tokens", min=0, help="Shares mode: keep masks for this many positions prepared with S1 in the background, so that requests mostly ask S2 alone (0: off)."),
    streams: int = typer.Option(8, "--streams", min=1, max=256, help="Shares mode and `stip serve` upstreams: requests at once (shares mode: each on its own pair of connections, opened when first needed); more wait."),
    pin: Optional[str] = typer.Option(None, "--pin", help=PIN_HELP.replace("server's", "upstream's")),
    ca: Optional[Path] = typer.Option(None, "--ca", help=CA_HELP),
    tls_cert: Optional[Path] = typer.Option(None, "--tls-cert", help="PEM certificate for the proxy's own HTTPS (stip tls-cert makes one), TLS 1.3 only."),
    tls_key: Optional[Path] = typer.Option(None, "--tls-key", help="PEM key of --tls-cert."),
    insecure: bool = typer.Option(False, "--insecure", help="Allow plain HTTP/TCP to a non-loopback upstream, and binding a non-loopback address without TLS."),
) -> None:
    """Run the user's side (P3) as a local OpenAI-compatible server.

    Point any OpenAI client at http://HOST:PORT/v1. Chat templates and tokenization run here.
    Token mode (--upstream): only token ids renamed by the secret π_c reach the engine, and
    the ids it returns are restored and detokenized here. Embedding mode (--upstream, a
    `stip serve`): rows are permuted here and the generation loop runs here. Shares mode (--shares): the proxy
    runs the public model itself, and each share server sees only additive shares of the
    weight-matmul inputs."""
    from .. import tls
    from ..client.bundle import InvalidBundle
    from ..client.bundle import TOKENS
    from ..client.proxy import Local, Sealed, Upstream, create_app
    from ..keys import InvalidKey

    if (upstream is None) == (shares is None):
        fail("give --upstream (token mode) or --shares (shares mode), not both")
    if adapter is not None and shares is None:
        fail("--adapter is for shares mode (--shares): in token mode, merge the adapter into the model before sealing")
    context = server_tls(host, tls_cert, tls_key, insecure)
    if not tls.is_loopback(host):
        err.print(f"[yellow]warning:[/] binding {host}: whoever reaches the proxy sends prompts through your key")
    token = read_token(upstream_token_file)
    try:
        if shares is not None:
            engine = _shares_engine(client_dir, shares, token, timeout, prepare_tokens, pin, ca, insecure, rounds, adapter, streams)
            api = create_app(engine.local(), engine, model_name=model_name, max_tokens_limit=max_tokens_limit)
        else:
            trust = (trusts(pin, ca) or [None])[0]
            plain_warning(upstream, insecure)
            local = Local.sealed(client_dir)
            if local.mode != TOKENS:  # an embedding-mode sealing: `stip serve` upstream; generation loops here
                from ..client.api import Client

                engine = Sealed(Client(client_dir, upstream, token=token, timeout=timeout, trust=trust, insecure=insecure), streams)
            else:
                engine = Upstream(upstream, token=token, timeout=timeout, model=upstream_model, trust=trust, insecure=insecure)
            api = create_app(local, engine, model_name=model_name, max_tokens_limit=max_tokens_limit)
    except (InvalidBundle, InvalidKey, OSError, ValueError) as e:
        fail(str(e))
    from contextlib import nullcontext

    from ..shares import one_thread

    with one_thread() if shares else nullcontext():
        listen(api, host, port, "proxy", f"model {api.state.model_name}, {'upstream ' + upstream if upstream else 'share servers ' + shares}", context)


def _shares_model(src: Path, shares: str, token: str | None, timeout: float = 120.0,
                  pin: str | None = None, ca: Path | None = None, insecure: bool = False, rounds: int = 2,
                  adapter: Path | None = None):  # fmt: skip
    """P3's side of shares mode: the public model here (with its private adapter, if any),
    connected to both share servers, each verified by its own pin (or the CA) before the
    hello carries the token."""
    from ..shares import Servers, SharesError, SharesModel

    if rounds not in (2, 4):
        fail("--rounds takes 2 or 4 (round trips per layer)")
    src = embedded(src)
    if adapter is not None and not adapter.is_dir():
        fail(f"--adapter {adapter} is not a folder")
    addresses = [a.strip() for a in shares.split(",") if a.strip()]
    trust = trusts(pin, ca, len(addresses))
    if insecure and trust is None:
        err.print("[yellow]warning:[/] --insecure: share servers off loopback are reached over plain TCP; whoever sees both links adds the shares up")
    try:
        servers = Servers(addresses, token=token, timeout=timeout, trust=trust, insecure=insecure)
    except (ValueError, ConnectionError, SharesError) as e:
        fail(str(e))
    try:
        model = SharesModel(src, servers, rounds, adapter)
    except (OSError, ValueError, SharesError) as e:
        servers.close()
        fail(str(e))
    if model.adapter is not None:
        a = model.adapter
        err.print(f"adapter {adapter}: LoRA on {', '.join(a.targets)}, {a.parameters:,} parameters, applied here (the share servers hold the base)",
                  highlight=False)  # fmt: skip
        if a.unused:
            err.print(f"[yellow]note:[/] the adapter also changes {', '.join(a.unused)}, which shares mode does not compute", highlight=False)
    return model


def _shares_engine(src: Path, shares: str, token: str | None, timeout: float, prepare_tokens: int,
                   pin: str | None, ca: Path | None, insecure: bool, rounds: int, adapter: Path | None = None, streams: int = 1):  # fmt: skip
    from ..shares.engine import SharesEngine

    return SharesEngine(_shares_model(src, shares, token, timeout, pin, ca, insecure, rounds, adapter), prepare_tokens, streams)


def _client(client_dir: Path, server: str, token_file: Path | None, pin: str | None, ca: Path | None, insecure: bool):
    from ..client.api import Client
    from ..client.bundle import InvalidBundle
    from ..keys import InvalidKey

    trust = (trusts(pin, ca) or [None])[0]
    plain_warning(server, insecure)
    try:
        return Client(client_dir, server, token=read_token(token_file), trust=trust, insecure=insecure)
    except (InvalidBundle, InvalidKey, OSError, ValueError) as e:
        fail(str(e))


def _run_client(fn):
    """Call the server; turn its refusals and transport failures into one clear line."""
    import httpx

    from ..client.api import KeyMismatch, ServerError

    try:
        return fn()
    except ServerError as e:
        fail(str(e))
    except KeyMismatch as e:
        fail(str(e))
    except httpx.TransportError as e:
        fail(f"cannot reach the server: {e}")
    except (ValueError, OSError) as e:
        fail(str(e))


@app.command()
def query(
    client_dir: Path = typer.Argument(..., metavar="OUT/client", help="The client folder P1 handed over."),
    items: list[str] = typer.Argument(..., metavar="TEXT...|IMAGE...", help="Texts, or image files for vision models."),
    server: Optional[str] = typer.Option(None, "--server", help="The cloud's URL, e.g. https://10.0.0.5:8000 (with --pin or --ca; http:// on loopback only)"),
    shares: Optional[str] = typer.Option(None, "--shares", metavar="S1,S2", help="Shares mode instead: OUT/client is then the public model (or minilm), S1,S2 the share servers' HOST:PORT."),
    token_file: Optional[Path] = typer.Option(None, "--token-file", help="File holding the bearer token."),
    pin: Optional[str] = typer.Option(None, "--pin", help=PIN_HELP),
    ca: Optional[Path] = typer.Option(None, "--ca", help=CA_HELP),
    insecure: bool = typer.Option(False, "--insecure", help=INSECURE_HELP),
    rounds: int = typer.Option(2, "--rounds", min=2, max=4, help=ROUNDS_HELP),
    adapter: Optional[Path] = typer.Option(None, "--adapter", metavar="DIR", help=ADAPTER_HELP),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Query a sealed model as the user (P3): embed and permute locally, send, un-permute.

    Encoders give hidden states and a sentence embedding; classifiers give logits and labels.
    With --shares, encoders only: each share server sees additive shares of the matmul inputs."""
    import json

    if (server is None) == (shares is None):
        fail("give --server (STIP) or --shares (shares mode), not both")
    if adapter is not None and shares is None:
        fail("--adapter is for shares mode (--shares)")
    if shares is not None:
        _query_shares(client_dir, items, shares, read_token(token_file), as_json, pin, ca, insecure, rounds, adapter)
        return
    c = _client(client_dir, server, token_file, pin, ca, insecure)
    with c:
        info = _run_client(c.info)
        if info["causal"]:
            fail("this is a causal language model: use `stip generate`")
        if "logits" in info["outputs"]:
            r = _run_client(lambda: c.classify(items))
            if as_json:
                print(json.dumps({"logits": r.logits.tolist(), "label": r.labels}))
                return
            for item, label in zip(items, r.labels):
                out.print(f"{label}\t{item}", highlight=False, soft_wrap=True)
        else:
            _show_encoding(items, _run_client(lambda: c.encode(items)), as_json)
            if as_json:
                return
        s = c.stats
        err.print(f"{s.requests} request(s), {s.bytes_up} B up, {s.bytes_down} B down, cloud {s.server_seconds * 1e3:.1f} ms, client {s.client_seconds * 1e3:.1f} ms")


def _show_encoding(items: list[str], r, as_json: bool) -> None:
    """An encoder's answer (STIP's or shares mode's): one JSON object, or a line per text."""
    import json

    lengths = r.attention_mask.sum(1).tolist()
    if as_json:
        hidden = [h[:n].tolist() for h, n in zip(r.last_hidden_state, lengths)]
        print(json.dumps({"last_hidden_state": hidden, "embedding": r.embedding.tolist()}))
        return
    for item, e, n in zip(items, r.embedding, lengths):
        head = ", ".join(f"{v:+.4f}" for v in e[:4].tolist())
        out.print(f"{n:>4} tokens  [{head}, …] ({e.numel()} dims)  {item}", highlight=False, soft_wrap=True)


def _stats_line(st) -> str:
    return (f"{st.rounds} round trips; S1 {st.bytes_up[0]:,} B up, {st.bytes_down[0]:,} B down; S2 {st.bytes_up[1]:,} B up, "
            f"{st.bytes_down[1]:,} B down; waiting {st.wait_seconds * 1e3:.0f} ms")


def _query_shares(src: Path, texts: list[str], shares: str, token: str | None, as_json: bool,
                  pin: str | None, ca: Path | None, insecure: bool, rounds: int = 2, adapter: Path | None = None) -> None:  # fmt: skip
    from ..shares import SharesError, one_thread

    m = _shares_model(src, shares, token, pin=pin, ca=ca, insecure=insecure, rounds=rounds, adapter=adapter)
    with m.servers, one_thread():
        try:
            r = m.encode(texts)
        except (SharesError, ConnectionError, ValueError) as e:
            fail(str(e))
        _show_encoding(texts, r, as_json)
        err.print(_stats_line(m.servers.stats))


@app.command()
def generate(
    client_dir: Path = typer.Argument(..., metavar="OUT/client", help="The client folder P1 handed over."),
    prompt: Optional[str] = typer.Argument(None, help="The prompt text."),
    server: Optional[str] = typer.Option(None, "--server", help="The cloud's URL, e.g. https://10.0.0.5:8000 (with --pin or --ca; http:// on loopback only)"),
    shares: Optional[str] = typer.Option(None, "--shares", metavar="S1,S2", help="Shares mode instead: OUT/client is then the public model (or smollm2), S1,S2 the share servers' HOST:PORT."),
    token_file: Optional[Path] = typer.Option(None, "--token-file", help="File holding the bearer token."),
    max_new_tokens: int = typer.Option(32, "--max-new-tokens", min=1),
    greedy: bool = typer.Option(False, "--greedy", help="Pick the most likely token (the default unless a sampling option is given)."),
    temperature: Optional[float] = typer.Option(None, "--temperature", help="Sample with this temperature."),
    top_p: Optional[float] = typer.Option(None, "--top-p", help="Sample from the smallest set with this much probability."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed for sampling, for repeatable output."),
    ids: Optional[str] = typer.Option(None, "--ids", help="Comma-separated prompt token ids instead of text (models without a tokenizer)."),
    pin: Optional[str] = typer.Option(None, "--pin", help=PIN_HELP),
    ca: Optional[Path] = typer.Option(None, "--ca", help=CA_HELP),
    insecure: bool = typer.Option(False, "--insecure", help=INSECURE_HELP),
    rounds: int = typer.Option(2, "--rounds", min=2, max=4, help=ROUNDS_HELP),
    adapter: Optional[Path] = typer.Option(None, "--adapter", metavar="DIR", help=ADAPTER_HELP),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Generate text from a sealed causal LM as the user (P3), one round trip per token;
    sampling happens locally, the KV cache stays in the cloud. With --shares: P3 runs the
    public model with the share servers (2 round trips per layer, --rounds), KV cache here."""
    import json

    sampled = any(v is not None for v in (temperature, top_p, seed))
    if greedy and sampled:
        fail("--greedy cannot be combined with --temperature, --top-p or --seed")
    if (prompt is None) == (ids is None):
        fail("give a PROMPT or --ids, not both")
    try:
        prompt_in = [int(t) for t in ids.split(",")] if ids is not None else prompt
    except ValueError:
        fail("--ids takes comma-separated integers")
    if (server is None) == (shares is None):
        fail("give --server (STIP) or --shares (shares mode), not both")
    if adapter is not None and shares is None:
        fail("--adapter is for shares mode (--shares)")
    from ..client.generation import Sampling

    try:  # temperature 0: greedy, the default
        sampling = Sampling((temperature if temperature is not None else 1.0) if sampled else 0.0,
                            top_p if top_p is not None else 1.0, seed)  # fmt: skip
    except ValueError as e:
        fail(str(e))
    if shares is not None:
        _generate_shares(client_dir, prompt_in, shares, read_token(token_file), max_new_tokens, sampling, as_json, pin, ca, insecure,
                         rounds, adapter)  # fmt: skip
        return
    c = _client(client_dir, server, token_file, pin, ca, insecure)
    with c:
        r = _run_client(lambda: c.generate(prompt_in, max_new_tokens, sampling))
        if as_json:
            print(json.dumps({"text": r.text, "token_ids": r.token_ids}))
        else:
            out.print(r.text if r.text is not None else " ".join(map(str, r.token_ids)), highlight=False, soft_wrap=True)
        s = c.stats
        err.print(f"{len(r.token_ids)} tokens, {s.requests} round trips, {s.bytes_up} B up, {s.bytes_down} B down")


def _generate_shares(src, prompt, shares, token, max_new_tokens, sampling, as_json, pin, ca, insecure, rounds=2, adapter=None) -> None:
    import json

    from ..shares import SharesError, one_thread

    m = _shares_model(src, shares, token, pin=pin, ca=ca, insecure=insecure, rounds=rounds, adapter=adapter)
    with m.servers, one_thread():
        try:
            g = m.generate(prompt, max_new_tokens, sampling)
        except (SharesError, ConnectionError, ValueError) as e:
            fail(str(e))
        text = g.text
        if as_json:
            print(json.dumps({"text": text, "token_ids": g.token_ids}))
        else:
            out.print(text if text is not None else " ".join(map(str, g.token_ids)), highlight=False, soft_wrap=True)
        err.print(f"{len(g.token_ids)} tokens; " + _stats_line(m.servers.stats))


@app.command()
def demo(
    chat: bool = typer.Option(True, "--chat/--no-chat", help="Also run the chat step (needs vLLM: `make vllm`)."),
) -> None:
    """The three parties end to end. MiniLM: seal, audit, serve with `stip serve`, query, and
    compare with the plaintext sentence embeddings. Chat: seal SmolLM2 in token mode, serve it
    with vLLM, ask through `stip proxy` with the openai client, and compare with plaintext
    generation."""
    from ..demo import run

    sys.exit(run(out, err, chat=chat))
