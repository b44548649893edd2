"""The polynomial transformer of Zimerman et al. (ICML 2024) for CKKS inference: a ViT
(``PolyViT``) and a causal language model (``PolyLM``) from the same blocks.

Attention is a pointwise activation of the scores divided by a length scale,
    Att(Q, K, V) = σ(QKᵀ/√d_h) · V / S(L),   S(L) = √L ("sqrt_n") or L ("n"),
and for the LM, causally: row i sees positions j ≤ i, divided by S(i + 1) (an elementwise
product with a scaled 0/1 matrix). Normalisation is BatchNorm (an affine map at inference,
folded into the next linear layer), with an extra BatchNorm inside each MLP; the paper keeps
LayerNorm for language, with a polynomial 1/√var, which we do not build. Training adds a range penalty on every activation's
input (outside [-R, R]) and a variance penalty on every BatchNorm's input variance (above a
ceiling). After training, ``to_polynomial`` fits a polynomial to each activation over the
range its inputs took on the training set and swaps it in, without further training.

    model = PolyViT(PRESETS["digits"])      # GELU activations while training
    to_polynomial(model, train.images, degree=2)
    plan = he_plan(model)                    # folded numpy weights for stip.he
    lm = PolyLM(PRESETS["lm"])               # ids (batch, tokens) → next-token logits per position
    twin = PolyLM(replace(PRESETS["lm"], attention="softmax", norm="layer"))   # its softmax/LayerNorm twin

One job a module: `model` (the modules and their training loss), `fit` (the polynomial swap),
`plan` (the folded numpy plan stip.he evaluates), `training` (runs and files). The MPC export
is `stip.mpc.polyformer.to_mpc`.
"""

from .fit import FITS, fit_polynomial, to_polynomial
from .model import (PRESETS, Act, Attention, Block, Norm, PolyConfig, PolyLM, PolyViT, attention_mask, length_scale, norm,
                    patches, perplexity, poly, task_loss, training_loss)  # fmt: skip
from .plan import embed_plan, he_plan, plan_config, plan_forward
from .training import KIND, held_out, is_checkpoint, load, next_token_perplexity, save, train_polyformer, train_polylm

__all__ = ["FITS", "KIND", "PRESETS", "Act", "Attention", "Block", "Norm", "PolyConfig", "PolyLM", "PolyViT", "attention_mask",
           "embed_plan", "fit_polynomial", "he_plan", "held_out", "is_checkpoint", "length_scale", "load", "next_token_perplexity",
           "norm", "patches", "perplexity", "plan_config", "plan_forward", "poly", "save", "task_loss", "to_polynomial",
           "train_polyformer", "train_polylm", "training_loss"]  # fmt: skip
