"""Small synthetic MR DICOM series written with pydicom (classic one-slice-per-file and
enhanced multi-frame), with vendor phase conventions and planted identifiers, for the
importer tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

MR_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
ENHANCED_MR_STORAGE = "1.2.840.10008.5.1.4.1.1.4.1"
GAMMA_BAR = 42.577478e6

#: Identifiers planted in every synthetic file (the de-identification test greps for them).
IDENTITY = {
    "PatientName": "Zorglub^Quentin",
    "PatientID": "PID8472615",
    "PatientBirthDate": "19570314",
    "PatientAddress": "17 Rue Imaginaire Villebrume",
    "InstitutionName": "Hopital Saint Xyzzy",
    "InstitutionAddress": "99 Boulevard Plugh Frobozz",
    "OperatorsName": "Operatrix^Wilhelmina",
    "ReferringPhysicianName": "Doctorovich^Ignatius",
    "DeviceSerialNumber": "SN77123499",
    "StationName": "STATIONQWZ",
    "StudyDate": "20230611",
    "SeriesDate": "20230611",
    "AcquisitionDate": "20230611",
    "ContentDate": "20230611",
    "StudyTime": "134512",
    "AcquisitionTime": "134733.125000",
    "AccessionNumber": "ACC55501234",
}


def phantom(shape=(16, 16, 8), echo_times=(0.004, 0.008, 0.012), b0=3.0, field_ppm=0.1):
    """Magnitude and true phase [rad, (-pi, pi]] per echo: a bright ellipsoid with a
    field gradient so every phase value occurs."""
    x, y, z = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    inside = (x**2 + y**2 + z**2) < 0.8
    mags, phases = [], []
    for te in echo_times:
        mags.append(np.where(inside, 800 * np.exp(-25 * te), 20).astype(np.float64))
        field = field_ppm * (x * 4 + y * 2)  # ppm
        phi = 2 * np.pi * GAMMA_BAR * b0 * te * field * 1e-6 + 0.3
        phases.append(np.angle(np.exp(1j * phi)))
    return mags, phases


def _base(vendor: str, study_uid: str, identity: dict[str, str], model: str) -> Dataset:
    ds = Dataset()
    ds.Modality = "MR"
    ds.Manufacturer = {"ge": "GE MEDICAL SYSTEMS", "philips": "Philips Medical Systems",
                       "siemens": "SIEMENS"}[vendor]
    ds.ManufacturerModelName = model
    ds.MagneticFieldStrength = 3
    ds.ImagingFrequency = 127.7
    ds.StudyInstanceUID = study_uid
    ds.FrameOfReferenceUID = generate_uid()
    ds.PatientPosition = "HFS"
    ds.PatientSex = "F"
    ds.PatientAge = "066Y"
    ds.StudyID = "1"
    for key, value in identity.items():
        setattr(ds, key, value)
    return ds


def _meta(sop_class: str, sop_uid: str) -> FileMetaDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return meta


def _stored(vendor: str, part: str, values: np.ndarray) -> tuple[np.ndarray, float, float,
                                                                   int]:
    """(stored integers, rescale slope, intercept, pixel representation) of one echo."""
    if part == "mag":
        return np.round(values).astype(np.uint16), 1.0, 0.0, 0
    if vendor == "siemens":  # 0..4095 ↔ [-pi, pi) via slope 2, intercept -4096
        codes = np.round((values + np.pi) / (2 * np.pi) * 4096) % 4096
        return codes.astype(np.uint16), 2.0, -4096.0, 0
    if vendor == "ge":  # milliradians, left-handed: stored = -phase * 1000
        return np.round(-values * 1000).astype(np.int16), 1.0, 0.0, 1
    # Philips: 0..4095 with RS = 2*3142/4095 mrad, RI = -3142 mrad (RescaleType mrad)
    slope = 2 * 3142.0 / 4095.0
    codes = np.clip(np.round((values * 1000 + 3142.0) / slope), 0, 4095)
    return codes.astype(np.uint16), slope, -3142.0, 0


def _image_type(vendor: str, part: str) -> list[str]:
    if vendor == "philips":
        return (["ORIGINAL", "PRIMARY", "M_FFE", "M", "FFE"] if part == "mag"
                else ["ORIGINAL", "PRIMARY", "PHASE MAP", "P", "FFE"])
    return ["ORIGINAL", "PRIMARY", "M", "ND"] if part == "mag" else ["ORIGINAL", "PRIMARY",
                                                                     "P", "ND"]


def _grey16(ds: Dataset, shape) -> None:
    """16-bit greyscale pixel format of an (X, Y) image: DICOM rows run along y."""
    ds.Rows, ds.Columns = shape[1], shape[0]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15


def _philips_private(ds: Dataset) -> None:
    block = ds.private_block(0x2005, "Philips MR Imaging DD 001", create=True)
    # The private scale slope SS of a real Philips phase export (RS·SS = 1000.1, not 1000:
    # dcm2niix's precise value DV/(RS·SS) is then only nearly radians).
    block.add_new(0x0E, "FL", 651.74)


def write_classic_megre(folder: Path, *, vendor: str = "siemens", study_uid: str | None = None,
                        identity: dict[str, str] | None = None,
                        echo_times=(0.004, 0.008, 0.012), shape=(16, 16, 8),
                        voxel=(2.0, 2.0, 2.5), parts=("mag", "phase"),
                        skip_echo: int | None = None, separate_series: bool | None = None,
                        volumes: tuple | None = None, ras_origin: tuple | None = None
                        ) -> dict:
    """One file per slice, echo and part; Siemens puts magnitude and phase in separate
    series, GE and Philips in one.  ``volumes``: (magnitudes, phases [rad]) per echo
    instead of the built-in phantom; with ``ras_origin`` (world RAS [mm] of voxel 0) the
    array axes run along R, A, S as in a NIfTI with a positive diagonal affine.  Returns
    the truth (phases, echo times, study UID)."""
    folder.mkdir(parents=True, exist_ok=True)
    identity = IDENTITY if identity is None else identity
    study_uid = study_uid or generate_uid()
    separate = (vendor == "siemens") if separate_series is None else separate_series
    if volumes is None:
        mags, phases = phantom(shape, echo_times)
    else:
        mags, phases = volumes
        shape = mags[0].shape
    series_uid = {p: generate_uid() for p in parts}
    if not separate:
        series_uid = dict.fromkeys(parts, generate_uid())
    n = 0
    for p_idx, part in enumerate(parts):
        for e, te in enumerate(echo_times, start=1):
            if skip_echo == e:
                continue
            stored, slope, inter, rep = _stored(vendor, part, (mags if part == "mag"
                                                               else phases)[e - 1])
            for k in range(shape[2]):
                n += 1
                uid = generate_uid()
                ds = _base(vendor, study_uid, identity, "Synthia")
                ds.file_meta = _meta(MR_STORAGE, uid)
                ds.SOPClassUID = MR_STORAGE
                ds.SOPInstanceUID = uid
                ds.SeriesInstanceUID = series_uid[part]
                ds.SeriesNumber = 2 + (p_idx if separate else 0)
                ds.SeriesDescription = "QSM_GRE" + ("_ph" if separate and part == "phase"
                                                    else "")
                ds.ProtocolName = "QSM_GRE"
                ds.ImageType = _image_type(vendor, part)
                ds.ScanningSequence = "GR"
                ds.SequenceVariant = "SP"
                ds.MRAcquisitionType = "3D"
                ds.EchoTime = f"{te * 1000:.3f}"
                ds.EchoNumbers = e
                ds.EchoTrainLength = len(echo_times)
                ds.RepetitionTime = "30"
                ds.FlipAngle = "15"
                ds.SliceThickness = f"{voxel[2]}"
                ds.SpacingBetweenSlices = f"{voxel[2]}"
                ds.PixelSpacing = [f"{voxel[0]}", f"{voxel[1]}"]
                if ras_origin is None:
                    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
                    ds.ImagePositionPatient = [-16.0, -16.0, -10.0 + k * voxel[2]]
                else:  # DICOM is LPS: rows toward R and columns toward A are -x and -y
                    ds.ImageOrientationPatient = [-1, 0, 0, 0, -1, 0]
                    ds.ImagePositionPatient = [-ras_origin[0], -ras_origin[1],
                                               ras_origin[2] + k * voxel[2]]
                ds.SliceLocation = ds.ImagePositionPatient[2]
                ds.InstanceNumber = (e - 1) * shape[2] + k + 1
                ds.AcquisitionNumber = 1
                _grey16(ds, shape)
                ds.PixelRepresentation = rep
                ds.RescaleSlope = f"{slope:.8g}"
                ds.RescaleIntercept = f"{inter:g}"
                if vendor == "philips" and part == "phase":
                    ds.RescaleType = "mrad"
                    _philips_private(ds)
                if vendor == "ge" and part == "phase":
                    ds.add_new(0x0043102F, "SS", 1)  # GE private image type: phase
                # DICOM rows run along y, columns along x.
                ds.PixelData = np.ascontiguousarray(stored[:, :, k].T).tobytes()
                pydicom.dcmwrite(folder / f"IM{n:05d}", ds, enforce_file_format=True)
    return {"phases": phases, "echo_times": echo_times, "study_uid": study_uid,
            "mags": mags}


def write_enhanced_megre(folder: Path, *, vendor: str = "philips", study_uid: str | None = None,
                         identity: dict[str, str] | None = None,
                         echo_times=(0.004, 0.008, 0.012), shape=(16, 16, 8),
                         voxel=(2.0, 2.0, 2.5)) -> dict:
    """Enhanced MR multi-frame files, one per part (magnitude, phase), each holding every
    slice of every echo as frames."""
    folder.mkdir(parents=True, exist_ok=True)
    identity = IDENTITY if identity is None else identity
    study_uid = study_uid or generate_uid()
    mags, phases = phantom(shape, echo_times)
    for p_idx, part in enumerate(("mag", "phase")):
        uid = generate_uid()
        ds = _base(vendor, study_uid, identity, "Synthia")
        ds.file_meta = _meta(ENHANCED_MR_STORAGE, uid)
        ds.SOPClassUID = ENHANCED_MR_STORAGE
        ds.SOPInstanceUID = uid
        ds.SeriesInstanceUID = generate_uid()
        ds.SeriesNumber = 5 + p_idx
        ds.SeriesDescription = "QSM_GRE_enh"
        ds.ProtocolName = "QSM_GRE_enh"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "M" if part == "mag" else "P", "NONE"]
        ds.ScanningSequence = "GR"
        ds.SequenceVariant = "SP"
        ds.MRAcquisitionType = "3D"
        ds.EchoTrainLength = len(echo_times)
        ds.InstanceNumber = 1
        ds.AcquisitionNumber = 1
        _grey16(ds, shape)
        frames = []
        per_frame = []
        dim_org = generate_uid()
        shared = Dataset()
        pm = Dataset()
        pm.PixelSpacing = [f"{voxel[0]}", f"{voxel[1]}"]
        pm.SliceThickness = f"{voxel[2]}"
        pm.SpacingBetweenSlices = f"{voxel[2]}"
        shared.PixelMeasuresSequence = Sequence([pm])
        po = Dataset()
        po.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        shared.PlaneOrientationSequence = Sequence([po])
        timing = Dataset()
        timing.RepetitionTime = 30
        timing.FlipAngle = 15
        timing.EchoTrainLength = len(echo_times)
        shared.MRTimingAndRelatedParametersSequence = Sequence([timing])
        rep = 0
        slope = inter = None
        for e, te in enumerate(echo_times, start=1):
            stored, slope, inter, rep = _stored(vendor, part, (mags if part == "mag"
                                                               else phases)[e - 1])
            for k in range(shape[2]):
                frames.append(np.ascontiguousarray(stored[:, :, k].T))
                fr = Dataset()
                fc = Dataset()
                fc.StackID = "1"
                fc.InStackPositionNumber = k + 1
                fc.TemporalPositionIndex = 1
                fc.DimensionIndexValues = [1, e, k + 1]
                fr.FrameContentSequence = Sequence([fc])
                pp = Dataset()
                pp.ImagePositionPatient = [-16.0, -16.0, -10.0 + k * voxel[2]]
                fr.PlanePositionSequence = Sequence([pp])
                echo = Dataset()
                echo.EffectiveEchoTime = te * 1000
                fr.MREchoSequence = Sequence([echo])
                ft = Dataset()
                ft.FrameType = ["ORIGINAL", "PRIMARY", "M" if part == "mag" else "P", "NONE"]
                fr.MRImageFrameTypeSequence = Sequence([ft])
                pvt = Dataset()
                pvt.RescaleSlope = f"{slope:.8g}"
                pvt.RescaleIntercept = f"{inter:g}"
                pvt.RescaleType = "mrad" if part == "phase" and vendor == "philips" else "US"
                fr.PixelValueTransformationSequence = Sequence([pvt])
                per_frame.append(fr)
        ds.PixelRepresentation = rep
        dims = []
        for pointer, group in ((0x00209056, 0x00209111), (0x00189082, 0x00189114),
                               (0x00209057, 0x00209111)):
            d = Dataset()
            d.DimensionOrganizationUID = dim_org
            d.DimensionIndexPointer = pointer
            d.FunctionalGroupPointer = group
            dims.append(d)
        org = Dataset()
        org.DimensionOrganizationUID = dim_org
        ds.DimensionOrganizationSequence = Sequence([org])
        ds.DimensionIndexSequence = Sequence(dims)
        ds.SharedFunctionalGroupsSequence = Sequence([shared])
        ds.PerFrameFunctionalGroupsSequence = Sequence(per_frame)
        ds.NumberOfFrames = len(frames)
        ds.PixelData = np.stack(frames).tobytes()
        pydicom.dcmwrite(folder / f"ENH{p_idx}", ds, enforce_file_format=True)
    return {"phases": phases, "echo_times": echo_times, "study_uid": study_uid,
            "mags": mags}


def write_dicomdir(path: Path) -> None:
    """A bare DICOM index object (no StudyInstanceUID), as found on exported CDs."""
    ds = Dataset()
    ds.file_meta = _meta("1.2.840.10008.1.3.10", generate_uid())
    ds.FileSetID = "EXPORT"
    pydicom.dcmwrite(path, ds, enforce_file_format=True)
