"""``python -m bench.run [-k TEXT ...] [--only kernels,train,batch,sample] [--json PATH]``: the bench suite
without pytest-benchmark. It runs the very ``CASES``/``build`` of bench/test_*.py through the same
``bench.common.run`` (guard, timing, extra_info) with a plain timer, writes pytest-benchmark-shaped
JSON, and prints bench.report's tables. Exit status 1 if any case failed (a guard included)."""
from __future__ import annotations

import argparse
import importlib
import json
import sys
import traceback
from pathlib import Path

from bench import common

MODULES = {"kernels": "test_kernels", "train": "test_train_step", "batch": "test_train_batch",
           "sample": "test_sampling"}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n\n")[0])
    p.add_argument("-k", action="append", default=[], help="run only the cases whose name contains TEXT (repeat: all)")
    p.add_argument("--only", default=",".join(MODULES), help=f"workload modules, of {','.join(MODULES)}")
    p.add_argument("--json", help="write the results here (default: print the report only)")
    a = p.parse_args(argv)
    common.configure()
    results, failed, skipped = [], [], []
    for part in a.only.split(","):
        if part not in MODULES:
            p.error(f"--only {part}: choose from {', '.join(MODULES)}")
        mod = importlib.import_module(f"bench.{MODULES[part]}")
        for params in mod.CASES:
            name = f"{MODULES[part]}[{common.case_id(params)}]"
            if not all(k in name for k in a.k):
                continue
            timer = common.Timer(name)
            try:
                common.run(timer, lambda: mod.build(**params), impl=params.get("impl", ""))
            except common.Unavailable as e:
                skipped.append(name)
                print(f"SKIP {name}: {e.reason}", flush=True)
                continue
            except Exception as e:  # noqa: BLE001 - report, go on with the other cases
                failed.append(name)
                print(f"FAIL {name}: {type(e).__name__}: {e}", flush=True)
                traceback.print_exc(limit=3)
                continue
            info = timer.extra_info
            print(f"ok   {name}: {timer.stats['median'] * 1e3:.3f} ms/call, "
                  f"{info['items_per_s'] or 0:,.0f} {info['unit']}/s", flush=True)
            results.append({"name": name, "fullname": f"bench/{MODULES[part]}.py::{name}", "group": timer.group,
                            "params": {"params": params}, "extra_info": info, "stats": timer.stats})
    doc = common.results_json(results)
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(doc, indent=1, default=str))
    from bench.report import render

    print(render(results, doc))
    print(f"{len(results)} passed, {len(failed)} failed, {len(skipped)} skipped")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
