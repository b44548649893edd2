"""Where a polynomial transformer's activations sit in CKKS slots, and its folded weights
(``polyformer.he_plan``) as slot maps: the program the HE server runs.

Token-major: input p of a ciphertext, token t, feature f sit at slot (p·T + t)·W + f, with W a
power of two ≥ every width of the model (features, a hidden chunk, a patch) and T a power of two
≥ the input's tokens. A ciphertext holds S / (T·W) inputs. A per-token product with a weight
matrix is then block-diagonal: its diagonals lie within ±W of the main one, and a rotation that
wraps around only ever meets a zero of them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..models.polyformer import attention_mask, plan_config
from .ckks import SlotMap, signed_step


def _pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


@dataclass(frozen=True)
class Layout:
    slots: int
    tokens: int  # T
    width: int  # W

    @property
    def per_ciphertext(self) -> int:
        return self.slots // (self.tokens * self.width)

    @property
    def baby(self) -> int:
        """Baby steps of the block maps: ~√ of their 2W - 1 diagonals, so babies and giants
        balance."""
        return _pow2(int(np.ceil(np.sqrt(2 * self.width))))

    def slot(self, p: int, t: int, f: int) -> int:
        return (p * self.tokens + t) * self.width + f

    def tile(self, per_token: np.ndarray) -> np.ndarray:
        """A (T, W) or (W,) pattern, repeated for every input of a ciphertext."""
        block = np.broadcast_to(per_token, (self.tokens, self.width)).ravel()
        out = np.zeros(self.slots)
        out[: block.size * self.per_ciphertext] = np.tile(block, self.per_ciphertext)
        return out

    def pack(self, x: np.ndarray) -> list[np.ndarray]:
        """(inputs, n ≤ T, d ≤ W) → one slot vector per ciphertext, zeros elsewhere."""
        b, n, d = x.shape
        if n > self.tokens or d > self.width:
            raise ValueError(f"({n}, {d}) does not fit a {self.tokens} × {self.width} block")
        out = []
        for i in range(0, b, self.per_ciphertext):
            part = x[i : i + self.per_ciphertext]
            block = np.zeros((self.per_ciphertext, self.tokens, self.width))
            block[: len(part), :n, :d] = part
            slots = np.zeros(self.slots)
            slots[: block.size] = block.ravel()
            out.append(slots)
        return out


def layout_for(plan: dict, n: int, slots: int) -> Layout:
    cfg = plan_config(plan)
    width = _pow2(max([cfg.dim] + ([] if cfg.causal else [cfg.patch_dim, cfg.classes])))
    layout = Layout(slots, _pow2(n), width)
    if layout.per_ciphertext < 1:
        raise ValueError(f"{layout.tokens} tokens × {width} features exceed {slots} slots")
    if not cfg.causal and layout.tokens != n:
        raise ValueError(f"the ViT's mean pool sums every token block: {n} tokens must be a power of two")
    return layout


def block_map(layout: Layout, w: np.ndarray, token_scale: np.ndarray | None = None) -> SlotMap:
    """x ↦ x·w on every token block (w: d_in × d_out, both ≤ W); row t scaled by
    ``token_scale[t]`` when given. Diagonal d holds w[g + d, g] at output feature g."""
    W, (d_in, d_out) = layout.width, w.shape
    scale = np.ones(layout.tokens) if token_scale is None else token_scale
    diagonals = {}
    g = np.arange(W)
    for d in range(-(W - 1), W):
        f = g + d
        ok = (f >= 0) & (f < d_in) & (g < d_out)
        base = np.zeros(W)
        base[ok] = w[f[ok], g[ok]]
        if base.any():
            diagonals[d] = layout.tile(np.outer(scale, base))
    return SlotMap(layout.slots, diagonals, layout.baby)


def replicated_head_map(layout: Layout, w: np.ndarray, vocab_slots: int) -> SlotMap:
    """x ↦ x·w (w: d ≤ W by V ≤ vocab_slots) for an input replicated in every W-block of the
    ciphertext: output v at every slot s ≡ v (mod vocab_slots). A rotation by d < W then reads
    feature (s + d) mod W, so W diagonals cover all of w."""
    W, (d_in, vocab) = layout.width, w.shape
    s = np.arange(layout.slots)
    v = s % vocab_slots
    diagonals = {}
    for d in range(W):
        f = (s + d) % W
        ok = (f < d_in) & (v < vocab)
        diag = np.zeros(layout.slots)
        diag[ok] = w[f[ok], v[ok]]
        diagonals[d] = diag
    return SlotMap(layout.slots, diagonals, layout.baby)


@dataclass
class Layer:
    q: SlotMap
    k: SlotMap
    v: SlotMap
    bq: np.ndarray
    bk: np.ndarray
    bv: np.ndarray
    o: SlotMap
    bo: np.ndarray
    w1: list[SlotMap]  # one per W-wide chunk of the hidden layer
    b1: list[np.ndarray]
    w2: list[SlotMap]  # from each chunk back to the features
    b2: np.ndarray
    attn_poly: np.ndarray
    mlp_poly: np.ndarray


@dataclass
class Program:
    """A plan compiled for a layout and an input length."""

    layout: Layout
    causal: bool
    head_dim: int
    layers: list[Layer]
    shifts: list[int]  # δ: query row i meets key row i - δ
    value_masks: dict[int, np.ndarray]  # δ → the attention mask's entries M[i, i - δ], on V's slots
    head_starts: np.ndarray  # 1 at each head's first feature
    head: SlotMap
    head_bias: np.ndarray
    select: list[np.ndarray] = field(default_factory=list)  # LM: the last token of input p
    patch: SlotMap | None = None  # ViT: the patch embedding, and the positions
    pos: np.ndarray | None = None
    vocab_slots: int = 0

    def steps(self) -> set[int]:
        """Every rotation the walk makes: the Galois keys the user creates."""
        L, dh = self.layout, self.head_dim
        maps = [self.head] + ([self.patch] if self.patch is not None else [])
        for layer in self.layers:
            maps += [layer.q, layer.k, layer.v, layer.o, *layer.w1, *layer.w2]
        steps = set().union(*(m.steps() for m in maps))
        steps |= {L.width, -L.width}  # one token along, for the attention's shifts
        steps |= {1 << k for k in range(dh.bit_length() - 1)} | {-(1 << k) for k in range(dh.bit_length() - 1)}
        block = L.width
        count = L.slots // L.width if self.causal else L.tokens  # replicate the last token / pool the tokens
        while count > 1:
            steps.add(block)
            block, count = block * 2, count // 2
        return {signed_step(s, L.slots) for s in steps} - {0}


def compile_plan(plan: dict, layout: Layout, n: int) -> Program:
    cfg = plan_config(plan)
    L, W = layout, layout.width
    dh = cfg.dim // cfg.heads
    if dh & (dh - 1):
        raise ValueError(f"a head's width ({dh}) must be a power of two: its dot product is a rotate-and-sum")
    features = (np.arange(W) < cfg.dim).astype(float)

    def bias(b: np.ndarray) -> np.ndarray:
        row = np.zeros(W)
        row[: len(b)] = b
        return L.tile(row)

    layers = []
    for lp in plan["layers"]:
        cat = lambda key: np.concatenate([h[key] for h in lp["heads"]], axis=-1)  # noqa: E731
        wo = np.concatenate([h["wo"] for h in lp["heads"]], axis=0)
        hidden = lp["w1"].shape[1]
        chunks = [slice(c, min(c + W, hidden)) for c in range(0, hidden, W)]
        layers.append(Layer(
            q=block_map(L, cat("wq")), k=block_map(L, cat("wk")), v=block_map(L, cat("wv")),
            bq=bias(cat("bq")), bk=bias(cat("bk")), bv=bias(cat("bv")), o=block_map(L, wo), bo=bias(lp["bo"]),
            w1=[block_map(L, lp["w1"][:, c]) for c in chunks], b1=[bias(lp["b1"][c]) for c in chunks],
            w2=[block_map(L, lp["w2"][c]) for c in chunks], b2=bias(lp["b2"]),
            attn_poly=lp["attn_poly"], mlp_poly=lp["mlp_poly"]))
    mask = attention_mask(cfg, n) if cfg.causal else np.ones((n, n))
    shifts = list(range(n)) if cfg.causal else list(range(-(n - 1), n))
    value_masks = {}
    for delta in shifts:
        per_token = np.zeros((L.tokens, W))
        for i in range(n):
            if 0 <= i - delta < n:
                per_token[i] = mask[i, i - delta] * features
        value_masks[delta] = L.tile(per_token)
    starts = np.zeros(W)
    starts[0 : cfg.dim : dh] = 1
    program = Program(layout=L, causal=cfg.causal, head_dim=dh, layers=layers, shifts=shifts, value_masks=value_masks,
                      head_starts=L.tile(starts), head=None, head_bias=None)
    if cfg.causal:
        vocab = plan["head"].shape[1]
        program.vocab_slots = _pow2(vocab)
        if program.vocab_slots > L.slots:
            raise ValueError(f"a vocabulary of {vocab} exceeds {L.slots} slots")
        program.head = replicated_head_map(L, plan["head"], program.vocab_slots)
        b = np.zeros(program.vocab_slots)
        b[:vocab] = plan["head_bias"]
        program.head_bias = np.tile(b, L.slots // program.vocab_slots)
        for p in range(L.per_ciphertext):
            sel = np.zeros(L.slots)
            sel[L.slot(p, n - 1, 0) : L.slot(p, n - 1, cfg.dim)] = 1
            program.select.append(sel)
    else:
        first = np.zeros(L.tokens)
        first[0] = 1  # the pooled sum lands on token 0's block
        program.head = block_map(L, plan["head"], token_scale=first)
        program.head_bias = bias(plan["head_bias"]) * L.tile(first[:, None] * np.ones(W))
        program.patch, program.pos = block_map(L, plan["patch"]), L.tile(np.pad(plan["pos"], ((0, L.tokens - n), (0, W - cfg.dim))))
    return program
