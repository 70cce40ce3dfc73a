"""`python -m esper_func.growth`: runs `esper_func.rl.growth` (the growth runs)."""

import runpy

if __name__ == "__main__":
    runpy.run_module("esper_func.rl.growth", run_name="__main__", alter_sys=True)
