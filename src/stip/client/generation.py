"""P3's one way to generate text: the sampling settings, the result, and the loop every
engine drives (a STIP session, shares mode's walk; vLLM runs the same settings itself).

    settings = Sampling(temperature=0.7, top_p=0.9, seed=1, frequency_penalty=0.5, logprobs=5)
    g = generate(step, prompt_ids, 32, settings, stop={eos})
    g.token_ids, g.finish_reason, g.logprobs[0].top

``step(ids, offset, every)`` is the engine: it feeds ``ids`` at positions ``offset``… and
returns the logits of the last position, shape (1, vocab), or of every fed position with
``every`` (the prompt's logprobs). Temperature 0 is greedy: there is no second spelling.

The order is vLLM's, so that both engines answer alike: ``logit_bias``, then the presence
and frequency penalties (counted on the generated ids), then temperature and top-p.
Logprobs are the model's own (log-softmax of the raw logits, before any of these), as vLLM
returns by default.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterator, Mapping

import torch

from ..models.hf import draw

MAX_LOGPROBS = 20  # OpenAI's limit for top_logprobs


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: Mapping[int, float] = field(default_factory=dict)
    logprobs: int | None = None  # None: none; k ≥ 0: the chosen id's and the k likeliest
    prompt_logprobs: int | None = None  # the same for every prompt position after the first

    def __post_init__(self):
        if not 0.0 <= self.temperature <= 2.0:
            raise ValueError("temperature must lie in 0…2")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError("top_p must lie in (0, 1]")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:
                raise ValueError(f"{name} must lie in -2…2")
        if any(not -100.0 <= b <= 100.0 for b in self.logit_bias.values()):
            raise ValueError("logit_bias values must lie in -100…100")
        for name in ("logprobs", "prompt_logprobs"):
            k = getattr(self, name)
            if k is not None and not 0 <= k <= MAX_LOGPROBS:
                raise ValueError(f"{name} must lie in 0…{MAX_LOGPROBS}")

    def check_vocab(self, vocab: int) -> None:
        bad = next((t for t in self.logit_bias if not 0 <= t < vocab), None)
        if bad is not None:
            raise ValueError(f"logit_bias names token {bad}; ids lie in 0…{vocab - 1}")


@dataclass
class TokenLogprob:
    token: int
    logprob: float
    top: list[tuple[int, float]]  # the k likeliest ids, likeliest first


@dataclass
class Step:
    token: int
    logprob: TokenLogprob | None
    logits: torch.Tensor  # the raw row it was drawn from


@dataclass
class Generation:
    """What every engine returns for one prompt: the new ids only, then why it stopped."""

    token_ids: list[int]
    prompt_ids: list[int]
    finish_reason: str = "length"  # "stop": a stop id; "length": max_new_tokens
    text: str | None = None
    logprobs: list[TokenLogprob] | None = None
    prompt_logprobs: list[TokenLogprob | None] | None = None  # None for the first prompt id
    logits: list[torch.Tensor] = field(default_factory=list)  # per step, with keep_logits


def eos_ids(config) -> frozenset[int]:
    """The ids that end a generation: the config's ``eos_token_id`` (one or a list)."""
    eos = getattr(config, "eos_token_id", None)
    return frozenset(e for e in (eos if isinstance(eos, list) else [eos]) if isinstance(e, int))


def logprob_entries(logits: torch.Tensor, tokens: list[int], k: int) -> list[TokenLogprob]:
    """Each row's log-softmax at its token, and the row's k likeliest ids."""
    lp = torch.log_softmax(logits.double(), dim=-1)
    top = lp.topk(k, dim=-1) if k else None
    return [TokenLogprob(t, float(lp[i, t]), [] if top is None else list(zip(top.indices[i].tolist(), top.values[i].tolist())))
            for i, t in enumerate(tokens)]  # fmt: skip


def sample(logits: torch.Tensor, temperature: float, top_p: float, gen: torch.Generator | None) -> int:
    """One id from a row of logits: temperature, then nucleus (top-p) sampling."""
    probs = torch.softmax(logits.double() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(descending=True)
        keep = sorted_p.cumsum(0) - sorted_p < top_p  # smallest prefix with mass ≥ top_p
        probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_p[keep])
    return int(draw(probs[None], gen))


class Sampler:
    """Picks each id from raw logits under ``settings``; keeps the counts its penalties need."""

    def __init__(self, settings: Sampling, vocab: int):
        settings.check_vocab(vocab)
        self.settings = settings
        self.gen = torch.Generator().manual_seed(settings.seed) if settings.seed is not None else None
        self.counts = torch.zeros(vocab, dtype=torch.float64)
        self.bias = torch.zeros(vocab, dtype=torch.float64)
        for t, b in settings.logit_bias.items():
            self.bias[t] = b

    def pick(self, raw: torch.Tensor, banned: set[int] = frozenset()) -> Step:
        s = self.settings
        logits = raw.double() + self.bias
        if s.presence_penalty or s.frequency_penalty:
            logits = logits - s.presence_penalty * (self.counts > 0) - s.frequency_penalty * self.counts
        if banned:
            logits[list(banned)] = float("-inf")
        token = int(logits.argmax()) if s.temperature == 0 else sample(logits, s.temperature, s.top_p, self.gen)
        self.counts[token] += 1
        entry = None if s.logprobs is None else logprob_entries(raw[None], [token], s.logprobs)[0]
        return Step(token, entry, raw)


Engine = Callable[[list[int], int, bool], torch.Tensor]


def steps(step: Engine, prompt: list[int], max_new_tokens: int, settings: Sampling = Sampling(), *, vocab: int,
          stop: set[int] | frozenset[int] = frozenset(), min_tokens: int = 0,
          prompt_logprobs: list | None = None) -> Iterator[Step]:  # fmt: skip
    """The loop: one prefill, then one id per step, each fed back. Yields each new id as it
    is drawn; ends after a ``stop`` id (none before ``min_tokens``) or ``max_new_tokens``.
    With ``settings.prompt_logprobs``, the prompt's entries are appended to ``prompt_logprobs``."""
    if not prompt:
        raise ValueError("empty prompt")
    if max_new_tokens < 1:
        raise ValueError("max_new_tokens must be at least 1")
    sampler = Sampler(settings, vocab)
    every = settings.prompt_logprobs is not None
    logits = step(list(prompt), 0, every)
    if every:
        prompt_logprobs.extend([None, *logprob_entries(logits[:-1], list(prompt[1:]), settings.prompt_logprobs)])
    made = 0
    while True:
        s = sampler.pick(logits[-1], set(stop) if made < min_tokens else frozenset())
        made += 1
        yield s
        if s.token in stop or made == max_new_tokens:
            return
        logits = step([s.token], len(prompt) + made - 1, False)


def generate(step: Engine, prompt: list[int], max_new_tokens: int, settings: Sampling = Sampling(), *, vocab: int,
             stop: set[int] | frozenset[int] = frozenset(), min_tokens: int = 0, keep_logits: bool = False,
             on_token: Callable[[int], None] | None = None) -> Generation:  # fmt: skip
    """`steps`, collected. ``on_token`` is called with each new id as it arrives."""
    out = Generation([], list(prompt), logprobs=[] if settings.logprobs is not None else None,
                     prompt_logprobs=[] if settings.prompt_logprobs is not None else None)  # fmt: skip
    for s in steps(step, prompt, max_new_tokens, settings, vocab=vocab, stop=stop, min_tokens=min_tokens,
                   prompt_logprobs=out.prompt_logprobs):  # fmt: skip
        out.token_ids.append(s.token)
        if s.logprob is not None:
            out.logprobs.append(s.logprob)
        if keep_logits:
            out.logits.append(s.logits.clone())
        if on_token is not None:
            on_token(s.token)
    out.finish_reason = "stop" if out.token_ids[-1] in stop else "length"
    return out


# --- one request, as the proxy hands it to an engine ---------------------------------------------


@dataclass
class Ask:
    """One prompt's request to an engine, in the ids that engine knows: ``n`` choices, each
    ended by an id of ``stop`` (none before ``min_tokens``) or ``max_tokens``."""

    prompt: list[int]
    max_tokens: int
    sampling: Sampling = Sampling()
    n: int = 1
    stop: frozenset[int] = frozenset()
    min_tokens: int = 0


@dataclass
class Piece:
    """What an engine streams back: new ids of one choice, their logprobs (with the first
    piece, the prompt's), and at the end why that choice stopped."""

    choice: int
    ids: list[int]
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish: str | None = None
    prompt_logprobs: list[TokenLogprob | None] | None = None


def walk(engine: Callable, ask: Ask, vocab: int, emit: Callable[[Piece], None]) -> None:
    """``ask`` on an engine run here (a STIP session, shares mode's walk): each choice in turn,
    on a fresh ``engine()`` (a context manager giving a `steps` engine), seeded ``seed + i``."""
    from dataclasses import replace

    for i in range(ask.n):
        sampling = ask.sampling if ask.sampling.seed is None else replace(ask.sampling, seed=ask.sampling.seed + i)
        prompt_lp = [] if sampling.prompt_logprobs is not None else None
        last = None
        with engine() as step:
            for s in steps(step, ask.prompt, ask.max_tokens, sampling, vocab=vocab, stop=ask.stop, min_tokens=ask.min_tokens,
                           prompt_logprobs=prompt_lp):  # fmt: skip
                emit(Piece(i, [s.token], [s.logprob] if s.logprob is not None else [], prompt_logprobs=prompt_lp if last is None else None))
                last = s.token
        emit(Piece(i, [], finish="stop" if last in ask.stop else "length"))
