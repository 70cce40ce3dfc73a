"""`python -m esper_func.evaluate`: runs `esper_func.rl.evaluate_cli` (the controller comparison CLI)."""

import runpy

if __name__ == "__main__":
    runpy.run_module("esper_func.rl.evaluate_cli", run_name="__main__", alter_sys=True)
