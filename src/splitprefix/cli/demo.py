"""`splitprefix demo`: the whole system on the shipped model, with a report."""

from __future__ import annotations

from pathlib import Path

import typer


def demo_command(
    out: Path = typer.Option(
        Path("demo"), "--out", help="Folder for report.md, report.html, plots and results.json."
    ),
    parties: int = typer.Option(
        3, "--parties", help="Data parties, each with a label-skewed share of the task."
    ),
    quick: bool = typer.Option(
        False, "--quick", help="Small budgets: about 2 minutes instead of 10 on 2 cores."
    ),
) -> None:
    """Run the model party, N data parties (offsite, split, federation), generation and a report, on `builtin`."""
    import logging
    import os

    from transformers.utils import logging as hf_logging

    from splitprefix import interrupts
    from splitprefix.demo.config import DemoConfig
    from splitprefix.extras import require

    for module in ("flwr.simulation", "matplotlib"):
        require(module, "splitprefix demo", extra="demo")
    from splitprefix.demo.run import run_demo

    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # for the server child: idle threads must sleep
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # no bar per model load, here or in Ray
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("flwr").setLevel(logging.WARNING)
    hf_logging.disable_progress_bar()
    try:
        run_demo(DemoConfig.preset(str(out), parties, quick), echo=typer.echo)
    except KeyboardInterrupt:
        typer.echo("interrupted; the model-party server has been stopped", err=True)
        interrupts.exit_now(130)
