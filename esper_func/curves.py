"""`python -m esper_func.curves`: runs `esper_func.rl.curves_cli` (did these PPO runs learn?)."""

import runpy

if __name__ == "__main__":
    runpy.run_module("esper_func.rl.curves_cli", run_name="__main__", alter_sys=True)
