"""P3's local embedding module, one per family, built from the client bundle's tensors.

The client embeds in the clear (it is the user's own data), then permutes by π before
anything leaves the machine.

    text (bert, gpt2, llama/qwen2):  word[ids] (+ position) (+ token type)
    image (vit):                     patch embedding, class token, position embedding
    image (swin):                    patch embedding, its LayerNorm (+ absolute positions)
"""

from __future__ import annotations

import torch
from torch import nn

TEXT = "text"
IMAGE = "image"


class TextEmbedder(nn.Module):
    """Sum of the word table and, where the model has them, absolute position and
    token-type tables. ``position_offset`` continues positions during generation."""

    modality = TEXT

    def __init__(self, word: torch.Tensor, position: torch.Tensor | None = None, token_type: torch.Tensor | None = None):
        super().__init__()
        self.word = nn.Embedding.from_pretrained(word, freeze=True)
        self.position = None if position is None else nn.Embedding.from_pretrained(position, freeze=True)
        self.token_type = None if token_type is None else nn.Embedding.from_pretrained(token_type, freeze=True)

    @property
    def max_positions(self) -> int | None:
        return None if self.position is None else self.position.num_embeddings

    @torch.no_grad()
    def forward(self, input_ids, position_ids=None, token_type_ids=None, position_offset: int = 0):
        x = self.word(input_ids)
        if self.position is not None:
            if position_ids is None:
                n = input_ids.shape[-1]
                position_ids = torch.arange(position_offset, position_offset + n, device=input_ids.device)
            x = x + self.position(position_ids)
        if self.token_type is not None:
            tt = torch.zeros_like(input_ids) if token_type_ids is None else token_type_ids
            x = x + self.token_type(tt)
        return x


class ImageEmbedder(nn.Module):
    """The model's own embedding module (ViTEmbeddings / SwinEmbeddings), run by P3."""

    modality = IMAGE

    def __init__(self, module: nn.Module, grid: tuple[int, int] | None):
        super().__init__()
        self.module = module.eval()
        self.grid = grid

    @torch.no_grad()
    def forward(self, pixel_values):
        out = self.module(pixel_values)
        return out[0] if isinstance(out, tuple) else out


def build(config, tensors: dict[str, torch.Tensor]) -> nn.Module:
    """The embedder for ``config.model_type`` from the bundle's tensors (names without the
    base-model prefix, as in ``embeddings.word_embeddings.weight``)."""
    mt = config.model_type
    if mt == "bert":
        return TextEmbedder(
            tensors["embeddings.word_embeddings.weight"],
            tensors["embeddings.position_embeddings.weight"],
            tensors["embeddings.token_type_embeddings.weight"],
        )
    if mt == "gpt2":
        return TextEmbedder(tensors["wte.weight"], tensors["wpe.weight"])
    if mt in ("llama", "qwen2", "mistral"):
        return TextEmbedder(tensors["embed_tokens.weight"])
    if mt == "vit":
        from transformers.models.vit.modeling_vit import ViTEmbeddings

        return ImageEmbedder(_loaded(ViTEmbeddings(config), tensors, "embeddings."), None)
    if mt == "swin":
        from transformers.models.swin.modeling_swin import SwinEmbeddings

        module = _loaded(SwinEmbeddings(config), tensors, "embeddings.")
        grid = module.patch_embeddings.grid_size
        return ImageEmbedder(module, (int(grid[0]), int(grid[1])))
    raise ValueError(f"no client embedder for model_type {mt!r}")


def _loaded(module: nn.Module, tensors: dict[str, torch.Tensor], prefix: str) -> nn.Module:
    own = {k.removeprefix(prefix): v for k, v in tensors.items() if k.startswith(prefix)}
    module.load_state_dict(own, strict=True)
    return module.eval()
