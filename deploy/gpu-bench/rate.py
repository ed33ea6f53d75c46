"""A run's training rate and step profile from its metrics.jsonl: pairs/s over the steps after the
first (wall clock from the steps' `elapsed` stamps when logged, else the sum of their `seconds`), the
losses, and the mean seconds of each phase of the step profile (docs/design.md §14)."""
import json, sys

PHASES = ["data", "forward", "backward", "gather", "reduce", "optimizer", "sync"]
s = [json.loads(l) for l in open(sys.argv[1])]
s = [r for r in s if r.get("event") == "step"]
t = s[1:]
pairs = sum(r["pairs"] for r in t)
if all("elapsed" in r for r in s):
    seconds = s[-1]["elapsed"] - s[0]["elapsed"]
else:
    seconds = sum(r["seconds"] for r in t)
profile = {p: round(sum(r.get(p + "_seconds", 0.0) for r in t) / len(t), 5) for p in PHASES}
print(json.dumps({"steps": len(s), "pairs_per_s_after_first": pairs / seconds,
                  "step_seconds": round(seconds / len(t), 5), "profile": profile,
                  "first_loss": s[0]["loss"], "last_loss": s[-1]["loss"],
                  "losses": [round(r["loss"], 6) for r in s]}))
