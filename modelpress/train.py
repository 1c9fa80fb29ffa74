"""The one training loop every method shares: supervised training, distillation, evaluation,
BatchNorm re-estimation. Pure PyTorch."""

from __future__ import annotations

import math
from typing import Any, Callable, Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from . import inputs as model_inputs
from .progress import Progress, log


def resolve_device(device: str = "auto") -> torch.device:
    """'auto' picks CUDA when present, else CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def loader(dataset: Dataset, batch_size: int, shuffle: bool, seed: int = 0) -> DataLoader:
    gen = torch.Generator().manual_seed(seed) if shuffle else None
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=gen, drop_last=shuffle)


def reseed(batches: DataLoader, seed: int) -> None:
    """Restart a shuffling loader's order from ``seed`` (the same batches on every re-run)."""
    gen = getattr(batches, "generator", None)
    if gen is not None:
        gen.manual_seed(seed)


def cosine_lr(step: int, total: int, warmup: int = 0) -> float:
    """LR multiplier: linear warm-up, then cosine decay to 0 over ``total`` steps."""
    if step < warmup:
        return (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, t)))


def lr_multiplier(schedule: str, steps: int, full: int, warmup_frac: float = 0.0) -> Callable[[int], float]:
    """LR multiplier of step s of a run of ``steps`` steps that replays the last ``steps`` of a
    ``full``-step schedule (``full == steps``: the whole schedule, warm-up included)."""
    if schedule == "cosine":
        offset, warmup = full - steps, int(warmup_frac * full)
        return lambda s: cosine_lr(s + offset, full, warmup)
    if schedule == "constant":
        return lambda s: 1.0
    raise ValueError(f"unknown schedule {schedule!r}")


def fit(
    model: nn.Module,
    params: Iterable[torch.nn.Parameter],
    batches: DataLoader,
    loss_fn: Callable[..., torch.Tensor],  # (inputs, labels) -> loss
    epochs: float,
    lr: float,
    optimizer: str = "adamw",
    weight_decay: float = 0.0,
    warmup_frac: float = 0.0,
    stage: str = "train",
    device: torch.device | None = None,
    train_mode: bool = True,
    schedule: str = "cosine",
    schedule_epochs: float | None = None,
    on_step: Callable[[int, int], None] | None = None,
    on_epoch: Callable[[dict], None] | None = None,
    resume: dict | None = None,
    dropout: bool = True,
) -> list[float]:
    """Minimise ``loss_fn(x, y)`` over ``params`` for ``epochs`` passes (fractions allowed).
    Returns the loss of each step.

    ``schedule="cosine"``: linear warm-up then cosine decay. With ``schedule_epochs`` (the
    length of an original schedule, >= ``epochs``) only its *last* ``epochs`` are replayed:
    learning-rate rewinding. ``schedule="constant"``: ``lr`` throughout (plain fine-tuning).
    ``on_step(step, total)`` runs after every optimizer step (e.g. to keep snapshots).
    ``on_epoch(state)`` runs at every epoch boundary with everything a resumed run needs (model,
    optimizer, schedule, step, losses, the loader's shuffle state); ``fit(..., resume=state)``
    continues from it and ends with the same weights as a run that never stopped.
    ``dropout=False``: dropout stays off while the rest trains (distilling a compressed model,
    whose every output should match the teacher's). Inputs may be tensors, tuples or dicts
    (modelpress.inputs).
    """
    device = device or next(model.parameters()).device
    params = [p for p in params if p.requires_grad]
    opt: torch.optim.Optimizer
    if optimizer == "sgd":
        opt = torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=weight_decay, nesterov=True)
    elif optimizer == "adamw":
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    else:
        raise ValueError(f"unknown optimizer {optimizer!r}")
    total = max(1, int(round(epochs * len(batches))))
    full = max(total, int(round((schedule_epochs or epochs) * len(batches))))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_multiplier(schedule, total, full, warmup_frac))
    model.train(train_mode)
    if not dropout:
        dropout_off(model)
    prog, losses, step = Progress(stage, total), [], 0
    gen = getattr(batches, "generator", None)
    if resume is not None:
        model.load_state_dict(resume["model"])
        opt.load_state_dict(resume["optimizer"])
        sched.load_state_dict(resume["schedule"])
        step, losses = int(resume["step"]), list(resume["losses"])
        if gen is not None:
            gen.set_state(resume["generator"])
        if resume.get("rng") is not None:  # dropout's draws
            torch.set_rng_state(resume["rng"])
        if resume.get("cuda_rng") is not None and torch.cuda.is_available():  # (on the GPU, from its own generators)
            torch.cuda.set_rng_state_all(list(resume["cuda_rng"]))
        log.info("%s: resuming at step %d of %d", stage, step, total)
    while step < total:
        if on_epoch is not None and step > 0 and (resume is None or step != int(resume["step"])):
            on_epoch({"model": model.state_dict(), "optimizer": opt.state_dict(), "schedule": sched.state_dict(),
                      "step": step, "losses": losses, "generator": gen.get_state() if gen is not None else None,
                      "rng": torch.get_rng_state(),
                      "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None})
        resume = None
        for x, y in batches:
            x, y = model_inputs.to(x, device), y.to(device, non_blocking=True)
            loss = loss_fn(x, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(loss.item())
            step += 1
            prog.update(loss=sum(losses[-20:]) / len(losses[-20:]), lr=float(sched.get_last_lr()[0]))
            if on_step is not None:
                on_step(step, total)
            if step >= total:
                break
    model.eval()
    return losses


def is_bias_or_norm(model: nn.Module, name: str) -> bool:
    """A parameter that fine-tuning trains besides what a method makes trainable: a bias (an
    attention's in_proj_bias too) or a BatchNorm or LayerNorm parameter (not the dense weight of
    a layer left unquantized)."""
    owner = model.get_submodule(name.rpartition(".")[0])
    return name.endswith((".bias", "_bias")) or isinstance(owner, (nn.modules.batchnorm._BatchNorm, nn.LayerNorm))


def dropout_off(model: nn.Module) -> None:
    """Put every dropout of a model (its Dropout modules, the attention dropout of its
    nn.MultiheadAttention) in eval mode; the rest keeps its mode."""
    for m in model.modules():
        if isinstance(m, (nn.modules.dropout._DropoutNd, nn.MultiheadAttention)):
            m.eval()


LOSSES = ("kl", "mse", "cosine")
OUTPUT_KEYS = ("logits", "sentence_embedding", "pooler_output", "last_hidden_state")


def output_tensor(out) -> torch.Tensor:
    """What a distillation compares of a model's output: the tensor itself, the first element of
    a tuple, or of a mapping (a Hugging Face ModelOutput) its logits, else its sentence embedding,
    pooled output or last hidden state."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, dict):
        for key in OUTPUT_KEYS:
            if isinstance(out.get(key), torch.Tensor):
                return out[key]
        out = list(out.values())
    if isinstance(out, (tuple, list)) and out:
        return output_tensor(out[0])
    raise TypeError(f"cannot distil a model output of type {type(out).__name__}")


def distill_loss(student_out, teacher_out, temperature: float = 1.0, kind: str = "kl") -> torch.Tensor:
    """The student's distance to the teacher's outputs (see output_tensor):

    - ``kl``: KL(teacher || student) on temperature-softened logits, scaled by T^2 (Hinton et al.);
      over the last dimension (per token for (batch, tokens, classes) logits);
    - ``mse``: mean squared error (embeddings, hidden states);
    - ``cosine``: 1 - cosine similarity over the last dimension, averaged (embeddings)."""
    s, t_out = output_tensor(student_out), output_tensor(teacher_out)
    if kind == "kl":
        t = temperature
        if s.dim() != 2:
            s, t_out = s.reshape(-1, s.shape[-1]), t_out.reshape(-1, t_out.shape[-1])
        return F.kl_div(F.log_softmax(s / t, 1), F.log_softmax(t_out / t, 1), log_target=True, reduction="batchmean") * (t * t)
    if kind == "mse":
        return F.mse_loss(s.float(), t_out.float())
    if kind == "cosine":
        return (1 - F.cosine_similarity(s.float(), t_out.float(), dim=-1)).mean()
    raise ValueError(f"unknown distillation loss {kind!r} (one of {', '.join(LOSSES)})")


def as_loss(loss: str | Callable, temperature: float = 1.0) -> Callable[[Any, Any], torch.Tensor]:
    """A distillation loss as a function (student output, teacher output) -> loss: a
    :func:`distill_loss` kind at ``temperature``, or the function itself."""
    if callable(loss):
        return loss
    if loss not in LOSSES:
        raise ValueError(f"unknown distillation loss {loss!r} (one of {', '.join(LOSSES)})")
    return lambda s, t: distill_loss(s, t, temperature, loss)


def flip_and_crop(x: torch.Tensor, pad: int = 4, generator: torch.Generator | None = None) -> torch.Tensor:
    """The standard CIFAR augmentation on a whole batch: each image flipped left-right with
    probability 1/2, then cropped back to its size at a random offset after zero padding by
    ``pad`` pixels (zero = the data set's mean, inputs being normalised)."""
    n, c, h, w = x.shape
    flip = (torch.rand(n, generator=generator) < 0.5).to(x.device)
    x = torch.where(flip.view(n, 1, 1, 1), x.flip(3), x)
    padded = F.pad(x, (pad, pad, pad, pad))
    dy, dx = (torch.randint(0, 2 * pad + 1, (n, 1), generator=generator).to(x.device) for _ in range(2))
    rows = (dy + torch.arange(h, device=x.device))[:, None, :, None]
    cols = (dx + torch.arange(w, device=x.device))[:, None, None, :]
    return padded[torch.arange(n, device=x.device)[:, None, None, None], torch.arange(c, device=x.device)[None, :, None, None],
                  rows, cols]


def distill(
    student: nn.Module,
    teacher: nn.Module,
    batches: DataLoader,
    params: Iterable[torch.nn.Parameter],
    epochs: float,
    lr: float,
    temperature: float = 1.0,
    stage: str = "distill",
    train_mode: bool = True,
    augment: bool = False,
    seed: int = 0,
    loss: str | Callable = "kl",
    **kw,
) -> list[float]:
    """Fit ``params`` of the student to the teacher's outputs. Labels are never used.
    ``augment``: both see the same flipped and shifted images (:func:`flip_and_crop`), so the
    student matches the teacher on more of its input space than the training set itself.
    ``loss``: a :func:`distill_loss` kind (``kl`` on logits, ``mse`` or ``cosine`` on embeddings)
    or a function (student output, teacher output) -> loss. Inputs of any structure
    (modelpress.inputs: a dict of input_ids and attention_mask...)."""
    teacher.eval()
    gen = torch.Generator().manual_seed(seed)
    if not callable(loss) and loss not in LOSSES:
        raise ValueError(f"unknown distillation loss {loss!r} (one of {', '.join(LOSSES)})")
    on_epoch, resume = kw.pop("on_epoch", None), kw.get("resume")
    if on_epoch is not None:  # the augmentation's draws too, so that a resumed run sees the same images
        kw["on_epoch"] = lambda state: on_epoch({**state, "augment": gen.get_state()})
    if resume is not None and resume.get("augment") is not None:
        gen.set_state(resume["augment"])

    def loss_fn(x, _y):
        if augment:
            x = flip_and_crop(x, generator=gen)
        with torch.no_grad():
            t_out = model_inputs.call(teacher, x)
        s_out = model_inputs.call(student, x)
        return loss(s_out, t_out) if callable(loss) else distill_loss(s_out, t_out, temperature, loss)

    return fit(student, params, batches, loss_fn, epochs, lr, stage=stage, train_mode=train_mode, **kw)


def train_classifier(model: nn.Module, batches: DataLoader, epochs: float, lr: float, **kw) -> list[float]:
    """Plain supervised training with cross-entropy (used to make a teacher)."""
    return fit(model, model.parameters(), batches, lambda x, y: F.cross_entropy(model(x), y), epochs, lr, **kw)


@torch.no_grad()
def predict(model: nn.Module, batches: DataLoader, device: torch.device | None = None) -> torch.Tensor:
    """Logits for every sample, in order (inputs of any structure; a Hugging Face output's logits)."""
    device = device or next(model.parameters()).device
    model.eval()
    return torch.cat([output_tensor(model_inputs.call(model, model_inputs.to(x, device))).float().cpu() for x, _ in batches])


@torch.no_grad()
def evaluate(model: nn.Module, batches: DataLoader, device: torch.device | None = None) -> float:
    """Top-1 accuracy in percent (inputs of any structure; a Hugging Face output's logits)."""
    device = device or next(model.parameters()).device
    model.eval()
    correct = total = 0
    for x, y in batches:
        out = output_tensor(model_inputs.call(model, model_inputs.to(x, device)))
        correct += int((out.argmax(1).cpu() == y).sum())
        total += len(y)
    return 100.0 * correct / total


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, batches: DataLoader, max_batches: int = 100) -> None:
    """Re-estimate BatchNorm running statistics of the (compressed) model on real inputs.

    Uses a cumulative average (momentum=None) over ``max_batches`` batches.
    """
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return
    device = next(model.parameters()).device
    saved = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    for i, (x, _) in enumerate(batches):
        if i >= max_batches:
            break
        model(x.to(device))
    for m, mom in zip(bns, saved):
        m.momentum = mom
    model.eval()
