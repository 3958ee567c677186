"""Distributed participant runs on dask: a 2-worker local cluster survives a worker killed
mid-visit, a rerun recomputes nothing, failures are recorded and the run goes on, and the
cluster options (SLURM/PBS job scripts, scheduler, registry) are checked."""

import json
import os
import signal
import threading
import time

import pytest
from click.testing import CliRunner

from alsiron.cli import cli, main
from alsiron.cohort.registry import Registry
from alsiron.errors import AlsironError
from alsiron.runs.batch import (
    BatchOptions,
    local_cluster_size,
    make_jobqueue_cluster,
    refuse_shared_sqlite,
)
from alsiron.runs.bidsapp import (
    ParticipantOptions,
    find_visits,
    manifest_path,
    run_participant_level,
)
from alsiron.sim.phantom import write_dataset

# Small phantoms: a visit takes about a second on one core.
SMALL = {"matrix": 32, "voxel_size": 6.0}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("batch") / "bids", subjects=3, sessions=2,
                         seed=3, **SMALL)


def _killer(state):
    """on_client hook: once a worker is running a visit, SIGKILL that worker process."""

    def start(client):
        pids = client.run(os.getpid)

        def watch():
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                busy = {w: keys for w, keys in client.processing().items() if keys}
                if busy:
                    worker, keys = next(iter(busy.items()))
                    time.sleep(0.3)  # inside the visit, not before it
                    state["pid"] = pids[worker]
                    state["labels"] = {k.rsplit("-", 1)[0] for k in keys}
                    os.kill(pids[worker], signal.SIGKILL)
                    return
                time.sleep(0.05)

        thread = threading.Thread(target=watch, daemon=True)
        thread.start()
        state["thread"] = thread

    return start


def test_two_worker_cluster_survives_a_killed_worker_and_a_rerun_recomputes_nothing(
        dataset, tmp_path):
    out = tmp_path / "out"
    state: dict = {}
    seen: list[tuple[int, int]] = []
    summary = run_participant_level(dataset, out, batch=BatchOptions(workers=2, threads=1),
                                    on_client=_killer(state),
                                    progress=lambda _r, i, n: seen.append((i, n)))
    state["thread"].join(5)
    assert "pid" in state, "no worker was killed"
    assert [r.status for r in summary.results] == ["done"] * 6, summary.results
    assert seen[-1] == (6, 6)
    # The visit the killed worker was running was retried on a live worker.
    retried = [r for r in summary.results if r.label in state["labels"]]
    assert any(not r.worker.endswith(f":{state['pid']}") for r in retried)
    with Registry.open(out / "registry.sqlite", create=False) as reg:
        assert len(reg.sessions()) == 6
    for visit in find_visits(dataset):
        doc = json.loads(manifest_path(visit, out).read_text())
        assert doc["Status"] == "done" and len(doc["Inputs"]) == 24
        assert all((out / rel).is_file() for rel in doc["Outputs"])
    assert not list(out.rglob("*.part"))

    again = run_participant_level(dataset, out, batch=BatchOptions(workers=2, threads=1))
    assert [r.status for r in again.results] == ["skipped"] * 6

    # A changed output is noticed: that visit (only) is recomputed.
    chi = out / "sub-02" / "ses-01" / "anat" / "sub-02_ses-01_Chimap.nii.gz"
    chi.write_bytes(b"damaged")
    third = run_participant_level(dataset, out, participant_labels=["02"],
                                  batch=BatchOptions(backend="serial", threads=1))
    assert [(r.label, r.status) for r in third.results] == [("sub-02_ses-01", "done"),
                                                            ("sub-02_ses-02", "skipped")]


def test_failed_visit_is_recorded_with_its_reason_and_the_run_goes_on(dataset, tmp_path):
    out = tmp_path / "out"
    broken = tmp_path / "bids"
    import shutil

    shutil.copytree(dataset, broken)
    for f in (broken / "sub-01" / "ses-02" / "anat").glob("*echo-3_part-phase*"):
        f.unlink()
    run = CliRunner().invoke(cli, [str(broken), str(out), "participant", "--serial",
                                   "--participant-label", "01", "02", "--session-label", "02"])
    assert run.exit_code != 0
    assert "1 of 2 visits failed" in str(run.exception)
    row = next(line for line in run.output.splitlines() if line.startswith("sub-01_ses-02"))
    assert "failed" in row and "echo-3 has no matching part-phase file" in row
    assert "sub-02_ses-02  done" in run.output
    doc = json.loads((out / "sub-01" / "ses-02" / "sub-01_ses-02_visit.json").read_text())
    assert doc["Status"] == "failed" and "part-phase" in doc["Reason"]
    (log,) = (out / "logs").glob("participant_*.tsv")
    assert "sub-01_ses-02\tfailed" in log.read_text()


def test_changed_settings_need_overwrite(dataset, tmp_path):
    out = tmp_path / "out"
    serial = BatchOptions(backend="serial", threads=1)
    opts = ParticipantOptions(roi=None, relax=None)
    first = run_participant_level(dataset, out, opts, serial, participant_labels=["03"],
                                  session_labels=["01"])
    assert [r.status for r in first.results] == ["done"]
    other = ParticipantOptions(roi=None, relax=None)
    other.params = other.params.from_flat({**other.params.to_flat(), "inversion": "tkd"})
    refused = run_participant_level(dataset, out, other, serial, participant_labels=["03"],
                                    session_labels=["01"])
    assert refused.results[0].status == "failed"
    assert "other settings" in refused.results[0].reason
    assert "--overwrite" in refused.results[0].reason
    other.overwrite = True
    redone = run_participant_level(dataset, out, other, serial, participant_labels=["03"],
                                   session_labels=["01"])
    assert [r.status for r in redone.results] == ["done"]
    with Registry.open(out / "registry.sqlite", create=False) as reg:
        assert len(reg.history("sub-03", "ses-01")) == 2


def test_sqlite_registry_is_refused_for_multi_machine_runs(tmp_path):
    for backend in ("scheduler", "slurm", "pbs"):
        with pytest.raises(AlsironError, match="PostgreSQL|postgresql"):
            refuse_shared_sqlite(BatchOptions(backend=backend), tmp_path / "registry.sqlite")
    refuse_shared_sqlite(BatchOptions(backend="slurm"), "postgresql://u@db.example/alsiron")
    refuse_shared_sqlite(BatchOptions(), tmp_path / "registry.sqlite")  # local disk: fine


def test_unreachable_scheduler_and_sqlite_with_scheduler_are_one_line_errors(dataset, tmp_path,
                                                                             capsys,
                                                                             monkeypatch):
    code = main([str(dataset), str(tmp_path / "out"), "participant", "--scheduler",
                 "tcp://127.0.0.1:9"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "SQLite registry cannot be shared" in err and "postgresql://" in err

    from alsiron.runs import batch

    monkeypatch.setattr(batch, "CONNECT_TIMEOUT_S", 2)
    with pytest.raises(AlsironError, match=r"cannot reach the dask scheduler at "
                                           r"tcp://127.0.0.1:9"):
        batch._connect(BatchOptions(backend="scheduler", scheduler="tcp://127.0.0.1:9"))


def test_slurm_and_pbs_options_build_the_job_scripts():
    before = signal.getsignal(signal.SIGINT)
    slurm = make_jobqueue_cluster(BatchOptions(backend="slurm", queue="cpu", account="als",
                                               walltime="02:00:00", job_cores=8,
                                               memory_per_worker=16 * 2**30))
    try:
        script = slurm.job_script()
    finally:
        slurm.close()
    assert "#SBATCH -p cpu" in script and "#SBATCH -A als" in script
    assert "#SBATCH --cpus-per-task=8" in script and "#SBATCH -t 02:00:00" in script
    # One single-threaded worker per core, memory asked for all of them.
    assert "#SBATCH --mem=128G" in script and "--nworkers 8" in script
    assert "--nthreads 1" in script and "export ALSIRON_NUM_THREADS=1" in script
    pbs = make_jobqueue_cluster(BatchOptions(backend="pbs", queue="workq", job_cores=4))
    try:
        script = pbs.job_script()
    finally:
        pbs.close()
    assert "#PBS -q workq" in script and "ncpus=4:mem=16GB" in script
    # dask_jobqueue's import-time SIGINT handler (sys.exit) is not left in place.
    assert signal.getsignal(signal.SIGINT) is before


def test_local_cluster_is_sized_from_cores_and_memory():
    gib = 2**30
    assert local_cluster_size(2, 24 * gib) == (2, 1, int(24 * gib * 0.9) // 2)
    # Memory, not cores, bounds the workers on a small-memory machine.
    n, threads, mem = local_cluster_size(16, 10 * gib)
    assert (n, threads) == (2, 8) and mem >= 4 * gib
    assert local_cluster_size(4, 64 * gib, workers=1)[:2] == (1, 4)


def test_bids_app_dispatch_keeps_the_subcommands(tmp_path):
    run = CliRunner().invoke(cli, ["--help"])
    assert run.exit_code == 0
    for name in ("qsm", "relax", "roi", "demo", "phantom", "registry", "bids-app"):
        assert f"\n  {name} " in run.output
    bad = CliRunner().invoke(cli, ["no-such-command"])
    assert bad.exit_code == 2 and "No such command" in bad.output
    missing = CliRunner().invoke(cli, [str(tmp_path / "nothing"), str(tmp_path / "o"),
                                       "participant", "--serial"])
    assert isinstance(missing.exception, AlsironError)
    assert "not a folder" in str(missing.exception)


def test_bids_app_participant_then_group_end_to_end(dataset, tmp_path):
    from alsiron.sim.cohort import simulate_index_cohort

    out = tmp_path / "derivatives" / "alsiron"
    run = CliRunner().invoke(cli, [str(dataset), str(out), "participant", "--serial",
                                   "--participant-label", "sub-01", "03"])
    assert run.exit_code == 0, run.output
    assert "4 done, 0 skipped, 0 failed" in run.output
    assert (out / "sub-03" / "ses-02" / "anat" / "sub-03_ses-02_Chimap.nii.gz").is_file()
    # The phantom visits are too few for a normative model: add simulated control visits
    # (index level) to the registry, as a site's earlier participants would be.
    controls = [r for r in simulate_index_cohort(24, 1, seed=5)[0] if r.group == "control"]
    for rec in controls:
        rec.subject = rec.subject.replace("sub-", "sub-ctl")
    with Registry.open(out / "registry.sqlite") as reg:
        reg.record_sessions(controls)
    group = CliRunner().invoke(cli, [str(dataset), str(out), "group"])
    assert group.exit_code == 0, group.output
    assert (out / "normative_model.json").is_file()
    assert (out / "longitudinal_chi_precentral_deep_mean.tsv").is_file()
    assert (out / "cohort_report.html").is_file()
    assert (out / "sub-01" / "sub-01_report.html").is_file()
    # Phantom visits with indices got their z-scores beside the indices.
    assert (out / "sub-01" / "ses-01" / "anat"
            / "sub-01_ses-01_desc-motorcortex_zscores.json").is_file()
    # The group outputs are not replaced without --overwrite; with it they are.
    again = CliRunner().invoke(cli, [str(dataset), str(out), "group"])
    assert again.exit_code != 0 and "--overwrite" in str(again.exception)
    assert CliRunner().invoke(cli, [str(dataset), str(out), "group", "--overwrite"]).exit_code == 0
    # The z-scores the group wrote do not make the visits look incomplete.
    rerun = CliRunner().invoke(cli, [str(dataset), str(out), "participant", "--serial",
                                     "--participant-label", "01"])
    assert "0 done, 2 skipped, 0 failed" in rerun.output
