"""Schedule: where the run stands in its LR schedule, and whether the logged LR follows the plan."""

from __future__ import annotations

import numpy as np

from nanochat.doctor import Finding, num
from nanochat.run_formats import Run


def _check_schedule_ours(run: Run, tolerance: float = 0.02) -> Finding:
    name = "schedule"
    sz = run.sizing
    steps, lr = run.series("lr")
    n_iter = num(sz.get("num_iterations"))
    all_steps = run.series("step")[1]
    if len(all_steps) == 0:
        return Finding(name, "skip", "no steps logged")
    # base_train logs `step` = optimizer steps done (1, 2, ...); a 0-based log counts one more
    done_steps = int(all_steps[-1]) + (1 if all_steps[0] == 0 else 0)
    last = done_steps - 1  # index of the last step taken
    nums = dict(step=done_steps, num_iterations=n_iter)
    if n_iter is None:
        return Finding(name, "skip", "run.json lacks sizing.num_iterations", nums)
    warm = int(num(sz.get("warmup_steps")) or 0)
    wd_ratio = num(sz.get("warmdown_ratio"))
    final = num(sz.get("final_lr_frac"))
    wd_steps = round((wd_ratio or 0) * n_iter)
    if last < warm:
        phase = f"warmup ({last + 1}/{warm} steps)"
    elif last <= n_iter - wd_steps:
        phase = f"constant LR (warmdown starts at step {int(n_iter - wd_steps)})"
    else:
        phase = f"warmdown ({(last - (n_iter - wd_steps)) / max(wd_steps, 1):.0%} through)"
    nums.update(phase=phase.split(" (")[0], warmup_steps=warm, warmdown_steps=wd_steps,
                progress=done_steps / n_iter, step=done_steps)
    notes, status = [], "ok"
    if len(lr) and wd_ratio is not None and final is not None:
        from nanochat.sizing import lr_multiplier

        expect = lambda s: lr_multiplier(int(s), int(n_iter), warm, wd_ratio, final)  # noqa: E731
        sched = {s: expect(s) for s in range(int(steps.min()) - 1, int(steps.max()) + 2)}
        # allow an off-by-one in how the loop numbers its steps
        diff = np.array([min(abs(v - sched[int(s) + d]) for d in (-1, 0, 1)) for s, v in zip(steps, lr)])
        nums["max_lr_deviation"] = float(diff.max())
        if diff.max() > tolerance:
            i = int(diff.argmax())
            status = "warn"
            notes.append(f"logged LR multiplier {lr[i]:.3f} at step {int(steps[i])} != schedule {expect(steps[i]):.3f}")
    if len(lr):
        nums["lr_multiplier"] = float(lr[-1])
    done = done_steps >= n_iter
    if not done:
        notes.append(f"stopped at step {done_steps} of {int(n_iter)} ({done_steps / n_iter:.0%})")
    summary = f"at step {done_steps}/{int(n_iter)}: {phase}" + ("; " + "; ".join(notes) if notes else "")
    advice = ""
    if status == "warn":
        advice = ("The LR the loop applied differs from the schedule it recorded: check the resume logic and "
                  "the schedule arguments.")
    elif not done:
        status = "info"
        advice = ("The run is unfinished: losses before the warmdown are higher than the run's final loss will be; "
                  "compare runs at their ends (or resume this one).")
    return Finding(name, status, summary, nums, advice)


def check_schedule(run: Run, tolerance: float = 0.02) -> Finding:
    if run.sizing.get("warmdown_ratio") is not None:  # nanochat's trapezoid, recorded in full
        return _check_schedule_ours(run, tolerance)
    name = "schedule"
    steps = run.series("step")[1]
    n_iter = num(run.sizing.get("num_iterations"))
    if len(steps) == 0:
        return Finding(name, "skip", "no steps logged")
    if n_iter is None:
        why = "; ".join(s for s in run.skipped if "config" in s)
        return Finding(name, "skip", f"the planned number of steps is not in the {run.format}" + (f" ({why})" if why else ""))
    done = int(steps[-1])
    lr = run.series("lr")[1]
    nums = dict(step=done, num_iterations=n_iter, progress=done / n_iter, schedule=run.sizing.get("schedule"),
                lr_multiplier=float(lr[-1]) if len(lr) else None)
    at = f"at step {done}/{int(n_iter)} ({done / n_iter:.0%})" + (f", LR at {lr[-1]:.2f}x its peak" if len(lr) else "")
    if done < n_iter - 1:
        return Finding(name, "info", at + ": unfinished", nums,
                       "Losses before the end of the LR decay are higher than the run's final loss will be; compare runs at their ends.")
    return Finding(name, "ok", at, nums)
