"""The screen table: variant -> best validation mean AUC and the per-task AUCs at that checkpoint,
per seed and mean over seeds. Usage: python table.py SCREEN_DIR [name=GLOB_OF_valid_log.csv ...]"""

import csv
import glob
import re
import statistics as st
import sys

root = sys.argv[1] if len(sys.argv) > 1 else "runs/screen"
groups: dict[str, list[str]] = {}
for p in sorted(glob.glob(f"{root}/*/runs/*/*/seed*/valid_log.csv")):
    groups.setdefault(p[len(root) + 1 :].split("/")[0], []).append(p)
for extra in sys.argv[2:]:  # runs kept elsewhere, e.g. the Table 2 ones
    name, pattern = extra.split("=", 1)
    groups[name] = sorted(glob.glob(pattern))

print("| variant | seeds | valid AUC | per seed | click | long_view | like | best step / steps | wall s per run |")
print("|---|---|---|---|---|---|---|---|---|")
for name, paths in groups.items():
    res = []
    for p in paths:
        if not glob.glob(p.replace("valid_log.csv", "run.json")):
            continue  # unfinished
        v = list(csv.DictReader(open(p)))
        b = max(v, key=lambda r: float(r["mean_auc"]))
        seed = re.search(r"seed(\d+)", p).group(1)
        log = glob.glob(f"{root}/log_{name}_s{seed}.txt")
        wall = re.search(r"wall=(\d+)s", open(log[0]).read()).group(1) if log else "-"
        res.append((seed, *(float(b[k]) for k in ("mean_auc", "click_auc", "long_view_auc", "like_auc")),
                    f"{b['step']}/{v[-1]['step']}", wall))
    if not res:
        continue
    aucs = [r[1] for r in res]
    sd = f" ± {st.stdev(aucs):.4f}" if len(res) > 1 else ""
    tasks = " | ".join(f"{st.mean(r[i] for r in res):.4f}" for i in (2, 3, 4))
    print(f"| {name} | {' '.join(r[0] for r in res)} | {st.mean(aucs):.4f}{sd} | "
          f"{' / '.join(f'{a:.4f}' for a in aucs)} | {tasks} | {', '.join(r[5] for r in res)} | "
          f"{', '.join(r[6] for r in res)} |")
