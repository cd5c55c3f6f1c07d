"""What the console scripts share: one-line user errors (``cli_errors``, all four commands); option
declarations (``options``) and terminal output (``console``) of fact-generate and fact-evaluate."""
