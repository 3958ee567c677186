"""The per-visit loops of ``runs/`` called without the command line, and the output plan:
every file a run writes is planned once, checked before any work and used by the writers."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from alsiron.errors import OutputExistsError
from alsiron.io.derivatives import OutputPlan
from alsiron.runs import qsm as run_qsm
from alsiron.runs import relax as run_relax
from alsiron.runs import roi as run_roi
from alsiron.sim.phantom import MeseProtocol, write_dataset

ENTITIES = {"sub": "01", "ses": "01"}
STEM = "sub-01_ses-01"


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("runs") / "bids"
    write_dataset(root, subjects=1, matrix=48, voxel_size=4.0, seed=5, mese=MeseProtocol())
    return root


def _refusal(path: Path) -> str:
    return f"{path}: already exists (use --overwrite to replace the outputs)"


def _no_work(*_args, **_kwargs):
    raise AssertionError("a refused run must not load or compute anything")


def test_qsm_plan_lists_every_file_in_checking_order(tmp_path):
    opts = run_qsm.QsmRunOptions(normative=tmp_path / "model.json")
    plan = run_qsm.plan_outputs(tmp_path, ENTITIES, opts)
    anat = tmp_path / "sub-01" / "ses-01" / "anat"
    names = [p.relative_to(anat).as_posix() for p in plan.paths()]
    assert names[:4] == [f"{STEM}_Chimap.nii.gz", f"{STEM}_Chimap.json",
                         f"{STEM}_R2starmap.nii.gz", f"{STEM}_R2starmap.json"]
    assert names[-8:] == [f"{STEM}_desc-motorcortex_zscores.json",
                          f"{STEM}_desc-motorcortex_indices.tsv",
                          f"{STEM}_desc-motorcortex_indices.json",
                          f"{STEM}_desc-motorcortex_dseg.nii.gz",
                          f"{STEM}_desc-motorcortex_dseg.json",
                          f"{STEM}_desc-motorcortex_dseg.tsv",
                          f"{STEM}_desc-motorcortex_qc.png",
                          f"{STEM}_desc-motorcortex_qc.json"]
    assert len(names) == 2 * 10 + 8
    assert plan.path("zscores", "motorcortex") == run_qsm.zscore_path(tmp_path, ENTITIES)
    bare = run_qsm.plan_outputs(tmp_path, ENTITIES, run_qsm.QsmRunOptions(roi=None))
    assert len(bare.paths()) == 2 * 10
    with pytest.raises(KeyError):
        bare.path("indices", "motorcortex")


def test_plan_refuses_on_the_first_existing_file_and_overwrite_lifts_it(tmp_path):
    plan = OutputPlan(tmp_path, dict(ENTITIES))
    first = plan.add_map("Chimap")
    table = plan.add_file("indices", "motorcortex", ".tsv", extra=(".json",))
    plan.check_free(overwrite=False)  # nothing exists yet
    table.parent.mkdir(parents=True)
    table.with_suffix(".json").write_text("{}")
    first.with_name(first.name.replace(".nii.gz", ".json")).write_text("{}")
    with pytest.raises(OutputExistsError) as err:
        plan.check_free(overwrite=False)
    assert str(err.value) == _refusal(first.with_name(f"{STEM}_Chimap.json"))
    plan.check_free(overwrite=True)


def test_qsm_refuses_an_existing_roi_output_before_loading(dataset, tmp_path, monkeypatch):
    out = tmp_path / "deriv"
    opts = run_qsm.QsmRunOptions(record=False)
    png = run_qsm.plan_outputs(out, ENTITIES, opts).path("qc", "motorcortex")
    png.parent.mkdir(parents=True)
    png.write_bytes(b"")
    monkeypatch.setattr(run_qsm.ingest, "load_megre", _no_work)
    with pytest.raises(OutputExistsError) as err:
        next(run_qsm.run_qsm_subject(dataset / "sub-01", opts, out=out))
    assert str(err.value) == _refusal(png)
    assert [p for p in out.rglob("*") if p.is_file()] == [png]


def test_relax_subject_without_click(dataset, tmp_path, monkeypatch):
    out = tmp_path / "deriv"
    outcomes = list(run_relax.run_relax_subject(dataset / "sub-01", out=out))
    assert [oc.label for oc in outcomes] == [STEM]
    oc = outcomes[0]
    plan = run_relax.plan_outputs(out, ENTITIES, with_mese=True)
    images = [f.path for f in plan.files]
    assert oc.written == images and all(p.is_file() for p in plan.paths())
    assert oc.result.r2prime is not None and oc.seconds > 0
    # A second run refuses on the first planned file, before loading the MEGRE.
    monkeypatch.setattr(run_relax.ingest, "load_megre", _no_work)
    with pytest.raises(OutputExistsError) as err:
        next(run_relax.run_relax_subject(dataset / "sub-01", out=out))
    assert str(err.value) == _refusal(images[0])


def test_roi_subject_without_click(dataset, tmp_path, monkeypatch):
    out = tmp_path / "deriv"
    anat = out / "sub-01" / "ses-01" / "anat"
    anat.mkdir(parents=True)
    truth = dataset / "derivatives" / "phantom" / "sub-01" / "ses-01" / "anat"
    for name in ("Chimap.nii.gz", "R2starmap.nii.gz"):
        shutil.copy(truth / f"{STEM}_{name}", anat / f"{STEM}_{name}")
    options = run_roi.RoiOptions(qc=False)
    outcomes = list(run_roi.run_roi_subject(dataset / "sub-01", options, out=out))
    assert [oc.label for oc in outcomes] == [STEM]
    oc = outcomes[0]
    assert oc.indices.parameters["Masks"]["Route"] == "labels"
    plan = OutputPlan(out, dict(ENTITIES))
    run_roi.plan_outputs(plan)
    qc_png = plan.path("qc", "motorcortex")
    assert set(oc.written) <= set(plan.paths())
    assert [p for p in plan.paths() if not p.is_file()] == [qc_png, qc_png.with_suffix(".json")]
    # Outputs exist: refused before the maps are read.
    monkeypatch.setattr(run_roi, "_load_session_maps", _no_work)
    with pytest.raises(OutputExistsError) as err:
        next(run_roi.run_roi_subject(dataset / "sub-01", options, out=out))
    assert str(err.value) == _refusal(plan.path("indices", "motorcortex"))
