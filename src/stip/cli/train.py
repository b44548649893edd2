"""Training the baselines' MPC- and HE-friendly models, and a LoRA adapter for shares mode."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from . import app, embedded, err, fail, out


train_app = typer.Typer(no_args_is_help=True, help="Train the baselines' MPC- and HE-friendly models, and LoRA adapters for shares mode.")
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

    from ..models.data import DatasetMissing
    from ..mpc.mpcvit import Recipe
    from ..mpc.mpcvit import train_mpcvit as run
    from ..models.train import RunMismatch

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
    task: str = typer.Option("image", "--task", help="image: the ViT on an image dataset | lm: a causal language model on text."),
    preset: Optional[str] = typer.Option(None, "--preset", help="image: digits (default) | tiny. lm: lm (default, context 32) | lm-128 | lm-tiny."),
    dataset: str = typer.Option("digits", "--dataset", help="image: digits (bundled) | cifar10 | cifar100 | tiny-imagenet (local files)."),
    data_dir: Optional[Path] = typer.Option(None, "--data-dir", help="image: the dataset's folder. lm: a text folder (WikiText's wiki.{train,valid,test}.tokens, or *.txt); default: CPython's own docs."),
    epochs: Optional[int] = typer.Option(None, "--epochs", min=0, help="Default: 40 (image), 8 (lm)."),
    degree: int = typer.Option(4, "--degree", min=1, help="Degree of the fitted polynomials (under CKKS 4 to 7 take 3 levels, 2 and 3 take 2; 6 keeps the 16-token digits ViT within 0.3 points)."),
    method: str = typer.Option("lsq", "--fit", help="lsq | minimax, over the range each activation took on the training set."),
    vocab: Optional[int] = typer.Option(None, "--vocab", min=256, help="lm: BPE vocabulary size (default: the preset's, 4096)."),
    seed: int = typer.Option(0, "--seed"),
    force: bool = typer.Option(False, "--force"),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as one JSON object."),
) -> None:
    """Train the polynomial transformer (Zimerman et al.): pointwise attention scaled by 1/√L
    (causal for an LM: row i by 1/√(i+1)), BatchNorm, range and variance penalties; then swap
    fitted polynomials in for the activations. Images: accuracy before and after. LM: a BPE
    tokenizer on the corpus, a softmax/LayerNorm/GELU twin of the same size, and validation
    and test perplexity of the twin, the LM before and after the swap. `stip he run --model
    OUT` runs it under CKKS."""
    import json

    from ..models.data import DatasetMissing
    from ..models.polyformer import train_polylm, train_polyformer
    from ..models.text import CorpusMissing
    from ..models.train import RunMismatch

    if task not in ("image", "lm"):
        fail("--task is image or lm")
    progress, tick = _stage_progress()
    try:
        with progress:
            if task == "lm":
                summary = train_polylm(out_dir, preset or "lm", data_dir, 8 if epochs is None else epochs, degree, method, seed=seed,
                                       vocab=vocab, tick=tick, force=force)  # fmt: skip
            else:
                summary = train_polyformer(out_dir, preset or "digits", dataset, data_dir, 40 if epochs is None else epochs, degree,
                                           method, seed=seed, tick=tick, force=force)  # fmt: skip
    except (DatasetMissing, CorpusMissing, RunMismatch, ValueError) as e:
        fail(str(e))
    if as_json:
        print(json.dumps(summary))
        return
    if task == "image":
        out.print(f"accuracy with GELU: {100 * summary['twin_accuracy']:.2f} %   with degree-{degree} polynomials: "
                  f"{100 * summary['polynomial_accuracy']:.2f} %   model: {out_dir / 'model.safetensors'}", highlight=False)
        return
    from rich.table import Table

    c = summary["config"]
    t = Table(title=f"polynomial LM: {c['layers']} layers, width {c['dim']}, {c['heads']} heads, context {c['context']}, "
                    f"vocabulary {c['vocab']:,}; {summary['corpus']['train']['tokens']:,} training tokens")
    for col in ("perplexity", "validation", "test"):
        t.add_column(col, justify="right" if col != "perplexity" else "left")
    for key, label in (("twin_perplexity", "softmax / LayerNorm / GELU twin"), ("gelu_perplexity", "polynomial-ready, GELU (before the swap)"),
                       ("polynomial_perplexity", f"degree-{degree} polynomials")):
        t.add_row(label, f"{summary[key]['valid']:,.1f}", f"{summary[key]['test']:,.1f}")
    out.print(t)
    out.print(f"model: {out_dir / 'model.safetensors'}   twin: {out_dir / 'twin.safetensors'}   (stip he run --model {out_dir})", highlight=False)


@train_app.command("lora")
def train_lora(
    out_dir: Path = typer.Argument(..., metavar="OUT", help="The adapter folder to write (adapter_config.json, adapter_model.safetensors, summary.json). Re-run to resume."),
    base: Path = typer.Option(Path("smollm2"), "--model", metavar="SRC", help="The public base: a local HF causal LM folder, or smollm2 (the embedded chat model)."),
    steps: int = typer.Option(300, "--steps", min=1),
    rank: int = typer.Option(16, "--rank", min=1, help="LoRA rank r."),
    alpha: int = typer.Option(32, "--alpha", min=1, help="lora_alpha: the update is scaled by alpha / r."),
    lr: float = typer.Option(5e-4, "--lr", help="AdamW's peak learning rate (cosine schedule)."),
    batch: int = typer.Option(4, "--batch", min=1, help="Windows a step."),
    length: int = typer.Option(128, "--length", min=8, help="Tokens a window."),
    eval_windows: int = typer.Option(64, "--eval-windows", min=1, help="Held-out windows (test split) for perplexity."),
    seed: int = typer.Option(0, "--seed"),
    force: bool = typer.Option(False, "--force", help="Start over in an OUT that holds a run with other settings."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as one JSON object."),
) -> None:
    """Fine-tune a LoRA adapter (PEFT) on all seven projections of a LLaMA-family model, on
    CPython's own docs, on CPU. It checkpoints every 25 steps; running the same command again
    resumes. Reports held-out perplexity before and after. Use it with `stip generate|proxy
    SRC --shares S1,S2 --adapter OUT`: the share servers never see it."""
    import json

    from ..models import lora
    from ..models.train import RunMismatch

    src = embedded(base)
    if not (Path(src) / "config.json").is_file():
        fail(f"{src} is not a local Hugging Face model folder (no config.json)")
    progress = Progress(TextColumn("{task.description:<10}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                        TextColumn("{task.fields[info]}"), TimeElapsedColumn(), console=err)
    task = progress.add_task("lora", total=steps, info="")

    def tick(step: int, total: int, info: str) -> None:
        progress.update(task, completed=step, total=total, info=info)

    try:
        with progress:
            summary = lora.train(src, out_dir, steps=steps, rank=rank, alpha=alpha, lr=lr, batch=batch, length=length,
                                 eval_windows=eval_windows, seed=seed, force=force, tick=tick)  # fmt: skip
    except (RunMismatch, ValueError, OSError) as e:
        fail(str(e))
    if as_json:
        print(json.dumps(summary))
        return
    h = summary["held_out"]
    out.print(f"LoRA r={rank} on {', '.join(summary['targets'])}: {summary['trainable_parameters']:,} parameters, {steps} steps "
              f"in {summary['train_seconds']:.0f} s", highlight=False)
    out.print(f"held-out perplexity ({h['windows']} × {length} tokens of the test split): base {h['perplexity_base']:.2f} → "
              f"adapted {h['perplexity_adapted']:.2f} ({100 * h['change']:+.1f} %)", highlight=False)
    out.print(f"adapter: {out_dir}   (stip generate smollm2 --shares S1,S2 --adapter {out_dir})", highlight=False)
