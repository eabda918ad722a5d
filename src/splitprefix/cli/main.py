"""The `splitprefix` command. Each command is a thin wrapper over one library function."""

import typer

from splitprefix.cli.audit import privacy_audit_command
from splitprefix.cli.data import make_data_command
from splitprefix.cli.demo import demo_command
from splitprefix.cli.evaluate import eval_command
from splitprefix.cli.federate import federate_command
from splitprefix.cli.generate import gateway_command, generate_command
from splitprefix.cli.offsite import emulate_command, integrate_command, train_offsite_command
from splitprefix.cli.pretrain import pretrain_command
from splitprefix.cli.serve import serve_command
from splitprefix.cli.train import train_command

app = typer.Typer(
    name="splitprefix",
    help="Split prefix-tuning of a causal LM between a model party and data parties.",
    no_args_is_help=True,
    add_completion=False,
)


@app.callback()
def _group() -> None:
    """Split prefix-tuning of a causal LM between a model party and data parties."""


@app.command()
def info(
    model: str | None = typer.Argument(
        None,
        help="Model directory, or 'builtin' for the shipped model; omit it to list the supported families.",
    ),
) -> None:
    """Print the architecture, layer count and prefix layout of MODEL as JSON, or the supported families."""
    import json

    from splitprefix.model.loading import describe_model
    from splitprefix.model.registry import supported_architectures

    report = (
        describe_model(model) if model is not None else {"supported_architectures": supported_architectures()}
    )
    typer.echo(json.dumps(report, indent=2))


app.command(name="make-data")(make_data_command)
app.command(name="pretrain")(pretrain_command)
app.command(name="eval")(eval_command)
app.command(name="emulate")(emulate_command)
app.command(name="train-offsite")(train_offsite_command)
app.command(name="integrate")(integrate_command)
app.command(name="train")(train_command)
app.command(name="serve")(serve_command)
app.command(name="federate")(federate_command)
app.command(name="generate")(generate_command)
app.command(name="gateway")(gateway_command)
app.command(name="privacy-audit")(privacy_audit_command)
app.command(name="demo")(demo_command)


def main() -> None:
    """Console entry point: user mistakes print one clear line instead of a traceback."""
    from splitprefix.errors import SplitPrefixError

    try:
        app()
    except (SplitPrefixError, FileNotFoundError) as error:
        typer.echo(f"error: {error}", err=True)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
