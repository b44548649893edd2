"""Published figures shown beside the measured rows: reported, not re-run. Each names its
setting, which differs from ours (hardware, parties, network, model size): compare orders of
magnitude, not ratios. Sources as summarised in the project's notes (docs/ and ../shared/docs)."""

REFERENCES = (
    {"system": "STIP (paper)", "mode": "permutation", "model": "GPT-2 124M",
     "setting": "4×A100, batch 100 × 100 tokens", "figure": "45,366 tokens/s; 5.8 MiB up, 7.5 MiB down per inference"},
    {"system": "STIP (paper)", "mode": "permutation", "model": "LLaMA2-7B",
     "setting": "4×A100", "figure": "31.7 ms per token (1.7 ms on the user's device)"},
    {"system": "PUMA", "mode": "MPC (3-party ABY3, SPU)", "model": "BERT-base, 128 tokens",
     "setting": "5 Gbit/s, 1 ms RTT", "figure": "33.9 s, 10.8 GB"},
    {"system": "PUMA", "mode": "MPC (3-party ABY3, SPU)", "model": "GPT-2 base, 32 tokens in, 1 out",
     "setting": "5 Gbit/s, 1 ms RTT", "figure": "15.5 s, 3.8 GB"},
    {"system": "MPCViT", "mode": "MPC (2-party)", "model": "ViT-7-4-32, CIFAR-10",
     "setting": "the paper's MPC setting", "figure": "48.0 s (μ=0.1, 93.59 %) vs softmax ViT 112.2 s (93.97 %)"},
    {"system": "Zimerman et al. (ICML 2024)", "mode": "HE (CKKS, HElayers/HEaaN, bootstrapping)", "model": "6-layer polynomial LM, 128 tokens",
     "setting": "32-core EPYC + A100, 128-bit", "figure": "305 s per inference"},
    {"system": "NEXUS (NDSS 2025)", "mode": "HE (non-interactive)", "model": "BERT-base",
     "setting": "4×A100 (857 s on CPU)", "figure": "37.3 s amortised over 32 inputs, 164 MB"},
)
