"""The per-kernel resource table of `make cuda-check`: reads the `-Xptxas -v` output in the given nvcc logs and prints
registers, the 256-thread blocks an SM can hold with them (and the static shared memory), stack frame, spills and
static shared memory per kernel and arch, most registers first. Exits non-zero when a kernel spills more than
--max-spill bytes (stores or loads) or uses more than 48 KiB of static shared memory.

usage: ptxas_table.py [--max-spill BYTES] LOG...
"""
import argparse
import re
import subprocess
import sys

THREADS = 256             # every kernel's block (csrc/cuda/common.cuh kThreads)
REGS_PER_SM = 65536
MAX_THREADS_PER_SM = 2048
SMEM_PER_SM = 227 * 1024  # sm_80 / sm_90 (164 KiB on sm_80 is still more than any kernel here can fill)
STATIC_SMEM_LIMIT = 48 * 1024


def parse(path):
    rows, cur = [], None
    for line in open(path, errors="replace"):
        m = re.search(r"Compiling entry function '(\S+)' for '(sm_\d+)'", line)
        if m:
            cur = {"mangled": m.group(1), "arch": m.group(2), "stack": 0, "spill_st": 0, "spill_ld": 0, "smem": 0}
            continue
        if cur is None:
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m:
            cur["stack"], cur["spill_st"], cur["spill_ld"] = map(int, m.groups())
        m = re.search(r"Used (\d+) registers", line)
        if m:
            cur["regs"] = int(m.group(1))
            m2 = re.search(r"(\d+) bytes smem", line)
            cur["smem"] = int(m2.group(1)) if m2 else 0
            rows.append(cur)
            cur = None
    return rows


def blocks_per_sm(regs, smem):
    # Registers are allocated per warp in units of 256.
    per_warp = -(-regs * 32 // 256) * 256
    warps = REGS_PER_SM // per_warp if per_warp else MAX_THREADS_PER_SM // 32
    blocks = min(warps // (THREADS // 32), MAX_THREADS_PER_SM // THREADS)
    if smem:
        blocks = min(blocks, SMEM_PER_SM // smem)
    return blocks


def short(name):
    name = name.replace("(anonymous namespace)::", "").replace("bnfused::cuda::", "").replace("bnfused::", "").replace("c10::", "")
    depth, out = 0, []
    for ch in name:  # keep the template arguments, drop the parameter list
        if ch == "(" and depth == 0:
            break
        depth += ch == "<"
        depth -= ch == ">"
        out.append(ch)
    return "".join(out).replace("void ", "", 1)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--max-spill", type=int, default=0)
    ap.add_argument("logs", nargs="+")
    args = ap.parse_args()
    rows = [r for log in args.logs for r in parse(log)]
    names = subprocess.run(["c++filt"], input="\n".join(r["mangled"] for r in rows), capture_output=True,
                           text=True).stdout.split("\n")
    seen = {}
    for r, n in zip(rows, names):
        r["name"] = short(n)
        seen[(r["name"], r["arch"])] = r  # a kernel compiled in several files: one row
    rows = sorted(seen.values(), key=lambda r: (-r["regs"], r["name"], r["arch"]))
    bad = []
    print(f"{'regs':>4} {'blk/SM':>6} {'stack':>5} {'spill st/ld':>11} {'smem':>6}  arch   kernel")
    for r in rows:
        print(f"{r['regs']:>4} {blocks_per_sm(r['regs'], r['smem']):>6} {r['stack']:>5} "
              f"{r['spill_st']:>5}/{r['spill_ld']:<5} {r['smem']:>6}  {r['arch']:<6} {r['name']}")
        if max(r["spill_st"], r["spill_ld"]) > args.max_spill or r["smem"] > STATIC_SMEM_LIMIT:
            bad.append(r)
    for r in bad:
        print(f"FAIL  {r['name']} ({r['arch']}): {r['spill_st']} B spill stores, {r['spill_ld']} B spill loads "
              f"(at most {args.max_spill}), {r['smem']} B static shared memory", file=sys.stderr)
    return 1 if bad or not rows else 0


if __name__ == "__main__":
    sys.exit(main())
