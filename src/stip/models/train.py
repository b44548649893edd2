"""Training loops for the baselines' models, with per-epoch checkpoints that resume.

``fit`` trains one stage; its checkpoint ``OUT/stages/<name>.pt`` holds the model, optimiser,
schedule, epoch and shuffling state after every epoch (written to a temporary file and renamed,
so an interruption never leaves half a checkpoint). Run the same command again and every
finished stage is loaded, the unfinished one continues from its last epoch.
"""

from __future__ import annotations

import io
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from ..errors import StipError
from .data import Split

# tick(stage, step, total_steps, info): progress for a CLI; steps are minibatches
Tick = Callable[[str, int, int, str], None]


class RunMismatch(StipError, ValueError):
    """OUT already holds a run with different settings."""


def open_run(out: Path, settings: dict, force: bool = False) -> None:
    """Create OUT for a run with these settings, or check that the run in it has the same."""
    out.mkdir(parents=True, exist_ok=True)
    state = out / "settings.json"
    if state.exists() and not force:
        before = json.loads(state.read_text())
        if before != settings:
            changed = sorted(k for k in settings.keys() | before.keys() if before.get(k) != settings.get(k))
            raise RunMismatch(f"{out} holds a run with other settings ({', '.join(changed)}); use a new OUT or --force")
        return
    if force:
        for p in (out / "stages").glob("*.pt"):
            p.unlink()
    _atomic_write(state, json.dumps(settings, indent=2).encode())


def _atomic_write(path: Path, data: bytes) -> None:
    """``path`` holds ``data`` whole or not at all, also when other processes write it at once."""
    tmp = path.with_suffix(f"{path.suffix}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


@dataclass
class Schedule:
    epochs: int
    lr: float = 1e-3
    batch_size: int = 64
    weight_decay: float = 0.05
    seed: int = 0


def fit(
    model: torch.nn.Module,
    name: str,
    train: Split,
    schedule: Schedule,
    loss_fn: Callable,
    out: Path,
    tick: Tick | None = None,
    after_step: Callable[[], None] | None = None,
    augment: Callable | None = None,
) -> dict:
    """AdamW with a cosine schedule. ``loss_fn(model, images, labels) -> loss``. Returns the
    stage's record (epochs, last loss); the model holds the stage's final weights."""
    path = out / "stages" / f"{name}.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    opt = torch.optim.AdamW(model.parameters(), lr=schedule.lr, weight_decay=schedule.weight_decay)
    steps_per_epoch = -(-len(train) // schedule.batch_size)
    total = max(1, schedule.epochs * steps_per_epoch)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + torch.cos(torch.tensor(torch.pi * s / total)).item()))
    gen = torch.Generator().manual_seed(schedule.seed)
    start, record = 0, {"epochs": schedule.epochs, "loss": None}
    if path.exists():
        ck = torch.load(path, weights_only=True)
        model.load_state_dict(ck["model"])
        if ck["done"]:
            model.eval()
            return ck["record"]
        opt.load_state_dict(ck["opt"])
        sched.load_state_dict(ck["sched"])
        gen.set_state(ck["gen"])
        start, record = ck["epoch"], ck["record"]
    for epoch in range(start, schedule.epochs):
        model.train()
        total_loss, seen = 0.0, 0
        for i, (x, y) in enumerate(train.batches(schedule.batch_size, gen)):
            if augment is not None:
                x = augment(x, gen)
            loss = loss_fn(model, x, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            if after_step is not None:
                after_step()
            total_loss, seen = total_loss + loss.item() * len(y), seen + len(y)
            if tick is not None:
                tick(name, epoch * steps_per_epoch + i + 1, total, f"epoch {epoch + 1}/{schedule.epochs} loss {total_loss / seen:.3f}")
        record = {"epochs": schedule.epochs, "loss": total_loss / max(seen, 1)}
        state = {"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(),
                 "gen": gen.get_state(), "epoch": epoch + 1, "record": record, "done": epoch + 1 == schedule.epochs}
        _save(state, path)
    if schedule.epochs == 0 or not path.exists():
        _save({"model": model.state_dict(), "epoch": 0, "record": record, "done": True}, path)
    model.eval()
    return record


def _save(state: dict, path: Path) -> None:
    buf = io.BytesIO()
    torch.save(state, buf)
    _atomic_write(path, buf.getvalue())


@torch.no_grad()
def accuracy(model: torch.nn.Module, split: Split, batch_size: int = 256) -> float:
    model.eval()
    right = sum(int((model(x).argmax(-1) == y).sum()) for x, y in split.batches(batch_size))
    return right / len(split)


def cross_entropy(model, x, y):
    return F.cross_entropy(model(x), y)


def settings_of(obj) -> dict:
    return json.loads(json.dumps(asdict(obj)))
