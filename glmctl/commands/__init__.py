"""One module per command group: ``register(app)`` adds its typer commands to the root app."""
