"""`python -m esper_func.train`: runs `esper_func.rl.train_cli` (the training CLI)."""

import runpy

if __name__ == "__main__":
    runpy.run_module("esper_func.rl.train_cli", run_name="__main__", alter_sys=True)
