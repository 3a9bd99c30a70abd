"""The order every model command follows: check options and inputs without torch, guard the
outputs, then load models (strict, finite) and data (the checkpoint's by default), and check that
the model takes the data — all before the work starts."""

from __future__ import annotations

from dataclasses import dataclass, field

from neuralign.cli import _data
from neuralign.cli._common import fail
from neuralign.cli._guard import Output, check_outputs
from neuralign.cli._inputs import check_data_name, check_device, device_available
from neuralign.cli._models import ModelArgs, check_accepts, load_all, precheck, read_infos

# One set of training defaults for train and finetune.
EPOCHS, LR, BATCH_SIZE, WEIGHT_DECAY = 10, 0.05, 128, 5e-4
EVAL_BATCH_SIZE = 256


@dataclass
class Inputs:
    paths: list[str]
    models: list = field(default_factory=list)
    infos: list = field(default_factory=list)
    data: str | None = None
    data_seed: int = 0
    splits: object = None


def data_input_paths(data: str | None) -> list[str]:
    if data and ":" in data and data.split(":", 1)[0] in ("imagefolder", "npz", "hf-disk"):
        return [data.split(":", 1)[1]]
    return []


def prepare(paths, margs: ModelArgs, dargs: _data.DataArgs, outputs=(), *, force=False,
            device=None, extra_inputs=()) -> None:
    """Torch-free: options, input files, data name, outputs."""
    check_device(device)
    check_data_name(dargs.data)
    precheck(paths, margs)
    check_outputs(list(outputs), [*paths, *extra_inputs, *data_input_paths(dargs.data)],
                  force=force)


def open_inputs(paths, margs: ModelArgs, dargs: _data.DataArgs, *, need_data=True, device=None,
                check_fit=True) -> Inputs:
    """Load the models and the data (the checkpoints' by default)."""
    device_available(device)
    inp = Inputs(list(paths))
    inp.infos = read_infos(paths)
    inp.models = load_all(paths, margs, inp.infos, device=device)
    inp.data, inp.data_seed = _data.resolve(dargs, inp.infos, required=need_data, paths=paths)
    if inp.data is not None:
        tok = _data.tokenizer_for(paths, inp.infos, margs.arch)
        inp.splits = _data.load(inp.data, inp.data_seed, dargs,
                                model_image_size=_data.model_image_size(inp.infos),
                                tokenizer=tok)
        if check_fit:
            x = _data.example_batch(inp.splits)
            if device is not None:
                x = x.to(device)
            for p, m in zip(paths, inp.models):
                check_accepts(m, x, p, need_scores=check_fit != "run")
            if check_fit != "run":
                check_classes(inp, paths)
    return inp


def check_classes(inp: Inputs, paths) -> None:
    """A model with fewer outputs than the data has classes gives meaningless accuracies."""
    import torch

    x = _data.example_batch(inp.splits)
    dev = next(iter(inp.models[0].parameters()), torch.zeros(0)).device
    with torch.no_grad():
        out = inp.models[0](x.to(dev))
    if out.dim() == 2 and out.shape[1] < inp.splits.num_classes:
        fail(f"{paths[0]} has {out.shape[1]} outputs but {inp.data} has "
             f"{inp.splits.num_classes} classes")
    if out.dim() == 2 and out.shape[1] > inp.splits.num_classes:
        from neuralign.cli._common import warn

        warn(f"{paths[0]} has {out.shape[1]} outputs but {inp.data} has "
             f"{inp.splits.num_classes} classes: predictions of the other classes count as "
             "errors (for your own head: --arch ... -m num_classes=K)")


def loaders(inp: Inputs, batch_size: int = EVAL_BATCH_SIZE, fit_batches: int | None = None):
    """(fit loader on training data, evaluation loader on the validation split)."""
    if inp.splits is None:
        return None, None
    fit = inp.splits.loader("train", batch_size, shuffle=False)
    if fit_batches is not None:
        fit = [b for _, b in zip(range(fit_batches), fit)]
    return fit, inp.splits.loader("val", batch_size, shuffle=False)


def model_output(flag: str, path: str | None, command: str) -> Output:
    return Output(flag, path, "model", command)


def plot_output(path: str | None) -> Output:
    return Output("--plot", path, "plot")
