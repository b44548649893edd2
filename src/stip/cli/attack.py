"""Attacks on a sealed model from P2's side."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from . import app, embedded, err, fail, out


attack_app = typer.Typer(no_args_is_help=True, help="Attacks on a sealed model from the cloud's (P2's) side; see docs/threat-model.md.")
app.add_typer(attack_app, name="attack")

_SEALED = typer.Option(..., "--sealed", metavar="OUT", help="A folder written by `stip seal` (provider/ is read only to score).")
_PUBLIC = typer.Option(..., "--public", metavar="SRC", help="The public model folder the attacker knows (or minilm, smollm2: the embedded ones).")
_TEXTS = typer.Option(None, "--text", help="A prompt the user sends (repeatable; default: four built-in sentences).")
_JSON = typer.Option(False, "--json", help="Print one JSON object (recovery_rate, n, details).")


def _attack(name: str, as_json: bool, **kwargs) -> None:
    import json

    from ..attacks import scenario

    if kwargs.get("texts") is None:
        kwargs.pop("texts", None)
    else:
        kwargs["texts"] = tuple(kwargs["texts"])
    if "public" in kwargs:
        kwargs["public"] = embedded(kwargs["public"])
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
                 proposals: int = typer.Option(1024, "--proposals", min=0, help="Causal models: try the public model's N likeliest next tokens before the whole vocabulary (0: whole vocabulary only)."),
                 as_json: bool = _JSON) -> None:
    """Vocabulary matching: recover the user's tokens from the permuted activations P2 sees,
    knowing the public embedding table (and, for --layers k, the public model). On a causal
    model the prompt goes through its chat template, and is recovered position by position."""
    _attack("vocab", as_json, sealed=sealed, public=public, texts=texts, layers=layers, proposals=proposals)


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


@attack_app.command("frequency")
def attack_frequency(sealed: Path = _SEALED, public: Path = _PUBLIC,
                     requests: str = typer.Option("10,100,1000", "--requests", help="Comma-separated: how many logged requests to decode (a recovery curve)."),
                     new_tokens: int = typer.Option(32, "--new-tokens", min=1, help="Answer length per request (greedy, ends early at end of turn)."),
                     reference: int = typer.Option(1000, "--reference", min=0, help="Requests the attacker answers with the public model to build its reference (0 with --self-generate: decode from the self-generated text only; the log is then only scored)."),
                     self_generate: Optional[str] = typer.Option(None, "--self-generate", metavar="N[,N…]", help="Also: P2 samples N renamed sequences from its own sealed checkpoint (no user traffic, no public weights) and decodes from those alone, against public text; scored on the logged requests."),
                     length: int = typer.Option(64, "--length", min=2, help="With --self-generate: ids per sampled sequence."),
                     as_json: bool = _JSON) -> None:
    """Frequency analysis of a causal model's token ids: P2 answers many chat requests (real
    sentences from CPython's docs) and maps the renamed ids back to tokens by unigram and
    bigram statistics against the public model's answers to other prompts. With
    --self-generate, P2 needs no log at all: it samples renamed text from its own checkpoint."""

    def parse(value: str, flag: str) -> tuple[int, ...]:
        try:
            counts = tuple(sorted({int(r) for r in value.split(",") if r.strip()}))
        except ValueError:
            fail(f"{flag} takes comma-separated integers, not {value!r}")
        if not counts or counts[0] < 1:
            fail(f"{flag} needs at least one count ≥ 1")
        return counts

    counts = parse(requests, "--requests")
    generated = parse(self_generate, "--self-generate") if self_generate is not None else ()
    if not reference and not generated:
        fail("--reference 0 needs --self-generate: there would be nothing to decode from")
    _attack("frequency", as_json, sealed=sealed, public=public, requests=counts, new_tokens=new_tokens,
            reference_requests=reference, self_generate=generated, length=length, log=lambda msg: err.print(msg))


@attack_app.command("shares")
def attack_shares(public: Path = _PUBLIC, texts: Optional[list[str]] = _TEXTS,
                  layers: str = typer.Option("1,2", "--layers", help="Chat models: comma-separated depths for the causal matching ('' for none)."),
                  requests: int = typer.Option(100, "--requests", min=0, help="Chat models: requests logged for frequency analysis (0: none)."),
                  proposals: int = typer.Option(64, "--proposals", min=1, help="Causal matching: the public model's N likeliest next tokens are the candidates."),
                  rounds: int = typer.Option(2, "--rounds", min=2, max=4, help="P3's schedule: 2 round trips per layer (the servers see [o | h] residuals) or 4 (normalised matmul inputs)."),
                  adapter: Optional[Path] = typer.Option(None, "--adapter", metavar="DIR", help="A PEFT LoRA folder P3 applies (stip train lora): the servers' view with a private fine-tune in use."),
                  as_json: bool = _JSON) -> None:
    """The attack suite against shares mode, from one share server's side: P3 runs the public
    model with two recording share servers; vocabulary matching at the input, the causal
    matching after k layers and frequency analysis run on each server's view, on fresh noise
    (chance) and on the unmasked activations (the attack working); chi-square uniformity of
    every byte each server received."""
    try:
        depths = tuple(int(k) for k in layers.split(",") if k.strip())
    except ValueError:
        fail(f"--layers takes comma-separated integers, not {layers!r}")
    if rounds not in (2, 4):
        fail("--rounds takes 2 or 4 (round trips per layer)")
    if adapter is not None and not adapter.is_dir():
        fail(f"--adapter {adapter} is not a folder")
    _attack("shares", as_json, public=public, texts=texts, layers=depths, requests=requests, proposals=proposals,
            log=lambda msg: err.print(msg), rounds=rounds, adapter=adapter)
