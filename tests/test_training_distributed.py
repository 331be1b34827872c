"""``torchrun --nproc_per_node=2`` with gloo on CPU: DDP keeps ranks identical; FSDP2 (stopped and
resumed from its checkpoint on the way) trains the same."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

WORKER = textwrap.dedent("""
    import hashlib, json, sys
    import torch
    from training import distributed, train

    out, slide = sys.argv[1], sys.argv[2]
    rank, world, _ = distributed.init_distributed("gloo")  # owned here, so main() leaves it open
    report = {}
    def run(strategy, stop, *extra):
        return train.main(["--config", "smoke", "--output-dir", f"{out}/{strategy}", f"data.slides=[{slide}]",
                           "data.synth.count=0", f"distributed.strategy={strategy}", f"train.stop_at_iteration={stop}",
                           "train.log_period=1", *extra])

    for strategy in ("ddp", "fsdp"):
        if strategy == "fsdp":  # FSDP stops after 2 steps and resumes from its sharded-then-gathered checkpoint
            first = run(strategy, 2, "--no-resume").metrics.history
            res = run(strategy, 3)
            res.metrics.history[:0] = first
        else:
            res = run(strategy, 3, "--no-resume")
        digest = hashlib.sha256()
        local_numel = 0
        for name, p in sorted(res.model.student.state_dict().items()) + sorted(res.model.teacher.state_dict().items()):
            local = distributed.local_tensor(p).detach().contiguous()
            local_numel += local.numel()
            digest.update(name.encode() + local.numpy().tobytes())
        full_numel = sum(v.numel() for v in distributed.model_state_dict(res.model.student).values())
        report[strategy] = {"digest": digest.hexdigest(), "local_numel": local_numel, "full_student_numel": full_numel,
                            "totals": [h["total"] for h in res.metrics.history]}
    reports = distributed.gather_objects(report)
    if rank == 0:
        with open(f"{out}/report.json", "w") as f:
            json.dump(reports, f)
    distributed.destroy()
""")


@pytest.mark.slow
def test_torchrun_two_cpu_ranks_ddp_and_fsdp(slide_factory, tmp_path: Path) -> None:
    slide = slide_factory(size=(1024, 1024), mpp=0.5, seed=3)
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER)
    env = os.environ | {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(worker), str(tmp_path), str(slide)], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("[rank") or "Error" in ln]
    assert proc.returncode == 0, "\n".join(errors[-40:]) or proc.stderr[-3000:]
    r0, r1 = json.loads((tmp_path / "report.json").read_text())
    assert r0["ddp"]["digest"] == r1["ddp"]["digest"]               # DDP: identical replicas after the steps
    assert len(r0["ddp"]["totals"]) == 3 and r0["ddp"]["totals"] != r1["ddp"]["totals"]  # each rank its own data
    assert r0["fsdp"]["local_numel"] < r0["ddp"]["local_numel"]     # FSDP: each rank holds shards
    assert r0["fsdp"]["digest"] != r1["fsdp"]["digest"]
    # Same data, same maths: FSDP's losses track DDP's (reduction order differs, so not bit-exact).
    for a, b in zip(r0["fsdp"]["totals"] + r1["fsdp"]["totals"], r0["ddp"]["totals"] + r1["ddp"]["totals"]):
        assert abs(a - b) <= 1e-3 * abs(b)
