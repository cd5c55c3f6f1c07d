"""What the console scripts share: one-line user errors and the runner every Typer command goes through
(``cli_errors``: parser errors, signals); option declarations with checked numbers (``options``, ranges from
``fact_lightning.checks``) and terminal output (``console``) of fact-generate and fact-evaluate."""
