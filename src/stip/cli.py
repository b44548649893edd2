"""The ``stip`` command line. Thin: parses arguments, calls the modules, reports."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Optional

# Nothing is ever fetched from a hub at run time.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Secure transformer inference. P1 seals a model (seal, audit); P2 serves it; P3 queries it.",
)
err = Console(stderr=True)
out = Console()


def fail(message: str, code: int = 1) -> None:
    err.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


@app.command()
def seal(
    src: Optional[Path] = typer.Argument(None, help="Local Hugging Face model folder (config.json + weights), or minilm / smollm2."),
    out_dir: Optional[Path] = typer.Argument(None, metavar="OUT", help="Folder to write server/, client/ and provider/ into."),
    default: Optional[Path] = typer.Option(None, "--default", metavar="OUT", help="Seal the embedded default model (all-MiniLM-L6-v2) into OUT."),
    chat: Optional[Path] = typer.Option(None, "--chat", metavar="OUT", help="Seal the embedded chat model (SmolLM2-135M-Instruct) into OUT; token mode unless --mode says otherwise."),
    mode: Optional[str] = typer.Option(None, "--mode", help="embeddings (default: P3 embeds, sends rows permuted by π) or tokens (causal LMs: P2 embeds ids renamed by π_c, so vLLM can serve it)."),
    force: bool = typer.Option(False, "--force", help="Replace an existing, non-empty OUT."),
    public_base: Optional[Path] = typer.Option(None, "--public-base", metavar="DIR", help="A public checkpoint this model derives from: warn if the cloud could use it to attack (docs/threat-model.md)."),
) -> None:
    """Draw a secret key and seal a model (P1).

    Writes OUT/server (a plain HF checkpoint for the cloud, no secrets), OUT/client (what the
    user needs: tokenizer or image processor, embedding weights, π and π_c) and OUT/provider
    (the full key, keep it private). Prints the key fingerprint.
    """
    from .client.bundle import MODES, TOKENS
    from .models import chat as chat_model
    from .models import default as default_model
    from .seal import EMBEDDINGS, UnsupportedModel, seal_folder

    if mode is not None and mode not in MODES:
        fail(f"--mode is one of {', '.join(MODES)}, not {mode!r}")
    src = _embedded(src)
    given = [x for x in (default, chat) if x is not None]
    if len(given) > 1 or (given and (src is not None or out_dir is not None)):
        fail("give one of SRC OUT, --default OUT or --chat OUT")
    if default is not None:
        src, out_dir = default_model.path(), default
    elif chat is not None:
        try:
            with err.status("preparing the chat model (converted from GGUF once, ~40 s) …"):
                src, out_dir = chat_model.path(), chat
        except (RuntimeError, OSError) as e:
            fail(str(e))
        mode = mode or TOKENS
    elif src is None or out_dir is None:
        fail("usage: stip seal SRC OUT  |  stip seal --default OUT  |  stip seal --chat OUT")

    try:
        if public_base is not None:
            _warn_public_base(src, public_base)
        from transformers import AutoConfig

        if not (src / "config.json").is_file():
            raise FileNotFoundError(f"{src} is not a local Hugging Face model folder (no config.json)")
        cfg = AutoConfig.from_pretrained(src, local_files_only=True)
        steps = (getattr(cfg, "num_hidden_layers", None) or sum(getattr(cfg, "depths", None) or [0])) + 3
        columns = (TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"), TimeElapsedColumn())
        with Progress(*columns, console=err) as progress:
            task = progress.add_task(f"sealing {src.name}", total=steps)

            def step(what: str) -> None:
                progress.update(task, advance=1, description=f"sealing: {what}")

            sealed = seal_folder(src, out_dir, mode=mode or EMBEDDINGS, step=step, force=force)
    except (FileNotFoundError, FileExistsError, UnsupportedModel, ValueError, OSError) as e:
        fail(str(e))
    out.print(f"sealed [bold]{sealed.key.model['architecture']}[/] into {out_dir} ({sealed.client.mode} mode)")
    out.print("  server/   → the cloud (P2)\n  client/   → the user (P3), out of band\n  provider/ → keep private")
    out.print(f"fingerprint {sealed.key.fingerprint}")


def _warn_public_base(src: Path, base: Path) -> None:
    from .attacks import exposure
    from .seal import load_source

    report = exposure.compare(load_source(src), load_source(base))
    found = exposure.warnings(report)
    for w in found:
        err.print(f"[bold red]WARNING — STIP does not protect this deployment:[/] {w}", highlight=False, soft_wrap=True)
    if found:
        err.print("[bold red]Mitigations:[/] keep the embedding table private (fine-tune or re-initialise it) and the "
                  "weights far from the public base; see docs/threat-model.md.")
    else:
        err.print(f"checked against {base}: {len(report['identical'])} identical and {len(report['near'])} near tensors, "
                  "embedding table not public")


@app.command()
def rekey(
    sealed_dir: Path = typer.Argument(..., metavar="OUT", help="A folder written by `stip seal` (with provider/)."),
    new_dir: Path = typer.Argument(..., metavar="NEW", help="Folder for the re-keyed server/, client/ and provider/."),
    force: bool = typer.Option(False, "--force", help="Replace an existing, non-empty NEW."),
) -> None:
    """Re-key a sealed model from its provider key alone (P1): a fresh key composed with the old
    one, for key rotation or one key per user. The old client key no longer decrypts anything."""
    from .keys import InvalidKey
    from .seal import rekey as run_rekey
    from .serve.engine import NotSealed

    try:
        with err.status(f"re-keying {sealed_dir} …"):
            sealed = run_rekey(sealed_dir, new_dir, force=force)
    except (FileNotFoundError, FileExistsError, InvalidKey, NotSealed, ValueError, OSError) as e:
        fail(str(e))
    out.print(f"re-keyed into {new_dir}; fingerprint {sealed.key.fingerprint}")


@app.command()
def audit(
    out_dir: Path = typer.Argument(..., metavar="OUT", help="A folder written by `stip seal`."),
    original: Optional[Path] = typer.Option(None, "--original", metavar="SRC", help="The unsealed model folder: also check that no server tensor equals its original."),
) -> None:
    """Check a sealing for leaks: permutations on the server, layer weights on the client,
    embedding tables on the server, unsealed tensors. Exits 1 naming each violation."""
    from .audit import audit as run_audit

    if not out_dir.is_dir():
        fail(f"{out_dir} is not a folder")
    try:
        violations = run_audit(out_dir, original)
    except (FileNotFoundError, ValueError, OSError) as e:
        fail(str(e))
    if violations:
        for v in violations:
            err.print(f"[bold red]VIOLATION[/] {v}", highlight=False, soft_wrap=True)
        err.print(f"audit failed: {len(violations)} violation(s) in {out_dir}")
        raise typer.Exit(1)
    checked = "server/, client/, provider/" + (f", against {original}" if original else "")
    out.print(f"[green]audit passed[/]: {checked}")


def _read_token(path: Path | None) -> str | None:
    if path is None:
        return None
    try:
        token = path.read_text().strip()
    except OSError as e:
        fail(f"cannot read token file {path}: {e.strerror or e}")
    if not token:
        fail(f"token file {path} is empty")
    return token


@app.command()
def serve(
    server_dir: Path = typer.Argument(..., metavar="OUT/server", help="The sealed checkpoint folder (never client/ or provider/)."),
    host: str = typer.Option("127.0.0.1", help="Address to bind."),
    port: int = typer.Option(8000, help="Port to bind; 0 picks a free one (printed on stdout)."),
    token_file: Optional[Path] = typer.Option(None, "--token-file", help="File holding the bearer token clients must send."),
    max_batch: int = typer.Option(32, help="Largest batch accepted."),
    max_tokens: Optional[int] = typer.Option(None, help="Longest sequence accepted (default: the model's position limit)."),
    max_body_mb: float = typer.Option(64.0, help="Largest request body, in MiB."),
    max_sessions: int = typer.Option(64, help="Generation sessions open at once."),
    session_idle: float = typer.Option(300.0, help="Seconds after which an idle session expires."),
) -> None:
    """Serve a sealed checkpoint (P2): permuted embeddings in, permuted outputs out.

    For a token-mode sealing of a chat model, serve OUT/server with vLLM instead
    (docs/deploy.md) and run `stip proxy` on the user's side."""
    from .serve.app import Limits, create_app
    from .serve.engine import NotSealed

    token = _read_token(token_file)
    if token is None and host not in ("127.0.0.1", "localhost", "::1"):
        err.print(f"[yellow]warning:[/] serving on {host} without --token-file: anyone who reaches it can query the model")
    limits = Limits(
        max_body_bytes=int(max_body_mb * (1 << 20)),
        max_batch=max_batch,
        max_tokens=max_tokens,
        max_sessions=max_sessions,
        session_idle_seconds=session_idle,
    )
    try:
        api = create_app(server_dir, token=token, limits=limits)
    except (NotSealed, OSError, ValueError) as e:
        fail(str(e))
    model = api.state.model
    _listen(api, host, port, "serve", f"{type(model).__name__}, fingerprint {model.config.stip['fingerprint'][:16]}…")


def _listen(api, host: str, port: int, command: str, what: str) -> None:
    """Bind (port 0: a free one), print the ready line with the URL, serve until stopped."""
    import socket

    import uvicorn

    from .serve.process import ready_line

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        fail(f"cannot bind {host}:{port}: {e.strerror or e}")
    sock.listen(128)
    print(f"{ready_line(command)}http://{host}:{sock.getsockname()[1]} ({what})", flush=True)
    uvicorn.Server(uvicorn.Config(api, log_level="warning", access_log=False)).run(sockets=[sock])


@app.command()
def proxy(
    client_dir: Path = typer.Argument(..., metavar="OUT/client", help="The client folder of a token-mode sealing (stip seal --mode tokens)."),
    upstream: str = typer.Option(..., "--upstream", help="The cloud's engine: vLLM's OpenAI server holding OUT/server, e.g. http://10.0.0.5:8000"),
    upstream_token_file: Optional[Path] = typer.Option(None, "--upstream-token-file", help="File holding the bearer token the engine expects (vLLM --api-key)."),
    host: str = typer.Option("127.0.0.1", help="Address to bind; keep it on loopback: the proxy sees prompts in the clear."),
    port: int = typer.Option(8080, help="Port to bind; 0 picks a free one (printed on stdout)."),
    model_name: Optional[str] = typer.Option(None, "--model-name", help="The model id applications ask for (default: derived from the sealing)."),
    upstream_model: Optional[str] = typer.Option(None, "--upstream-model", help="The engine's served model name (default: stip-<fingerprint>, as `stip` starts vLLM)."),
    timeout: float = typer.Option(300.0, help="Seconds to wait for the engine before answering 504."),
    max_tokens_limit: Optional[int] = typer.Option(None, "--max-tokens-limit", min=1, help="Refuse requests for more new tokens than this (default: the model's context)."),
) -> None:
    """Run the user's side (P3) as a local OpenAI-compatible server.

    Point any OpenAI client at http://HOST:PORT/v1. Chat templates and tokenization run here;
    only token ids renamed by the secret π_c reach the engine, and the ids it returns are
    restored and detokenized here."""
    from .client.bundle import InvalidBundle
    from .client.proxy import Upstream, create_app
    from .keys import InvalidKey

    if host not in ("127.0.0.1", "localhost", "::1"):
        err.print(f"[yellow]warning:[/] binding {host}: whoever reaches the proxy sends prompts through your key")
    try:
        up = Upstream(upstream, token=_read_token(upstream_token_file), timeout=timeout, model=upstream_model)
        api = create_app(client_dir, up, model_name=model_name, max_tokens_limit=max_tokens_limit)
    except (InvalidBundle, InvalidKey, OSError, ValueError) as e:
        fail(str(e))
    _listen(api, host, port, "proxy", f"model {api.state.model_name}, upstream {upstream}")


def _client(client_dir: Path, server: str, token_file: Path | None):
    from .client.api import Client
    from .client.bundle import InvalidBundle
    from .keys import InvalidKey

    try:
        return Client(client_dir, server, token=_read_token(token_file))
    except (InvalidBundle, InvalidKey, OSError, ValueError) as e:
        fail(str(e))


def _run_client(fn):
    """Call the server; turn its refusals and transport failures into one clear line."""
    import httpx

    from .client.api import KeyMismatch, ServerError

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
    server: str = typer.Option(..., "--server", help="The cloud's URL, e.g. http://127.0.0.1:8000"),
    token_file: Optional[Path] = typer.Option(None, "--token-file", help="File holding the bearer token."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Query a sealed model as the user (P3): embed and permute locally, send, un-permute.

    Encoders give hidden states and a sentence embedding; classifiers give logits and labels."""
    import json

    c = _client(client_dir, server, token_file)
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
            r = _run_client(lambda: c.encode(items))
            if as_json:
                lengths = r.attention_mask.sum(1).tolist()
                hidden = [h[:n].tolist() for h, n in zip(r.last_hidden_state, lengths)]
                print(json.dumps({"last_hidden_state": hidden, "embedding": r.embedding.tolist()}))
                return
            for item, e, n in zip(items, r.embedding, r.attention_mask.sum(1).tolist()):
                head = ", ".join(f"{v:+.4f}" for v in e[:4].tolist())
                out.print(f"{n:>4} tokens  [{head}, …] ({e.numel()} dims)  {item}", highlight=False, soft_wrap=True)
        s = c.stats
        err.print(f"{s.requests} request(s), {s.bytes_up} B up, {s.bytes_down} B down, cloud {s.server_seconds * 1e3:.1f} ms, client {s.client_seconds * 1e3:.1f} ms")


@app.command()
def generate(
    client_dir: Path = typer.Argument(..., metavar="OUT/client", help="The client folder P1 handed over."),
    prompt: Optional[str] = typer.Argument(None, help="The prompt text."),
    server: str = typer.Option(..., "--server", help="The cloud's URL."),
    token_file: Optional[Path] = typer.Option(None, "--token-file", help="File holding the bearer token."),
    max_new_tokens: int = typer.Option(32, "--max-new-tokens", min=1),
    greedy: bool = typer.Option(False, "--greedy", help="Pick the most likely token (the default unless a sampling option is given)."),
    temperature: Optional[float] = typer.Option(None, "--temperature", help="Sample with this temperature."),
    top_p: Optional[float] = typer.Option(None, "--top-p", help="Sample from the smallest set with this much probability."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed for sampling, for repeatable output."),
    ids: Optional[str] = typer.Option(None, "--ids", help="Comma-separated prompt token ids instead of text (models without a tokenizer)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Generate text from a sealed causal LM as the user (P3), one round trip per token;
    sampling happens locally, the KV cache stays in the cloud."""
    import json

    sampling = any(v is not None for v in (temperature, top_p, seed))
    if greedy and sampling:
        fail("--greedy cannot be combined with --temperature, --top-p or --seed")
    if (prompt is None) == (ids is None):
        fail("give a PROMPT or --ids, not both")
    try:
        prompt_in = [int(t) for t in ids.split(",")] if ids is not None else prompt
    except ValueError:
        fail("--ids takes comma-separated integers")
    c = _client(client_dir, server, token_file)
    with c:
        r = _run_client(
            lambda: c.generate(
                prompt_in,
                max_new_tokens,
                greedy=not sampling,
                temperature=temperature if temperature is not None else 1.0,
                top_p=top_p if top_p is not None else 1.0,
                seed=seed,
            )
        )
        if as_json:
            print(json.dumps({"text": r.text, "token_ids": r.token_ids}))
        else:
            out.print(r.text if r.text is not None else " ".join(map(str, r.token_ids)), highlight=False, soft_wrap=True)
        s = c.stats
        err.print(f"{len(r.token_ids)} tokens, {s.requests} round trips, {s.bytes_up} B up, {s.bytes_down} B down")


mpc_app = typer.Typer(no_args_is_help=True, help="The two-party MPC baseline on SecretFlow SPU.")
app.add_typer(mpc_app, name="mpc")


@mpc_app.command("run")
def mpc_run(
    model: Optional[Path] = typer.Option(None, "--model", metavar="SRC", help="Local HF model folder, or a `stip train mpcvit` folder (default: the embedded MiniLM)."),
    protocol: str = typer.Option("semi2k", "--protocol", help="semi2k | cheetah | aby3 (aby3: simulation only)."),
    parties: str = typer.Option("sim", "--parties", help="sim: one process; procs: one OS process per party over TCP."),
    tokens: int = typer.Option(32, "--tokens", min=1, help="Input length (vision models: fixed by the image size)."),
    layers: Optional[int] = typer.Option(None, "--layers", min=1, help="Run only the first K layers."),
    network: str = typer.Option("none", "--network", help="none | lan (1 Gbit/s, 0.1 ms) | wan (100 Mbit/s, 40 ms); procs only."),
    seed: int = typer.Option(0, "--seed", help="Seed for the random input tokens."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Run the model's forward under 2PC (the user's embeddings and the owner's weights are
    both secret; only the user learns the output) and report wall time, bytes sent per party,
    send actions (the rounds proxy) and max error against plaintext."""
    import json

    from .models import default as default_model
    from .mpc import netem
    from .mpc.job import Job, run
    from .mpc.runner import PROTOCOLS

    if protocol not in PROTOCOLS:
        fail(f"--protocol must be one of {', '.join(PROTOCOLS)}")
    if parties not in ("sim", "procs"):
        fail("--parties must be sim or procs")
    if network not in ("none", *netem.PROFILES):
        fail(f"--network must be none, {', '.join(netem.PROFILES)}")
    if parties == "procs" and protocol == "aby3":
        fail("real-party runs are two-party: use semi2k or cheetah")
    job = Job(model=model or default_model.path(), protocol=protocol, parties=parties, tokens=tokens, layers=layers, network=network, seed=seed)
    try:
        with err.status(f"running {protocol} ({parties}) …"):
            report, extras = run(job)
    except netem.Unavailable as e:
        fail(f"network emulation is not available here: {e}")
    except (FileNotFoundError, ValueError, RuntimeError, TimeoutError) as e:
        fail(str(e))
    if as_json:
        print(json.dumps({**report.to_json(), **extras}))
        return
    from rich.table import Table

    t = Table(title=f"{protocol.upper()} {parties}, {extras['model_type']}, {extras['tokens']} tokens, {extras['layers']} layers", show_header=False)
    t.add_column("")
    t.add_column("", justify="right")
    t.add_row("wall time", f"{report.seconds:.3f} s")
    for rank, (b, a) in enumerate(zip(report.bytes_sent, report.send_actions)):
        t.add_row(f"party {rank}: bytes sent / send actions", f"{b:,} / {a:,}" if b is not None else "not profiled")
    t.add_row("max abs error vs plaintext", f"{report.max_abs_error:.2e}")
    t.add_row("fixed point", f"FM{report.field_bits}, {report.fraction_bits} fraction bits")
    for name, seconds in extras["estimates"].items():
        p = netem.PROFILES[name]
        t.add_row(f"estimate on {name} ({p.mbit_per_s:g} Mbit/s, {p.one_way_ms} ms)", f"{seconds:.2f} s")
    out.print(t)
    for note in report.notes + extras.get("network_applied", []) + [extras.get("network_note", "")]:
        if note:
            out.print(f"note: {note}", highlight=False)


train_app = typer.Typer(no_args_is_help=True, help="Train the baselines' MPC- and HE-friendly models.")
app.add_typer(train_app, name="train")


def _stage_progress():
    """A rich progress display and a tick(stage, step, total, info) callback feeding it."""
    progress = Progress(TextColumn("{task.description:<10}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                        TextColumn("{task.fields[info]}"), TimeElapsedColumn(), console=err)
    tasks: dict = {}

    def tick(stage: str, step: int, total: int, info: str) -> None:
        if stage not in tasks:
            tasks[stage] = progress.add_task(stage, total=total, info="")
        progress.update(tasks[stage], completed=step, total=total, info=info)

    return progress, tick


@train_app.command("mpcvit")
def train_mpcvit(
    out_dir: Path = typer.Argument(..., metavar="OUT", help="Run folder: checkpoints, model.safetensors, summary.json. Re-run to resume."),
    dataset: str = typer.Option("digits", "--dataset", help="digits (bundled) | cifar10 | cifar100 | tiny-imagenet (local files)."),
    data_dir: Optional[Path] = typer.Option(None, "--data-dir", help="Folder holding cifar-10-batches-py/, cifar-100-python/ or tiny-imagenet-200/."),
    preset: str = typer.Option("digits", "--preset", help="digits | vit-7-4-32 (CIFAR) | vit-9-12-64 (Tiny-ImageNet)."),
    mu: float = typer.Option(0.3, "--mu", min=0.0, max=1.0, help="Fraction of attention units kept as ReLU-softmax; the rest become scaling."),
    granularity: str = typer.Option("head", "--granularity", help="One α per head | layer | row (query row of a head)."),
    lam: float = typer.Option(1e-5, "--lambda", help="L1 weight on α during the search."),
    latency_weights: str = typer.Option("measured", "--latency-weights", help="measured (SPU costs of each attention kind) | uniform."),
    linear_gelu: bool = typer.Option(False, "--linear-gelu", help="MPCViT+: also search GELU vs identity per token in the MLPs."),
    distill: bool = typer.Option(True, "--distill/--no-distill", help="Retrain with self-distillation from the softmax teacher (KL + feature MSE + CE), or CE only."),
    teacher_epochs: int = typer.Option(60, "--teacher-epochs", min=0),
    search_epochs: int = typer.Option(5, "--search-epochs", min=0),
    distill_epochs: int = typer.Option(15, "--distill-epochs", min=0),
    batch_size: int = typer.Option(64, "--batch-size", min=1),
    lr: float = typer.Option(2e-3, "--lr"),
    seed: int = typer.Option(0, "--seed"),
    force: bool = typer.Option(False, "--force", help="Start over in an OUT that holds a run with other settings."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as one JSON object."),
) -> None:
    """Train an MPC-friendly ViT (MPCViT): (a) a softmax teacher, (b) a differentiable search
    over ReLU-softmax vs scaling attention with a latency-weighted L1 penalty, (c) binarise
    under the budget μ, (d) retrain with self-distillation. Writes a checkpoint every epoch;
    running the same command again resumes. `stip mpc run --model OUT` runs the result under SPU."""
    import json

    from .models.data import DatasetMissing
    from .models.mpcvit import Recipe
    from .models.mpcvit import train_mpcvit as run
    from .models.train import RunMismatch

    recipe = Recipe(dataset=dataset, data_dir=str(data_dir) if data_dir else None, preset=preset, linear_gelu=linear_gelu,
                    granularity=granularity, mu=mu, lam=lam, latency_weights=latency_weights, distill=distill,
                    teacher_epochs=teacher_epochs, search_epochs=search_epochs, distill_epochs=distill_epochs,
                    batch_size=batch_size, lr=lr, seed=seed)
    progress, tick = _stage_progress()
    try:
        with progress:
            summary = run(recipe, out_dir, tick, force=force)
    except (DatasetMissing, RunMismatch, ValueError) as e:
        fail(str(e))
    if as_json:
        print(json.dumps(summary))
        return
    from rich.table import Table

    t = Table(title=f"MPCViT {preset} on {dataset}, μ={mu}, {granularity} granularity", show_header=False)
    t.add_column("")
    t.add_column("", justify="right")
    for key, label in (("teacher_accuracy", "softmax teacher"), ("search_accuracy", "searched (α mixed)"),
                       ("binarized_accuracy", "binarised, before retraining"), ("accuracy", "final (distilled)" if distill else "final (CE only)")):
        t.add_row(label, f"{100 * summary[key]:.2f} %")
    t.add_row("attention units: ReLU-softmax / scaling", f"{summary['head_kinds']['relu_softmax']} / {summary['head_kinds']['scaling']}")
    out.print(t)
    out.print(f"model: {out_dir / 'model.safetensors'}   (stip mpc run --model {out_dir})", highlight=False)


@train_app.command("polyformer")
def train_polyformer(
    out_dir: Path = typer.Argument(..., metavar="OUT", help="Run folder: checkpoints, model.safetensors, summary.json. Re-run to resume."),
    preset: str = typer.Option("digits", "--preset", help="digits | tiny."),
    dataset: str = typer.Option("digits", "--dataset", help="digits (bundled) | cifar10 | cifar100 | tiny-imagenet (local files)."),
    data_dir: Optional[Path] = typer.Option(None, "--data-dir"),
    epochs: int = typer.Option(40, "--epochs", min=0),
    degree: int = typer.Option(4, "--degree", min=1, help="Degree of the fitted polynomials (4 needs N=16384 under CKKS; 2 fits N=8192)."),
    method: str = typer.Option("lsq", "--fit", help="lsq | minimax, over the range each activation took on the training set."),
    seed: int = typer.Option(0, "--seed"),
    force: bool = typer.Option(False, "--force"),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as one JSON object."),
) -> None:
    """Train the polynomial ViT (Zimerman et al.): pointwise attention scaled by 1/√L,
    BatchNorm, range and variance penalties; then swap fitted polynomials in for the
    activations and report accuracy before and after. `stip he run --model OUT` runs it under CKKS."""
    import json

    from .models.data import DatasetMissing
    from .models.polyformer import train_polyformer as run
    from .models.train import RunMismatch

    progress, tick = _stage_progress()
    try:
        with progress:
            summary = run(out_dir, preset, dataset, data_dir, epochs, degree, method, seed=seed, tick=tick, force=force)
    except (DatasetMissing, RunMismatch, ValueError) as e:
        fail(str(e))
    if as_json:
        print(json.dumps(summary))
        return
    out.print(f"accuracy with GELU: {100 * summary['twin_accuracy']:.2f} %   with degree-{degree} polynomials: "
              f"{100 * summary['polynomial_accuracy']:.2f} %   model: {out_dir / 'model.safetensors'}", highlight=False)


he_app = typer.Typer(no_args_is_help=True, help="The homomorphic-encryption baseline (CKKS, TenSEAL).")
app.add_typer(he_app, name="he")


@he_app.command("run")
def he_run(
    model: Path = typer.Option(..., "--model", metavar="OUT", help="A `stip train polyformer` folder or its model.safetensors."),
    images: int = typer.Option(16, "--images", min=1, help="Test images to encrypt, packed in one batch's slots."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Encrypted inference: the user encrypts image patches under CKKS, the server computes the
    polynomial ViT on ciphertexts with its plaintext weights (client-aided refresh when depth
    runs out), the user decrypts. Reports time, ciphertext bytes each way, refresh rounds and
    max error against the plaintext polynomial model."""
    import json

    from .he.runner import run
    from .models import data, polyformer

    try:
        net, info = polyformer.load(model)
        _, test = data.load(info.get("dataset", "digits"), info.get("data_dir"), seed=info.get("seed", 0))
        patches = net.patches(test.images[:images]).numpy()
        with err.status(f"encrypted inference of {len(patches)} images …"):
            report, _ = run(polyformer.he_plan(net), patches)
    except (FileNotFoundError, ValueError) as e:
        fail(str(e))
    if as_json:
        print(json.dumps(report.to_json()))
        return
    from rich.table import Table

    t = Table(title=f"CKKS, {report.images} images in one batch", show_header=False)
    t.add_column("")
    t.add_column("", justify="right")
    t.add_row("wall time (batch) / per image", f"{report.seconds:.2f} s / {report.seconds_per_image:.3f} s")
    t.add_row("server / client compute", f"{report.server_seconds:.2f} s / {report.client_seconds:.2f} s")
    t.add_row("ciphertext bytes up / down", f"{report.bytes_up:,} / {report.bytes_down:,}")
    t.add_row("public keys (once)", f"{report.key_bytes:,}")
    t.add_row("refresh round trips (ciphertexts)", f"{report.refresh_rounds} ({report.refreshed_ciphertexts:,})")
    t.add_row("max abs error vs plaintext polynomial model", f"{report.max_abs_error:.2e}")
    t.add_row("argmax agreement", f"{100 * report.argmax_agreement:.1f} %")
    p = report.params
    t.add_row("parameters", f"N={p['poly_modulus_degree']}, log q={p['log_q']}, scale 2^{p['scale_bits']}, {p['levels']} levels, 128-bit")
    out.print(t)


attack_app = typer.Typer(no_args_is_help=True, help="Attacks on a sealed model from the cloud's (P2's) side; see docs/threat-model.md.")
app.add_typer(attack_app, name="attack")

_SEALED = typer.Option(..., "--sealed", metavar="OUT", help="A folder written by `stip seal` (provider/ is read only to score).")
_PUBLIC = typer.Option(..., "--public", metavar="SRC", help="The public model folder the attacker knows (or minilm, smollm2: the embedded ones).")
_TEXTS = typer.Option(None, "--text", help="A prompt the user sends (repeatable; default: four built-in sentences).")
_JSON = typer.Option(False, "--json", help="Print one JSON object (recovery_rate, n, details).")


EMBEDDED = ("minilm", "smollm2")


def _embedded(path: Path | None) -> Path | None:
    """`minilm` and `smollm2` name the embedded models wherever a model folder is taken."""
    if path is None or str(path) not in EMBEDDED:
        return path
    from .models import chat, default

    try:
        return default.path() if str(path) == "minilm" else chat.path(step=lambda msg: err.print(msg))
    except (RuntimeError, OSError) as e:
        fail(str(e))


def _attack(name: str, as_json: bool, **kwargs) -> None:
    import json

    from .attacks import scenario

    if kwargs.get("texts") is None:
        kwargs.pop("texts", None)
    else:
        kwargs["texts"] = tuple(kwargs["texts"])
    if "public" in kwargs:
        kwargs["public"] = _embedded(kwargs["public"])
    for arg in ("sealed", "public"):
        if arg in kwargs and not Path(kwargs[arg]).is_dir():
            fail(f"--{arg} {kwargs[arg]} is not a folder")
    try:
        with err.status(f"running the {name} attack …"):
            result = scenario.ATTACKS[name](**kwargs)
    except (FileNotFoundError, ValueError, OSError) as e:
        fail(str(e))
    if as_json:
        print(json.dumps(result.to_json()))
        return
    out.print(f"[bold]{name}[/]: recovery rate {100 * result.recovery_rate:.1f} % of {result.n}")
    for k, v in result.details.items():
        if k != "attack":
            out.print(f"  {k}: {v}", highlight=False, soft_wrap=True)


@attack_app.command("vocab")
def attack_vocab(sealed: Path = _SEALED, public: Path = _PUBLIC, texts: Optional[list[str]] = _TEXTS,
                 layers: int = typer.Option(0, "--layers", min=0, help="Attack P2's hidden states after this many layers (0: the input rows)."),
                 as_json: bool = _JSON) -> None:
    """Vocabulary matching: recover the user's tokens from the permuted activations P2 sees,
    knowing the public embedding table (and, for --layers k, the public model)."""
    _attack("vocab", as_json, sealed=sealed, public=public, texts=texts, layers=layers)


@attack_app.command("weights")
def attack_weights(sealed: Path = _SEALED, public: Path = _PUBLIC, texts: Optional[list[str]] = _TEXTS, as_json: bool = _JSON) -> None:
    """Weight matching: recover π and the per-layer permutations from the sealed checkpoint and
    a public base checkpoint, then decrypt the captured traffic with the recovered π."""
    _attack("weights", as_json, sealed=sealed, public=public, texts=texts)


@attack_app.command("known-plaintext")
def attack_known_plaintext(sealed: Path = _SEALED, texts: Optional[list[str]] = _TEXTS, as_json: bool = _JSON) -> None:
    """Known plaintext: recover π from one leaked pair (x, xπ), then decrypt other traffic."""
    _attack("known-plaintext", as_json, sealed=sealed, texts=texts)


@attack_app.command("attention")
def attack_attention(sealed: Path = _SEALED, texts: Optional[list[str]] = _TEXTS, as_json: bool = _JSON) -> None:
    """Attention leakage: which tokens repeat, from the attention maps P2 computes in the clear
    (recovery rate: precision of the top-m position pairs, m the number of repeated pairs)."""
    _attack("attention", as_json, sealed=sealed, texts=texts)


@app.command()
def bench(
    model: Optional[Path] = typer.Option(None, "--model", metavar="SRC", help="Local HF model folder, a `stip train polyformer` folder, or minilm / smollm2 (the embedded models; default: minilm)."),
    tokens: int = typer.Option(32, "--tokens", min=1, help="Input length for text models (image models: fixed by the image size)."),
    modes: str = typer.Option(",".join(("plain", "stip", "mpc-semi2k", "mpc-cheetah", "he")), "--modes", help="Comma-separated: plain, stip, mpc-semi2k, mpc-cheetah, he."),
    network: str = typer.Option("none", "--network", help="none | lan | wan: add an estimated network time per mode."),
    out_dir: Path = typer.Option(..., "--out", metavar="DIR", help="Writes DIR/results.json, DIR/report.md, DIR/latency.png, DIR/bytes.png."),
    full: bool = typer.Option(False, "--full", help="MPC on every layer (default: CHEETAH on 1 layer, so the run ends in minutes)."),
    mpc_layers: Optional[int] = typer.Option(None, "--mpc-layers", min=1, help="Layers for both MPC protocols (overrides the default and --full)."),
    repeats: int = typer.Option(5, "--repeats", min=1, help="Timed runs of plaintext and STIP (alternating)."),
    batch: int = typer.Option(1, "--batch", min=1, help="Inputs per inference (images for HE: one batch in the slots)."),
    readme: Optional[Path] = typer.Option(None, "--readme", metavar="FILE", help="Also put the table into FILE between `<!-- stip bench: NAME -->` markers."),
    as_json: bool = typer.Option(False, "--json", help="Print results.json's object on stdout."),
) -> None:
    """Every protection mode on one model and one input in one run: latency, bytes up and down,
    rounds, max error and top-1 agreement against plaintext, ratio to plaintext; with the
    published figures beside them, marked as reported, not re-run."""
    import json
    import shlex
    import time

    from .bench import Settings, report, run

    model = _embedded(model)
    try:
        settings = Settings(model=model, out=out_dir, tokens=tokens, modes=tuple(m.strip() for m in modes.split(",") if m.strip()),
                            network=network, full=full, repeats=repeats, batch=batch, mpc_layers=mpc_layers)
    except ValueError as e:
        fail(str(e))
    t0 = time.perf_counter()
    try:
        with err.status("stip bench …") as status:
            results = run(settings, progress=lambda msg: (status.update(f"stip bench: {msg}"), err.log(msg)))
    except (FileNotFoundError, ValueError, OSError) as e:
        fail(str(e))
    results["command"] = "stip bench " + shlex.join(sys.argv[2:]) if sys.argv[1:2] == ["bench"] else "stip bench"
    results["seconds"] = time.perf_counter() - t0
    results["machine"] = report.machine()
    report.write(results, out_dir)
    if readme is not None:
        report.update_readme(readme, results)
    if as_json:
        print(json.dumps(results))
        return
    out.print(report.table(results), highlight=False, soft_wrap=True)
    out.print(f"wrote {out_dir}/results.json, report.md, latency.png, bytes.png")


@app.command()
def demo(
    chat: bool = typer.Option(True, "--chat/--no-chat", help="Also run the chat step (needs vLLM: `make vllm`)."),
) -> None:
    """The three parties end to end. MiniLM: seal, audit, serve with `stip serve`, query, and
    compare with the plaintext sentence embeddings. Chat: seal SmolLM2 in token mode, serve it
    with vLLM, ask through `stip proxy` with the openai client, and compare with plaintext
    generation."""
    from .demo import run

    sys.exit(run(out, err, chat=chat))


def main() -> None:
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    app()


if __name__ == "__main__":
    main()
