"""``neuralign cka A B``: layer × layer CKA between two models."""

from __future__ import annotations

import typer

from neuralign.cli import _data, _flow
from neuralign.cli._common import (
    ARCH_OPT,
    DATA_OPT_HELP,
    DATA_ROOT_OPT,
    DATA_SEED_OPT,
    DEVICE_OPT,
    FORCE_OPT,
    IMAGE_SIZE_OPT,
    JSON_OPT,
    MODEL_KW_OPT,
    PICKLE_OPT,
    TEST_DOMAIN_OPT,
    Report,
)
from neuralign.cli._inputs import check_choice, check_range
from neuralign.cli._models import ModelArgs


def register(app: typer.Typer) -> None:
    @app.command("cka")
    def cka_cmd(
        a: str = typer.Argument(...), b: str = typer.Argument(...),
        data: str = typer.Option(None, help=DATA_OPT_HELP),
        data_seed: int = DATA_SEED_OPT,
        data_root: str = DATA_ROOT_OPT,
        image_size: int = IMAGE_SIZE_OPT,
        test_domain: str = TEST_DOMAIN_OPT,
        kernel: str = typer.Option("linear", help="linear or rbf"),
        examples: int = typer.Option(512, help="examples of the validation split (>= 4)"),
        layers: str = typer.Option(None, help="comma-separated module names (default: blocks)"),
        plot: str = typer.Option(None, help="write the heat-map to this .png"),
        seed: int = typer.Option(0),
        arch: str = ARCH_OPT,
        model_option: list[str] = MODEL_KW_OPT,
        allow_pickle: bool = PICKLE_OPT,
        device: str = DEVICE_OPT,
        force: bool = FORCE_OPT,
        json_: bool = JSON_OPT,
    ) -> None:
        """CKA (Kornblith et al.) between the layers of A and B on validation data."""
        rep = Report(json_)
        kernel = check_choice(kernel, ("linear", "rbf"), "--kernel")
        # CKA centres the Gram matrices: fewer than 4 examples leave (almost) nothing to compare.
        check_range(examples, "--examples", lo=4)
        names = [n.strip() for n in layers.split(",") if n.strip()] if layers else None
        margs = ModelArgs(arch, model_option, allow_pickle)
        dargs = _data.DataArgs(data, data_seed, data_root, image_size, test_domain)
        _flow.prepare([a, b], margs, dargs, [_flow.plot_output(plot)], force=force,
                      device=device)
        with rep.running():
            from neuralign.landscape import layer_cka

            inp = _flow.open_inputs([a, b], margs, dargs, device=device)
            _, val = _flow.loaders(inp)
            if names:
                for path, m in zip((a, b), inp.models):
                    have = dict(m.named_modules())
                    missing = [n for n in names if n not in have]
                    if missing:
                        from neuralign.cli._common import fail

                        fail(f"--layers: {path} has no module {missing[0]!r}")
            m, la, lb = layer_cka(inp.models[0], inp.models[1], val, layers_a=names,
                                  layers_b=names, kernel=kernel, n_examples=examples)
            matrix = [[float(x) for x in row] for row in m]
            rep.table(f"CKA ({kernel})", ["A \\ B", *lb],
                      [[n, *row] for n, row in zip(la, matrix)])
            if plot:
                from neuralign.landscape.plots import plot_cka

                plot_cka(m, la, lb, plot, title=f"CKA ({kernel})")
                rep.note(f"wrote {plot}")
            rep.data.update(a=a, b=b, kernel=kernel, data=inp.data, data_seed=inp.data_seed,
                            layers_a=list(la), layers_b=list(lb), cka=matrix, plot=plot)
