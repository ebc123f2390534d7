"""The research wing: the model-level benchmark and the one-GPU interference study. It builds on the core and
the core never imports it (only the CLI does)."""
