"""``alsiron import`` (DICOM → de-identified BIDS through dcm2niix) and ``alsiron qsm`` on
plain NIfTI + JSON and DICOM folders: real Siemens DICOMs, synthetic GE / Philips /
enhanced multi-frame series, planted identifiers, bad input, defacing."""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest

from alsiron.cli import main
from alsiron.errors import InputError, OutputExistsError
from alsiron.io import bids
from alsiron.io.tables import read_tsv
from alsiron.runs.importer import import_dicom

import dicom_factory as factory

REAL = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "real"
REAL_DICOM = next((p for p in (REAL / "dicom_megre_siemens",
                               Path("/work/shared/data/real/dicom_megre_siemens"))
                   if p.is_dir()), None)
#: Phase quantisation of the stored codes [rad]: 12-bit codes (2π/4096), Philips
#: 1.53 mrad steps, GE 1 mrad steps; the tolerance covers the worst.
PHASE_TOL = 2 * np.pi / 4096 * 1.01


def _map(path: Path, rows: list[tuple[str, str, str]], key: str = "PatientID") -> Path:
    path.write_text(f"{key}\tparticipant_id\tsession_id\n"
                    + "".join(f"{a}\t{b}\t{c}\n" for a, b, c in rows))
    return path


def _load(bids_dir: Path, sub: str, ses: str = "01"):
    sessions = bids.find_sessions(bids_dir / f"sub-{sub}")
    assert len(sessions) == 1 and len(sessions[0].series) == 1
    return bids.load_megre(sessions[0].series[0], subject=sub, session=ses)


def _angle_error(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(np.angle(np.exp(1j * (a - b))))))


# ------------------------------------------------------------------------ real Siemens
@pytest.mark.skipif(REAL_DICOM is None, reason="shared real DICOMs not available")
def test_real_siemens_dicoms_import_with_right_echo_times_and_phase(tmp_path):
    """The heudiconv Prisma GRE_QSM phantom: separate magnitude and phase series, phase
    as 12-bit codes with RescaleSlope 2 / RescaleIntercept -4096."""
    pid = str(pydicom.dcmread(next((REAL_DICOM / "mag").iterdir()),
                              stop_before_pixels=True).PatientID)
    ids = _map(tmp_path / "ids.tsv", [(pid, "sub-07", "ses-01")])
    # One slice cannot be defaced: de-identification fails closed, nothing is written.
    with pytest.raises(InputError, match=r"mag: series 2 'GRE_QSM': cannot deface \(field "
                                         "of view too small"):
        import_dicom(REAL_DICOM, tmp_path / "bids", ids, deface=True)
    assert not (tmp_path / "bids").exists()
    visits = import_dicom(REAL_DICOM, tmp_path / "bids", ids)
    assert [(v.subject, v.session, len(v.files)) for v in visits] == [("07", "01", 6)]
    series = _load(tmp_path / "bids", "07")
    np.testing.assert_allclose(series.echo_times, [0.004, 0.010, 0.016], atol=1e-9)
    assert series.field_strength == 3.0 and series.shape == (54, 64, 1)
    assert series.phase.min() > -np.pi - 1e-6 and series.phase.max() <= np.pi + 1e-6
    # Against the DICOM pixels themselves: magnitude = stored values, phase radians =
    # (PV·2 − 4096)·π/4096, voxel by voxel (dcm2niix's reorientation found from the
    # magnitude: DICOM rows run along NIfTI y, flipped into RAS).
    def by_echo(part):
        files = [pydicom.dcmread(f) for f in (REAL_DICOM / part).iterdir()]
        return sorted(files, key=lambda ds: int(ds.EchoNumbers))

    flips = [lambda a: a.T, lambda a: a.T[::-1], lambda a: a.T[:, ::-1],
             lambda a: a.T[::-1, ::-1]]
    for e, (dm, dp) in enumerate(zip(by_echo("mag"), by_echo("phase"), strict=True)):
        mag_pv = dm.pixel_array.astype(np.float64)
        orient = [f for f in flips if np.array_equal(f(mag_pv), series.magnitude[e][:, :, 0])]
        assert len(orient) == 1, e
        truth = (dp.pixel_array * float(dp.RescaleSlope) + float(dp.RescaleIntercept)
                 ) * np.pi / 4096
        assert _angle_error(series.phase[e][:, :, 0], orient[0](truth)) < 1e-5
        assert np.ptp(series.phase[e]) > 6.0  # wrapped phase covers (−π, π]
    people = read_tsv(tmp_path / "bids" / "participants.tsv")
    assert people == [{"participant_id": "sub-07", "age": "39.2", "sex": "M"}]
    sessions = read_tsv(tmp_path / "bids" / "sub-07" / "sub-07_sessions.tsv")
    assert sessions == [{"session_id": "ses-01", "age": "39.2", "years_since_baseline": "0"}]
    kept = _all_text(tmp_path / "bids")
    for secret in ("Phantom_QSM_bids", "University of California", "Riverside", "166014",
                   "20220202", "19821122", pid, "Jason"):
        assert secret.lower() not in kept, secret


# ------------------------------------------------------------------------ vendors
@pytest.mark.parametrize("vendor, enhanced", [("siemens", False), ("ge", False),
                                              ("philips", False), ("philips", True)])
def test_vendor_phase_conventions(tmp_path, vendor, enhanced):
    """GE milliradians with the opposite sign, Philips RS/RI display values in mrad
    (dcm2niix's precise scaling divides them by RS·SS), Siemens 12-bit codes, and
    enhanced multi-frame files: the imported phase equals the true phase."""
    write = factory.write_enhanced_megre if enhanced else factory.write_classic_megre
    truth = write(tmp_path / "dicom", vendor=vendor)
    ids = _map(tmp_path / "ids.tsv", [(factory.IDENTITY["PatientID"], "01", "01")])
    import_dicom(tmp_path / "dicom", tmp_path / "bids", ids)
    series = _load(tmp_path / "bids", "01")
    np.testing.assert_allclose(series.echo_times, truth["echo_times"], atol=1e-9)
    assert series.shape == (16, 16, 8)
    for e, phase in enumerate(truth["phases"]):
        # dcm2niix writes RAS: the DICOM (LPS) x and y axes are flipped.
        got = series.phase[e][::-1, ::-1, :]
        assert _angle_error(got, phase) < PHASE_TOL, e
        np.testing.assert_allclose(series.magnitude[e][::-1, ::-1, :],
                                   np.round(truth["mags"][e]), atol=0.5)
    side = json.loads(next((tmp_path / "bids").rglob("*echo-1_part-phase_MEGRE.json"))
                      .read_text())
    assert side["Units"] == "rad"
    assert side.get("PhaseNegated", False) is (vendor == "ge")


# ------------------------------------------------------------------------ de-identification
def _all_text(folder: Path) -> str:
    """Every byte of every file under ``folder``, .gz decompressed, as lower-case text."""
    chunks = []
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            blob = path.read_bytes()
            if path.name.endswith(".gz"):
                blob = gzip.decompress(blob)
            chunks.append(path.name.encode() + b"\n" + blob)
    return b"\n".join(chunks).decode("latin-1").lower()


def test_planted_identifiers_are_absent_from_every_output_byte(tmp_path):
    factory.write_classic_megre(tmp_path / "dicom", vendor="siemens")
    factory.write_dicomdir(tmp_path / "dicom" / "DICOMDIR")  # an index, no image: skipped
    ids = _map(tmp_path / "ids.tsv", [(factory.IDENTITY["PatientID"], "sub-ab12", "")])
    import_dicom(tmp_path / "dicom", tmp_path / "bids", ids)
    kept = _all_text(tmp_path / "bids")
    secrets = set(factory.IDENTITY.values())
    secrets |= {"Zorglub", "Quentin", "Wilhelmina", "Ignatius", "1957-03-14", "2023-06-11",
                "13:45:12", "13:47:33", "134733"}
    found = [s for s in secrets if s.lower() in kept]
    assert not found, found
    assert len(kept) > 10_000  # the images are there, decompressed
    people = read_tsv(tmp_path / "bids" / "participants.tsv")
    # Birth date 1957-03-14, study 2023-06-11: 66.24 years at scan.
    assert people == [{"participant_id": "sub-ab12", "age": "66.24", "sex": "F"}]
    assert not list((tmp_path / "bids").glob(".alsiron-import-*"))


# ------------------------------------------------------------------------ bad input
def _nothing_written(bids_dir: Path) -> bool:
    return not bids_dir.exists() or not any(bids_dir.iterdir())


def test_mixed_subjects_missing_echo_phase_only_each_refused_in_one_line(tmp_path, capsys):
    mixed = tmp_path / "mixed"
    factory.write_classic_megre(mixed / "a", vendor="siemens")
    other = dict(factory.IDENTITY, PatientID="PID0000002")
    factory.write_classic_megre(mixed / "b", vendor="siemens", identity=other)
    ids = _map(tmp_path / "ids.tsv", [(factory.IDENTITY["PatientID"], "01", "01")])
    out = tmp_path / "bids"
    assert main(["import", str(mixed), str(out), "--map", str(ids)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "is not in ids.tsv" in err and "PID0000002" not in err
    assert _nothing_written(out)

    factory.write_classic_megre(tmp_path / "gap", vendor="ge", skip_echo=2)
    with pytest.raises(InputError, match=r"gap: series 2 .QSM_GRE.: echo 2 missing "
                                         r"\(echoes 1, 3 found\)$"):
        import_dicom(tmp_path / "gap", out, ids)
    assert _nothing_written(out)

    factory.write_classic_megre(tmp_path / "ph", vendor="siemens", parts=("phase",))
    with pytest.raises(InputError, match=r"ph: series 2 .QSM_GRE_ph.: phase without a magnitude"):
        import_dicom(tmp_path / "ph", out, ids)
    assert _nothing_written(out)

    # Two visits of one patient mapped by PatientID only cannot be told apart.
    two = tmp_path / "two"
    factory.write_classic_megre(two / "v1", vendor="siemens")
    factory.write_classic_megre(two / "v2", vendor="siemens")
    with pytest.raises(InputError, match="add a StudyInstanceUID column"):
        import_dicom(two, out, ids)
    assert _nothing_written(out)


def test_visits_by_study_uid_and_existing_visit_refused_before_converting(tmp_path):
    two = tmp_path / "two"
    t1 = factory.write_classic_megre(two / "v1", vendor="philips")
    t2 = factory.write_classic_megre(two / "v2", vendor="philips")
    ids = _map(tmp_path / "ids.tsv", [(t1["study_uid"], "01", "01"),
                                      (t2["study_uid"], "01", "02")], key="StudyInstanceUID")
    out = tmp_path / "bids"
    visits = import_dicom(two, out, ids)
    assert sorted((v.subject, v.session) for v in visits) == [("01", "01"), ("01", "02")]
    assert sorted(p.name for p in (out / "sub-01").iterdir()) == [
        "ses-01", "ses-02", "sub-01_sessions.tsv"]
    before = sorted(p.stat().st_mtime_ns for p in out.rglob("*.nii.gz"))
    with pytest.raises(OutputExistsError, match=r"ses-0[12]: already exists"):
        import_dicom(two, out, ids)
    assert sorted(p.stat().st_mtime_ns for p in out.rglob("*.nii.gz")) == before
    assert import_dicom(two, out, ids, overwrite=True)
    assert not list(out.glob(".alsiron-import-*"))


# ------------------------------------------------------------------------ qsm on any folder
@pytest.fixture(scope="module")
def head(tmp_path_factory):
    from alsiron.sim.phantom import simulate_subject

    return simulate_subject(matrix=32, voxel_size=6.0, rng=3)


def _qsm_ok(folder: Path, label: str, capsys) -> Path:
    assert main(["qsm", str(folder), "--no-indices", "--no-registry"]) == 0
    captured = capsys.readouterr()
    out_root = folder.resolve().parent / "derivatives" / "alsiron"
    assert f"outputs go to {out_root}" in captured.err
    chi = out_root / f"sub-{label}" / "anat" / f"sub-{label}_Chimap.nii.gz"
    assert chi.is_file()
    return chi


def test_qsm_on_a_plain_dcm2niix_style_folder(tmp_path, head, capsys):
    folder = tmp_path / "subj_01"
    folder.mkdir()
    aff = head.affine
    for e, te in enumerate(head.echo_times, start=1):
        for part, data, token in (("mag", head.magnitude[e - 1], "M"),
                                  ("ph", head.phase[e - 1], "P")):
            name = f"QSM_{'x' if part == 'mag' else 'y'}{e}"
            nib.save(nib.Nifti1Image(data.astype(np.float32), aff), folder / f"{name}.nii.gz")
            (folder / f"{name}.json").write_text(json.dumps({
                "EchoTime": float(te), "EchoNumber": e, "MagneticFieldStrength": 3.0,
                "ImageType": ["ORIGINAL", "PRIMARY", token, "ND"], "ScanningSequence": "GR",
                "SeriesNumber": 4 if part == "mag" else 5, "Manufacturer": "Siemens"}))
    chi = _qsm_ok(folder, "subj01", capsys)
    side = json.loads(chi.with_name(chi.name.replace(".nii.gz", ".json")).read_text())
    assert side["Acquisition"]["EchoTime"] == pytest.approx(list(head.echo_times))
    # The same data as a BIDS session give the same map: the folder route adds nothing.
    from alsiron.sim.phantom import write_session

    write_session(tmp_path / "ref", head, "01", "01")
    assert main(["qsm", str(tmp_path / "ref" / "sub-01"), "--no-indices",
                 "--no-registry"]) == 0
    ref = next((tmp_path / "ref" / "derivatives").rglob("*_Chimap.nii.gz"))
    np.testing.assert_allclose(nib.load(chi).get_fdata(), nib.load(ref).get_fdata(),
                               atol=1e-6, equal_nan=True)


def test_qsm_on_a_dicom_folder(tmp_path, head, capsys):
    folder = tmp_path / "patient3"
    mags = [m * 1000 for m in head.magnitude]
    factory.write_classic_megre(folder, vendor="siemens", echo_times=tuple(head.echo_times),
                                voxel=(6.0, 6.0, 6.0), volumes=(mags, list(head.phase)))
    chi = _qsm_ok(folder, "patient3", capsys)
    assert np.isfinite(nib.load(chi).get_fdata()).any()
    # The label came from the folder name; nothing was written beside the DICOMs.
    assert not list(folder.glob("*.nii*"))


def test_qsm_on_a_folder_of_two_patients_is_refused(tmp_path, capsys):
    folder = tmp_path / "mixed"
    factory.write_classic_megre(folder / "a", vendor="siemens")
    factory.write_classic_megre(folder / "b", vendor="siemens",
                                identity=dict(factory.IDENTITY, PatientID="PID0000002"))
    assert main(["qsm", str(folder), "--no-indices", "--no-registry"]) == 2
    assert "holds DICOMs of 2 different patients" in capsys.readouterr().err
    shutil.rmtree(folder)


# ------------------------------------------------------------------------ defacing
def test_deface_zeroes_the_face_and_leaves_brain_and_skull(tmp_path):
    """A 6 mm anatomical head phantom through DICOM and ``alsiron import --deface``: the
    face goes, the brain and the skull over it (bone within 10 mm) keep every value, the
    phase is untouched, and BET on the defaced magnitude finds nearly the same brain."""
    from scipy import ndimage

    from alsiron.field.brain_mask import bet
    from alsiron.sim.anatomical import simulate_anatomical_subject

    s = simulate_anatomical_subject(voxel_size=6.0, anatomy_seed=1, rng=0)
    scale = 1000.0 / float(np.percentile(s.magnitude[0], 99))
    mags = [np.round(m * scale) for m in s.magnitude]
    factory.write_classic_megre(tmp_path / "dicom", vendor="siemens",
                                echo_times=tuple(s.echo_times), voxel=(6.0, 6.0, 6.0),
                                volumes=(mags, list(s.phase)),
                                ras_origin=tuple(s.affine[:3, 3]))
    ids = _map(tmp_path / "ids.tsv", [(factory.IDENTITY["PatientID"], "01", "01")])
    import_dicom(tmp_path / "dicom", tmp_path / "bids", ids, deface=True)
    series = _load(tmp_path / "bids", "01")
    np.testing.assert_allclose(series.affine, s.affine, atol=1e-3)  # same orientation
    removed = np.zeros(mags[0].shape, bool)
    for e, m in enumerate(mags):
        removed |= (series.magnitude[e] == 0) & (m != 0)
    assert removed.sum() > 0.03 * removed.size
    assert not (removed & s.brain_mask).any()
    vsz = (6.0, 6.0, 6.0)
    near = ndimage.distance_transform_edt(~s.brain_mask, sampling=vsz) <= 10.0
    skull = (s.labels == 2) & near
    assert skull.sum() > 100 and not (removed & skull).any()
    # Removed voxels lie in front of (y) and below (z) the brain's centre.
    centre = np.argwhere(s.brain_mask).mean(axis=0)
    assert (np.argwhere(removed)[:, 1:] > [centre[1], -1]).all()
    assert np.argwhere(removed)[:, 2].mean() < centre[2]
    kept = ~removed
    for e in range(len(mags)):
        np.testing.assert_array_equal(series.magnitude[e][kept], mags[e][kept])
        assert _angle_error(series.phase[e], s.phase[e]) < PHASE_TOL
    before = bet(mags[0].astype(np.float32), vsz).mask
    after = bet(series.magnitude[0], vsz).mask
    dice = 2 * (before & after).sum() / (before.sum() + after.sum())
    assert dice > 0.97, dice
    side = json.loads(next((tmp_path / "bids").rglob("*echo-1_part-mag_MEGRE.json"))
                      .read_text())
    assert side["Defaced"] is True


# ------------------------------------------------------------------------ classification
def _nifti(folder: Path, name: str, side: dict, shape=(8, 8, 4), value=100.0) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    data = np.full(shape, value, np.float32)
    nib.save(nib.Nifti1Image(data, np.diag([2.0, 2.0, 2.0, 1.0])), folder / f"{name}.nii.gz")
    (folder / f"{name}.json").write_text(json.dumps(side))


def test_sidecars_classify_megre_mese_t1w_and_skip_the_rest(tmp_path):
    from alsiron.runs.importer import stage_folder

    folder = tmp_path / "scan 7"
    gre = {"ScanningSequence": "GR", "MagneticFieldStrength": 3.0, "Manufacturer": "Siemens"}
    for e, te in enumerate((0.005, 0.01), start=1):
        _nifti(folder, f"a{e}", {**gre, "SeriesNumber": 3, "EchoNumber": e, "EchoTime": te,
                                 "ImageType": ["ORIGINAL", "PRIMARY", "M", "ND"]})
        _nifti(folder, f"b{e}", {**gre, "SeriesNumber": 4, "EchoNumber": e, "EchoTime": te,
                                 "ImageType": ["ORIGINAL", "PRIMARY", "P", "ND"]}, value=1.0)
    for e in (1, 2, 3):
        _nifti(folder, f"se{e}", {"ScanningSequence": "SE", "SeriesNumber": 6, "EchoNumber": e,
                                  "EchoTime": 0.01 * e, "RefocusingFlipAngle": 180,
                                  "ImageType": ["ORIGINAL", "PRIMARY", "M"]})
    _nifti(folder, "mp", {"ScanningSequence": "GR\\IR", "SeriesNumber": 2, "EchoTime": 0.003,
                          "ImageType": ["ORIGINAL", "PRIMARY", "M", "ND"],
                          "SeriesDescription": "MPRAGE"})
    _nifti(folder, "loc", {"ScanningSequence": "GR", "SeriesNumber": 1, "EchoTime": 0.004,
                           "ImageType": ["ORIGINAL", "PRIMARY", "M"],
                           "SeriesDescription": "localizer"})
    _nifti(folder, "bold", {"ScanningSequence": "EP", "SeriesNumber": 9, "EchoTime": 0.03,
                            "ImageType": ["ORIGINAL", "PRIMARY", "M"]})
    notes: list[str] = []
    subject_dir, kind = stage_folder(folder, tmp_path / "work", announce=notes.append)
    assert kind == "nifti" and subject_dir.name == "sub-scan7"
    names = sorted(p.name for p in (subject_dir / "anat").glob("*.nii.gz"))
    assert names == ["sub-scan7_T1w.nii.gz", "sub-scan7_echo-1_MESE.nii.gz",
                     "sub-scan7_echo-1_part-mag_MEGRE.nii.gz",
                     "sub-scan7_echo-1_part-phase_MEGRE.nii.gz",
                     "sub-scan7_echo-2_MESE.nii.gz", "sub-scan7_echo-2_part-mag_MEGRE.nii.gz",
                     "sub-scan7_echo-2_part-phase_MEGRE.nii.gz", "sub-scan7_echo-3_MESE.nii.gz"]
    skipped = [n for n in notes if "skipped" in n]
    assert len(skipped) == 2 and any("series 1 'localizer'" in n for n in skipped)
    assert bids.find_mese_series(subject_dir) and bids.find_sessions(subject_dir)


def test_unclassifiable_and_mislabelled_folders_are_refused_in_one_line(tmp_path, capsys):
    folder = tmp_path / "odd"
    for e in (1, 2):
        _nifti(folder, f"x{e}", {"ScanningSequence": "GR", "SeriesNumber": 3, "EchoNumber": e,
                                 "EchoTime": 0.005 * e, "SeriesDescription": "gre_me",
                                 "ImageType": ["ORIGINAL", "PRIMARY", "OTHER"]})
    assert main(["qsm", str(folder), "--no-indices", "--no-registry"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "series 3 'gre_me': multi-echo GRE image whose sidecar " \
        "ImageType says neither magnitude (M) nor phase (P)" in err
    named = tmp_path / "sub-02"
    _nifti(named, "sub-03_echo-1_part-mag_MEGRE", {"EchoTime": 0.005})
    assert main(["qsm", str(named), "--no-indices", "--no-registry"]) == 2
    assert "file names say sub-03 but the folder is sub-02" in capsys.readouterr().err
    assert not (tmp_path / "derivatives").exists()


def test_sidecar_allow_list_and_the_final_identifier_scan(tmp_path):
    from alsiron.io.deidentify import check_no_identifiers, scrub_sidecar

    secrets = {"Zorglub^Quentin", "Zorglub", "SN77123499", "1234"}
    meta = {"Manufacturer": "Siemens", "PatientName": "Zorglub^Quentin", "EchoTime": 0.01,
            "SoftwareVersions": "syngo for dr Zorglub", "DeviceSerialNumber": "SN77123499",
            "PixelBandwidth": 1234, "AcquisitionDateTime": "2023-06-11T13:47:33",
            "NewKeyOfAFutureDcm2niix": "anything"}
    # A 4-digit number is too short to search for: a bandwidth of 1234 Hz stays.
    assert scrub_sidecar(meta, secrets) == {"Manufacturer": "Siemens", "EchoTime": 0.01,
                                            "PixelBandwidth": 1234}
    img = nib.Nifti1Image(np.zeros((4, 4, 4), np.float32), np.eye(4))
    img.header["descrip"] = b"seen by Zorglub"
    nib.save(img, tmp_path / "x.nii.gz")
    (tmp_path / "x.json").write_text(json.dumps({"PixelBandwidth": 1234}))
    with pytest.raises(InputError, match=r"^x\.nii\.gz: an identifier") as info:
        check_no_identifiers(tmp_path, secrets)
    assert "zorglub" not in str(info.value).lower()
