"""The pipeline stages, installed as ``glmctl.stages``: plain functions and dataclasses, no typer."""
