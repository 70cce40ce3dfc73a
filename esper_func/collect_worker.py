"""`python -m esper_func.collect_worker`: runs `esper_func.rl.collect_worker` (a distributed collection worker)."""

import runpy

if __name__ == "__main__":
    runpy.run_module("esper_func.rl.collect_worker", run_name="__main__", alter_sys=True)
