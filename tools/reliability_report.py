#!/usr/bin/env python
"""Run the fault-injection tests and render docs/RELIABILITY.md from what they observed.

    python tools/reliability_report.py            # runs pytest on the fault tests, writes the doc

It includes a test that starts a SLURM cluster on localhost: on a shared machine, run it as
``flock /tmp/slurm.lock python tools/reliability_report.py``.

Each test records its figures (steps lost, seconds to detect, samples skipped) as JSON
lines through ``conftest.record``; nothing in the table is typed in by hand.
"""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

FAULTS = [
    ("rank_dies", "A rank dies", "SIGKILL one of 2 gloo ranks right after the step-3 checkpoint (mid-step 4)",
     "tests/test_checkpoint.py::test_rank_sigkilled_mid_step_then_relaunch_equals_uninterrupted"),
    ("preemption", "Preemption", "SIGUSR1 delivered to the training process while it runs",
     "tests/test_faults.py::test_stop_signal_checkpoints_and_exits_for_requeue"),
    ("storage_full", "Disk full while checkpointing",
     "torch.save raises ENOSPC for every file of the step-4 checkpoint",
     "tests/test_faults.py::test_storage_fault_mid_checkpoint_keeps_previous_intact"),
    ("bad_data", "Bad data at scale",
     "10% of samples broken (7 kinds, rotating) + one unreadable shard file, 2 workers",
     "tests/test_faults.py::test_bad_data_at_scale_is_skipped_counted_and_training_finishes"),
    ("nan_step", "Non-finite loss, once", "the loss of step 3 made NaN (the test wraps the trainer's step)",
     "tests/test_faults.py::test_nan_loss_step_is_skipped_and_counted"),
    ("nan_consecutive", "Non-finite loss, K times in a row", "losses of steps 3-5 made NaN, train.max_bad_steps=3",
     "tests/test_faults.py::test_consecutive_nan_steps_stop_the_run_with_a_checkpoint_from_before"),
    ("itm_killed_resumes_exactly", "The whole ITM pre-training job dies",
     "SIGKILL of both gloo ranks right after the step-4 checkpoint; hard-negative mining across ranks, ITC, "
     "retrieval evaluation and attention probes on",
     "tests/test_resume.py::test_itm_pretraining_killed_on_every_rank_resumes_exactly"),
    ("second_job_refused", "A second job on a held run directory",
     "the same command started while a first job trains on the directory",
     "tests/test_cluster.py::test_a_second_job_on_a_held_directory_is_refused_and_a_killed_holder_is_taken_over"),
    ("stale_lease_taken_over", "The lease holder dies without releasing",
     "SIGKILL of the first job (its lease stays), then the same command again",
     "tests/test_cluster.py::test_a_second_job_on_a_held_directory_is_refused_and_a_killed_holder_is_taken_over"),
    ("server_dies_mid_run", "The shard server dies mid-run",
     "a loopback HTTP server holding the shards killed in the middle of a transfer, back 2 s later on the same port",
     "tests/test_streaming.py::test_a_server_that_dies_mid_run_costs_retries_not_data"),
    ("server_never_answers", "The shard server never answers",
     "connections accepted, no response ever (data.stall_timeout_s=3)",
     "tests/test_streaming.py::test_a_server_that_never_answers_trips_the_stall_watchdog"),
    ("stop_during_data_wait", "A stop signal while waiting for data",
     "the server hangs, SIGUSR1 arrives while the rank waits for its next batch",
     "tests/test_streaming.py::test_a_stop_signal_while_waiting_for_data_checkpoints_and_requeues"),
    ("one_rank_fails_to_load", "One rank cannot read the newest checkpoint",
     "ZeRO-3 with every parameter partitioned, 2 gloo ranks: rank 1's opens of step_00000006's files fail with "
     "ESTALE; rank 0's succeed",
     "tests/test_resume.py::test_ranks_resume_from_the_same_checkpoint_when_one_cannot_read_the_newest"),
    ("stop_while_one_rank_waits", "A stop signal while one rank waits for data",
     "2 gloo ranks: rank 1's data reader stops answering, rank 0 has its batches; SIGUSR1 to both",
     "tests/test_resume.py::test_a_stop_signal_while_one_rank_waits_for_data_checkpoints_on_every_rank"),
    ("conversion_oserror", "Rank 0's universal conversion fails with an OSError",
     "2 gloo ranks resuming at another world size; the conversion raises OSError (disk quota)",
     "tests/test_resume.py::test_an_oserror_in_rank0s_universal_conversion_ends_the_others_wait"),
    ("slow_export", "Exports longer than the collective timeout",
     "2 gloo ranks, train.collective_timeout_s=15; every export rank 0 runs itself takes 20 s more",
     "tests/test_resume.py::test_exports_do_not_hold_the_other_ranks_in_a_collective"),
    ("lease_lost", "The job loses its run-directory lease",
     "during step 3 another job's lease replaces this one's (its renewals had stalled past the TTL)",
     "tests/test_cluster.py::test_a_job_that_loses_its_lease_stops_writing_at_once"),
]
STATIC = [
    ("Preemption of a 2-node SLURM job", "`scancel --signal=USR1 --batch` (time-limit warning) and `scontrol requeue` "
     "(SIGTERM to every process, data-loader workers included) on a real slurmctld/slurmd cluster on localhost",
     "tests/test_slurm.py::test_pretrain_sbatch_preempted_and_requeued",
     "both ranks checkpoint at the same step; rank 0 alone exits 42 (the other exits 0, so srun's "
     "--kill-on-bad-exit cannot cut rank 0 short), the job is requeued (Restarts=1) and finishes; steps continuous, "
     "losses equal to the uninterrupted 2-node run, final data position identical (also through dide-submit)"),
    ("Bad configuration and bad files", "unknown key, wrong type, impossible batch arithmetic, missing shards, "
     "teacher directory of the wrong kind, init directory that is not ours",
     "tests/test_faults.py::test_bad_configuration_and_files_fail_before_any_process_group",
     "exit code 2 before any process group; the message names the key or file; no run directory created"),
    ("Untrusted checkpoint file", "a per-rank state file whose pickle would run `os.system`",
     "tests/test_checkpoint.py::test_checkpoint_that_runs_code_on_unpickling_is_refused",
     "refused by `weights_only` loading; the command never runs"),
    ("Untrusted ViLT checkpoint", "a Lightning `.ckpt` of ViLT's layout whose pickle would run `os.system`, as "
     "`teacher.path` and as `student.init`",
     "tests/test_vilt_native.py::test_a_checkpoint_whose_pickle_names_an_unknown_global_is_refused",
     "refused before any process group with one line naming the global (`posix.system`); the command never runs; "
     "Lightning's and sacred's own containers are the only non-tensor classes read, as plain dicts"),
    ("Truncated newest checkpoint", "half of the largest shard file of the newest checkpoint cut off",
     "tests/test_checkpoint.py::test_truncated_newest_checkpoint_falls_back_to_previous",
     "reported (size mismatch with COMPLETE.json) and skipped; resumed from the previous one, same losses"),
    ("Interrupted save", "COMPLETE.json of the newest checkpoint missing",
     "tests/test_checkpoint.py::test_incomplete_checkpoint_is_skipped", "skipped; resumed from the previous one"),
    ("A sizes.json that cannot be read",
     "the shard server answers 503 for sizes.json every time (then, separately, 404)",
     "tests/test_streaming.py::test_a_sizes_json_that_cannot_be_read_fails_naming_it",
     "retried, then an error naming the URL (before: the rank went on without sample counts, reading differently "
     "from the others); a missing one leaves the counts unknown, as before"),
    ("A termination during a stop", "SIGTERM to the batch shell of slurm/pretrain.sbatch, with a stand-in srun",
     "tests/test_cluster.py::test_the_batch_script_forwards_a_warning_but_not_a_termination",
     "nothing forwarded to the ranks (SLURM signals them itself) and no requeue; a USR1 is forwarded and requeued"),
]


def outcome(key: str, r: dict) -> str:
    if key == "rank_dies":
        return (f"surviving rank exited after {r['seconds_to_detect']} s (no hang); relaunch resumed from step "
                f"{r['resumed_from']}; steps 4-6 losses bitwise equal to the uninterrupted run; steps lost: "
                f"{r['steps_lost']} beyond the checkpoint interval")
    if key == "preemption":
        return (f"checkpoint at step {r['checkpoint_step']}, exit code {r['exit_code']} (requeue) "
                f"{r['seconds_signal_to_exit']} s after the signal; the requeued run continued at step "
                f"{r['checkpoint_step'] + 1}; steps lost: {r['steps_lost']}")
    if key == "storage_full":
        return (f"{r['failed_writes']} failed write(s); `latest` still {r['latest_after_failure']}; relaunch "
                f"resumed from step {r['resumed_from']}")
    if key == "bad_data":
        reasons = ", ".join(f"{k} {int(v)}" for k, v in sorted(r["skipped_by_reason"].items()))
        return (f"all {r['steps_completed']} steps completed; {r['samples_skipped']} samples skipped, by reason: "
                f"{reasons}")
    if key == "nan_step":
        return f"{r['skipped_steps']} step skipped (DeepSpeed) and counted in optim/skipped_steps; run completed"
    if key == "nan_consecutive":
        return (f"run stopped after {r['stopped_after']} bad steps with exit code {r['exit_code']} and a clear "
                f"message; newest checkpoint {r['kept_checkpoint']} is from before the fault")
    if key == "itm_killed_resumes_exactly":
        return (f"relaunch resumed from step {r['resumed_from']}; the losses of the {r['steps_compared']} later steps "
                f"equal the uninterrupted run's (worst relative difference {r['worst_relative_difference']:.1e})")
    if key == "second_job_refused":
        return (f"the second job exited with code 2 after {r['seconds_to_refuse']} s (start-up included), naming the "
                "holder's host, pid and start time; the first job went on undisturbed")
    if key == "stale_lease_taken_over":
        return (f"the dead holder's lease was taken over at once (its pid is gone on this host; a lost node's after "
                f"`train.lease_ttl_s`); resumed from step {r['resumed_from']}")
    if key == "server_dies_mid_run":
        return (f"{r['retries']} read(s) retried from where they stopped (`data/retries`); samples lost: "
                f"{r['samples_lost']}; the stream equals the one read from local disk")
    if key == "server_never_answers":
        return (f"the run ended after {r['seconds_to_error']} s with `DataStalled`, naming the shard URLs each worker "
                "was reading; the stuck workers were killed (no hang at exit)")
    if key == "stop_during_data_wait":
        return (f"checkpoint of the last complete step ({r['checkpoint']}) and exit code 42 "
                f"{r['seconds_hang_to_exit']} "
                "s after the hang began; relaunched with the server back, the losses equal an undisturbed run's")
    if key == "one_rank_fails_to_load":
        return (f"the ranks agreed before either entered DeepSpeed's load (whose collectives would hold rank 0 "
                f"while rank 1 voted) and both resumed from step {r['resumed_from']}, skipping {r['newest']}")
    if key == "stop_while_one_rank_waits":
        return (f"both ranks checkpointed step {r['checkpoint_step']} and exited {r['exit_codes'][0]} "
                f"{r['seconds_signal_to_exit']} s after the signal (before: rank 0 sat in the step's gradient "
                "all-reduce while rank 1 voted on the CPU group, a deadlock until the collective timeout)")
    if key == "conversion_oserror":
        return (f"rank 0 left the failure marker and rank 1 stopped waiting after {r['seconds_rank1_waited']} s "
                f"(before: it polled until its timeout, {r['wait_timeout_s']} s here, 4 hours by default)")
    if key == "slow_export":
        return (f"both ranks exited {r['exit_codes'][0]}: new bests exported by a process of rank 0's own while both "
                "trained on, the final export awaited on the CPU group (before: rank 1 timed out in the next "
                "collective)")
    if key == "lease_lost":
        return (f"exit code {r['exit_code']} before the step-3 checkpoint: nothing written after the loss (newest "
                f"checkpoint {r['last_checkpoint']}, no summary), the other job's lease left in place")
    return json.dumps(r)


def main() -> int:
    report = Path(tempfile.mkdtemp()) / "figures.jsonl"
    tests = list(dict.fromkeys([f[3] for f in FAULTS] + [s[2] for s in STATIC]))
    env = dict(os.environ, DIDE_RELIABILITY_REPORT=str(report))
    t0 = time.time()
    res = subprocess.run([sys.executable, "-m", "pytest", "-q", *tests], cwd=ROOT, env=env)
    if res.returncode != 0:
        print("fault tests failed; not writing the report", file=sys.stderr)
        return 1
    figures = {}
    for line in report.read_text().splitlines():
        r = json.loads(line)
        figures[r.pop("test")] = r
    lines = ["# Reliability: faults injected, outcomes observed", "",
             f"Generated by `python tools/reliability_report.py` on {time.strftime('%Y-%m-%d')}, "
             f"{platform.machine()} CPU, {os.cpu_count()} cores, gloo backend (`DS_ACCELERATOR=cpu`); "
             f"the tests took {time.time() - t0:.0f} s. Every figure below was recorded by the test named "
             "in its row; they all run in CI (`pytest`; the 2-rank ones are marked `distributed`).", "",
             "| fault | how it is injected | test | observed outcome |", "|---|---|---|---|"]
    for key, name, how, test in FAULTS:
        lines.append(f"| {name} | {how} | `{test.split('::')[1]}` | {outcome(key, figures[key])} |")
    for name, how, test, out in STATIC:
        lines.append(f"| {name} | {how} | `{test.split('::')[1]}` | {out} |")
    lines += ["", "## Mechanisms", "",
              "- **Collective timeout**: `train.collective_timeout_s` is the process group's timeout, so a rank "
              "whose peer vanished raises instead of waiting forever (with gloo a dead peer usually surfaces "
              "at once as a closed connection).",
              "- **Stop signals**: SIGTERM/SIGUSR1 set a flag; ranks agree on it at every step boundary "
              "(all-reduce on a CPU gloo group), write a checkpoint together and exit with code 42, which "
              "`slurm/pretrain.sbatch` and `dide-submit` turn into a requeue.",
              "- **Checkpoints**: every rank writes, then rank 0 writes `COMPLETE.json` (a manifest of file sizes) "
              "and only then moves `latest` (atomic rename). Resume walks checkpoints newest first and skips any "
              "without a valid manifest.",
              "- **Non-finite steps**: DeepSpeed's ZeRO optimizer skips a step whose global gradient norm is not "
              "finite; the loop counts them and stops after `train.max_bad_steps` in a row.",
              "- **Bad data**: every decode failure is a `SkipSample(reason)`; counts travel with each batch's data "
              "position and reach TensorBoard as `data/skipped/<reason>`.",
              "- **Exact resume**: every random draw of a step comes from a generator seeded by (seed, rank, step, "
              "micro-step), and data loaders have generators of their own (a new iterator used to draw its worker "
              "seeds from the global RNG, which moved a resumed run's hard negatives).",
              "- **One job per run directory**: a lease file created with `link()` and renewed by the holder; a "
              "second job is refused naming the holder; a dead holder's lease (pid gone on this host, not renewed for "
              "`train.lease_ttl_s`, or the same SLURM job requeued) is taken over.",
              "- **Agreed resume**: the ranks take the newest checkpoint that every one of them can read and load, "
              "agreeing that every rank read and unpickled its files before any enters DeepSpeed's load; a "
              "world-size change converts it on rank 0 while the others wait on the filesystem (a failure marker "
              "ends their wait).",
              "- **The step's vote**: every rank fetches a step's data before its first collective, then the ranks "
              "vote on the CPU group (timeout `train.collective_timeout_s`): go, stop (checkpoint the step before), "
              "a rank's data failed (all stop at once), or the lease was lost (stop without writing).",
              "- **Exports off the collective path**: new bests are exported by a process of rank 0's own; the other "
              "ranks wait for the final export with a receive of its own timeout.",
              "- **Remote shards**: reads start at a sample's byte offset from sizes.json (range requests); a read "
              "that fails with a passing error (connection, timeout, HTTP 5xx) is retried "
              "from where it stopped with a doubling backoff (`data.read_retries`, counted in `data/retries`); a shard "
              "that keeps failing is skipped and counted; a source whose shards all fail ends the run naming it.",
              "- **Stall watchdog**: the loader waits for each batch in short polls; a stop signal during a wait gives "
              "an agreed checkpoint of the last complete step and exit 42, and no batch for `data.stall_timeout_s` "
              "ends the run naming the shards the workers read."]
    (ROOT / "docs" / "RELIABILITY.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
