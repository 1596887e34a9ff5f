"""A seeded synthetic lung-CT cohort written as real DICOM series, one nodule per patient.

Why a generator: tests and the demo need DICOM that exercises the reader the way a PACS export
does (shuffled file names, nested folders, slices stored head-to-feet, several transfer syntaxes,
a localizer, an SR document, a stray README) without shipping patient data.

Anatomy is a miniature chest on the true world grid (LPS mm): air (-1000 HU) outside an
elliptic body of soft tissue (~40 HU), a rib ring and spine (~700 HU), two lungs (~-850 HU) with
vessels (soft-tissue tubes), and one nodule whose look depends on its class:

=================  ========  ==================================================================
class              share     look
=================  ========  ==================================================================
solid              50 %      dense (~40 HU) lobulated sphere, 6-14 mm
part_solid         25 %      hazy ground-glass (~-600 HU) ball with a solid core
ground_glass       17 %      hazy ground-glass ball (~-600 HU), 8-16 mm, soft edge
calcified_benign    8 %      small very dense ball (400-900 HU), 4-9 mm
=================  ========  ==================================================================

Every class gets at least two patients when n_patients >= 8. Gaussian noise (sd 25 HU) and a
slight blur make the classes learnable but not trivial.

Layout::

    out_dir/images/README.txt                               (not DICOM; readers must skip it)
    out_dir/images/case_000/study_1/series_2/<random>.dcm   the CT series
    out_dir/images/case_000/study_1/series_1/<random>.dcm   a one-image localizer (extras)
    out_dir/images/case_000/study_1/series_9/<random>.dcm   an SR document (extras, case 0 only)
    out_dir/labels.csv    patient_id,label,center_x_mm,center_y_mm,center_z_mm,diameter_mm

Folder and file names carry no identifier (so a path printed in a message never leaks one);
the identifying tags (see `data_prep.deid.IDENTIFYING_TAGS`) hold fake but realistic values, or
the strings given in `sentinels`.
"""
from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Sequence

import numpy as np

from ..deid import IDENTIFYING_TAGS
from ..io import atomic_write_bytes, atomic_write_text

__all__ = ["generate_ct", "CT_CLASSES", "CT_CLASS_SHARES"]

CT_CLASSES = ("solid", "part_solid", "ground_glass", "calcified_benign")
CT_CLASS_SHARES = (0.50, 0.25, 0.17, 0.08)

_FIRST = ["JOHN", "MARY", "AHMED", "LI", "SOFIA", "PIERRE", "ANNA", "KENJI", "FATIMA", "LUCAS", "EMMA", "IVAN"]
_LAST = ["SMITH", "GARCIA", "MUELLER", "TANAKA", "ROSSI", "DUBOIS", "NOWAK", "SILVA", "KHAN", "JOHANSSON"]
_INSTITUTIONS = ["St Elsewhere General Hospital", "Riverside University Clinic", "Northfield Medical Centre"]
_COMPRESS_ALIASES = {"rle": "1.2.840.10008.1.2.5", "j2k": "1.2.840.10008.1.2.4.90", "jpeg2000": "1.2.840.10008.1.2.4.90",
                     "jpegls": "1.2.840.10008.1.2.4.80", "big_endian": "1.2.840.10008.1.2.2"}
# tags whose value must differ per patient (or per slice for SOPInstanceUID) to stay valid DICOM
_UNIQUE_TAGS = {"PatientName", "PatientID", "OtherPatientIDs", "AccessionNumber", "StudyInstanceUID", "SeriesInstanceUID",
                "SOPInstanceUID", "FrameOfReferenceUID", "StudyID"}


def _class_counts(n: int) -> list[int]:
    """Patients per class: the shares above, at least two per class when n >= 8."""
    target = np.asarray(CT_CLASS_SHARES) * n
    floor = 2 if n >= 8 else 0
    counts = np.maximum(floor, np.floor(target)).astype(int)
    while counts.sum() < n:
        counts[int(np.argmax(target - counts))] += 1
    while counts.sum() > n:
        k = int(np.argmax(np.where(counts > floor, counts - target, -np.inf)))
        counts[k] -= 1
    return [int(c) for c in counts]


def _nodule(cls: str, rng: np.random.Generator, d: np.ndarray, dirs: np.ndarray, radius: float) -> tuple[np.ndarray, np.ndarray]:
    """(weight in [0, 1], HU) of a nodule over voxels at distance d (mm) from its centre."""
    if cls == "solid":
        # lobulation: the radius varies with direction through a few random cosine lobes
        lobes = np.zeros_like(d)
        for _ in range(3):
            axis = rng.normal(size=3)
            axis /= np.linalg.norm(axis)
            lobes += 0.12 * np.cos(rng.integers(2, 5) * np.arccos(np.clip(dirs @ axis, -1, 1)) + rng.uniform(0, 6.28))
        r = radius * (1 + lobes)
        w = np.clip((r - d) / 0.8 + 0.5, 0, 1)
        return w, np.full_like(d, rng.uniform(20, 60))
    if cls == "ground_glass":
        w = np.exp(-0.5 * (d / (0.6 * radius)) ** 4)
        return w, np.full_like(d, rng.uniform(-650, -550))
    if cls == "part_solid":
        ggo = np.exp(-0.5 * (d / (0.6 * radius)) ** 4)
        core = np.clip((0.4 * radius - d) / 0.8 + 0.5, 0, 1)
        hu_ggo, hu_core = rng.uniform(-650, -550), rng.uniform(10, 50)
        w = np.maximum(ggo, core)
        hu = np.where(core > 0, hu_core * core + hu_ggo * (1 - core), hu_ggo)
        return w, hu
    if cls == "calcified_benign":
        w = np.clip((radius - d) / 0.6 + 0.5, 0, 1)
        return w, np.full_like(d, rng.uniform(400, 900))
    raise ValueError(cls)


def _phantom(rng: np.random.Generator, cls: str, shape: tuple[int, int, int], spacing: tuple[float, float, float],
             origin: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """HU volume [z, y, x] on an axial LPS grid, the nodule centre (world mm) and diameter (mm)."""
    from scipy import ndimage

    nz, ny, nx = shape
    sz, sy, sx = spacing
    z = origin[2] + np.arange(nz) * sz
    y = origin[1] + np.arange(ny) * sy
    x = origin[0] + np.arange(nx) * sx
    cx, cy = origin[0] + (nx - 1) * sx / 2, origin[1] + (ny - 1) * sy / 2
    Z, Y, X = np.meshgrid(z, y, x, indexing="ij")
    ax, ay = 0.46 * nx * sx, 0.36 * ny * sy
    rb = ((X - cx) / ax) ** 2 + ((Y - cy) / ay) ** 2
    hu = np.full(shape, -1000.0)
    hu[rb <= 1] = 40.0
    # ribs: a ring broken into segments, plus a spine disk at the back (posterior = +y in LPS)
    theta = np.arctan2(Y - cy, X - cx)
    ring = (rb > 0.80) & (rb < 0.90) & (np.cos(10 * theta + 0.8 * Z / 10.0) > -0.2)
    hu[ring] = 700.0
    spine = ((X - cx) ** 2 + (Y - (cy + 0.7 * ay)) ** 2) < (0.13 * ax) ** 2
    hu[spine] = 700.0
    # lungs: two ellipses left and right of the mediastinum
    lungs = []
    for side in (-1, 1):
        lx, ly = cx + side * 0.42 * ax, cy - 0.05 * ay
        rx, ry = 0.30 * ax, 0.62 * ay
        lung = ((X - lx) / rx) ** 2 + ((Y - ly) / ry) ** 2 <= 1
        hu[lung] = -850.0
        lungs.append((lx, ly, rx, ry))
    # vessels: soft-tissue tubes wandering through the lungs
    for _ in range(8):
        lx, ly, rx, ry = lungs[rng.integers(2)]
        p0 = np.array([lx + rng.uniform(-0.6, 0.6) * rx, ly + rng.uniform(-0.6, 0.6) * ry, z[0]])
        p1 = np.array([lx + rng.uniform(-0.6, 0.6) * rx, ly + rng.uniform(-0.6, 0.6) * ry, z[-1]])
        t = np.clip(((X - p0[0]) * (p1[0] - p0[0]) + (Y - p0[1]) * (p1[1] - p0[1]) + (Z - p0[2]) * (p1[2] - p0[2]))
                    / np.sum((p1 - p0) ** 2), 0, 1)
        dist = np.sqrt((X - p0[0] - t * (p1[0] - p0[0])) ** 2 + (Y - p0[1] - t * (p1[1] - p0[1])) ** 2 + (Z - p0[2] - t * (p1[2] - p0[2])) ** 2)
        inside = (dist < rng.uniform(0.6, 1.4)) & (hu == -850.0)
        hu[inside] = 40.0
    # the nodule, kept well inside one lung and inside the slab
    diameter = {"solid": rng.uniform(6, 14), "part_solid": rng.uniform(9, 16), "ground_glass": rng.uniform(8, 16),
                "calcified_benign": rng.uniform(4, 9)}[cls]
    radius = diameter / 2
    lx, ly, rx, ry = lungs[rng.integers(2)]
    ang = rng.uniform(0, 2 * np.pi)
    frac = rng.uniform(0, 0.35)
    centre = np.array([lx + frac * max(rx - radius, 0) * np.cos(ang), ly + frac * max(ry - radius, 0) * np.sin(ang),
                       rng.uniform(z[0] + 0.35 * (z[-1] - z[0]), z[0] + 0.65 * (z[-1] - z[0]))])
    vec = np.stack([X - centre[0], Y - centre[1], Z - centre[2]], axis=-1)
    d = np.linalg.norm(vec, axis=-1)
    near = d < 1.6 * radius + 3
    dirs = vec[near] / np.maximum(d[near], 1e-6)[:, None]
    w, nod = _nodule(cls, rng, d[near], dirs, radius)
    hu[near] = hu[near] * (1 - w) + nod * w
    hu = ndimage.gaussian_filter(hu, sigma=(0.4, 0.6, 0.6))
    hu += rng.normal(0, 25, size=shape) * (hu > -980)
    return np.clip(np.rint(hu), -1024, 3071), centre, float(diameter)


def _fake_identity(rng: np.random.Generator, i: int) -> dict[str, str]:
    birth = f"{rng.integers(1935, 1985)}{rng.integers(1, 13):02d}{rng.integers(1, 29):02d}"
    study = f"{rng.integers(2016, 2024)}{rng.integers(1, 13):02d}{rng.integers(1, 29):02d}"
    return {
        "PatientName": f"{_LAST[rng.integers(len(_LAST))]}^{_FIRST[rng.integers(len(_FIRST))]}",
        "PatientID": f"MRN{rng.integers(10**6, 10**7)}",
        "OtherPatientIDs": f"NHS{rng.integers(10**8, 10**9)}",
        "PatientBirthDate": birth,
        "AccessionNumber": f"ACC{rng.integers(10**7, 10**8)}",
        "InstitutionName": _INSTITUTIONS[rng.integers(len(_INSTITUTIONS))],
        "InstitutionAddress": f"{rng.integers(1, 300)} Hospital Road, Springfield",
        "ReferringPhysicianName": f"{_LAST[rng.integers(len(_LAST))]}^{_FIRST[rng.integers(len(_FIRST))]}^^DR",
        "PerformingPhysicianName": f"{_LAST[rng.integers(len(_LAST))]}^{_FIRST[rng.integers(len(_FIRST))]}",
        "OperatorsName": f"{_LAST[rng.integers(len(_LAST))]}^{_FIRST[rng.integers(len(_FIRST))]}",
        "StudyDate": study, "SeriesDate": study, "AcquisitionDate": study, "ContentDate": study,
        "StudyTime": f"{rng.integers(7, 19):02d}{rng.integers(0, 60):02d}00",
        "StudyID": f"{rng.integers(1000, 9999)}",
    }


def _apply_sentinels(ident: dict[str, str], sentinels: dict[str, str], i: int) -> dict[str, str]:
    out = dict(ident)
    for tag, value in sentinels.items():
        if tag in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "FrameOfReferenceUID"):
            out[tag] = f"{value}.{i + 1}"  # UIDs get per-patient (and per-instance) numeric suffixes
        elif tag in _UNIQUE_TAGS:
            out[tag] = f"{value}{i:03d}"
        else:
            out[tag] = value
    return out


def _base_dataset(ident: dict[str, str], uids: dict[str, str], sop_class: str, modality: str):
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, PYDICOM_IMPLEMENTATION_UID

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = sop_class
    ds.Modality = modality
    ds.Manufacturer = "ECL Synthetic"
    for tag in ("PatientName", "PatientID", "OtherPatientIDs", "PatientBirthDate", "AccessionNumber", "InstitutionName",
                "InstitutionAddress", "ReferringPhysicianName", "PerformingPhysicianName", "OperatorsName",
                "StudyDate", "SeriesDate", "AcquisitionDate", "ContentDate", "StudyTime", "StudyID"):
        setattr(ds, tag, ident[tag])
    ds.PatientSex = "O"
    ds.StudyInstanceUID = uids["StudyInstanceUID"]
    ds.FrameOfReferenceUID = uids["FrameOfReferenceUID"]
    return ds


def _write(ds, path: Path, transfer_syntax: str | None) -> None:
    from pydicom.uid import UID

    if transfer_syntax == "1.2.840.10008.1.2.2":  # Explicit VR Big Endian (retired, still met in archives)
        arr = ds.pixel_array
        ds.PixelData = arr.astype(arr.dtype.newbyteorder(">")).tobytes()
        ds.file_meta.TransferSyntaxUID = UID(transfer_syntax)
    elif transfer_syntax:
        ds.compress(UID(transfer_syntax))
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    atomic_write_bytes(path, buf.getvalue())


def _available_syntaxes(compress: Sequence[str] | None) -> list[str]:
    if not compress:
        return []
    from pydicom.pixels import get_encoder

    out = []
    for name in compress:
        uid = _COMPRESS_ALIASES.get(str(name).lower(), str(name))
        if uid == "1.2.840.10008.1.2.2":
            out.append(uid)
            continue
        try:
            if get_encoder(uid).is_available:
                out.append(uid)
        except NotImplementedError:
            pass  # no encoder for it in pydicom: skipped, as documented
    return out


def generate_ct(
    out_dir: str | Path,
    n_patients: int = 24,
    seed: int = 0,
    sentinels: dict[str, str] | None = None,
    slices: int = 40,
    size: int = 96,
    compress: list[str] | None = None,
    extras: bool = True,
) -> dict[str, Path]:
    """Write a synthetic lung-CT cohort of real DICOM series and its labels CSV.

    Args:
        out_dir: destination; `images/` and `labels.csv` are created in it.
        n_patients: one CT series (and one nodule) per patient.
        seed: everything (anatomy, nodules, names, UIDs, file names) follows from it.
        sentinels: DICOM keyword -> string planted in that identifying tag of every patient
            (suffixed per patient where DICOM needs unique values, e.g. "SENTINEL-ID" ->
            "SENTINEL-ID003"; UIDs get ".<n>"). labels.csv then holds the planted PatientID.
        slices, size: slices per series and rows = columns per slice.
        compress: transfer syntaxes ("rle", "j2k", "jpegls", "big_endian" or UIDs) used in turn
            for every second slice of every series; those without an encoder here are skipped.
        extras: add a localizer per patient, an SR document to the first patient and a README.txt.

    Returns:
        dict(images=Path of the DICOM tree, labels=Path of labels.csv).
    """
    import pydicom
    from pydicom.dataset import Dataset
    from pydicom.uid import generate_uid

    if sentinels:
        unknown = sorted(set(sentinels) - set(IDENTIFYING_TAGS))
        if unknown:
            raise ValueError(f"sentinels for tags not in IDENTIFYING_TAGS: {unknown}")
    out_dir = Path(out_dir)
    images = out_dir / "images"
    images.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    counts = _class_counts(n_patients)
    classes = [c for c, k in zip(CT_CLASSES, counts) for _ in range(k)]
    rng.shuffle(classes)
    syntaxes = _available_syntaxes(compress)
    ct_class = pydicom.uid.CTImageStorage
    rows: list[dict[str, object]] = []

    def uid(*parts: object) -> str:
        return generate_uid(entropy_srcs=["ecl-synthetic-ct", str(seed), *map(str, parts)])

    for i, cls in enumerate(classes):
        prng = np.random.default_rng([seed, i])
        ident = _fake_identity(prng, i)
        uids = {"StudyInstanceUID": uid(i, "study"), "SeriesInstanceUID": uid(i, "series"),
                "FrameOfReferenceUID": uid(i, "for"), "SOPInstanceUID": uid(i, "sop")}
        if sentinels:
            ident = _apply_sentinels(ident, sentinels, i)
            uids = {k: (f"{sentinels[k]}.{i + 1}" if k in sentinels else v) for k, v in uids.items()}
        ps = float(prng.uniform(0.7, 0.9))
        thick = float(prng.choice([1.0, 1.25, 1.5]))
        origin = np.array([-(size - 1) * ps / 2 + prng.uniform(-5, 5), -(size - 1) * ps / 2 + prng.uniform(-5, 5),
                           prng.uniform(-250, -150)])
        hu, centre, diameter = _phantom(prng, cls, (slices, size, size), (thick, ps, ps), origin)
        signed = i % 3 == 2  # some series store int16 with intercept 0, the rest uint16 with -1024
        intercept = 0.0 if signed else -1024.0
        stored = (hu - intercept).astype(np.int16 if signed else np.uint16)
        folder = images / f"case_{i:03d}" / "study_1" / "series_2"
        folder.mkdir(parents=True, exist_ok=True)
        head_first = i % 2 == 0  # instance numbers run head-to-feet for half the series
        for k in range(slices):
            ds = _base_dataset(ident, uids, ct_class, "CT")
            ds.SeriesInstanceUID = uids["SeriesInstanceUID"]
            ds.SOPInstanceUID = f"{uids['SOPInstanceUID']}.{k + 1}" if sentinels and "SOPInstanceUID" in sentinels else uid(i, "sop", k)
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            ds.SeriesNumber = 2
            ds.SeriesDescription = "CHEST 1.0 B45f"
            ds.InstanceNumber = slices - k if head_first else k + 1
            ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
            ds.ImagePositionPatient = [f"{origin[0]:.4f}", f"{origin[1]:.4f}", f"{origin[2] + k * thick:.4f}"]
            ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
            ds.PixelSpacing = [f"{ps:.6f}", f"{ps:.6f}"]
            ds.SliceThickness = thick
            if i % 2:
                ds.SpacingBetweenSlices = thick
            ds.SliceLocation = f"{origin[2] + k * thick:.4f}"
            ds.KVP = 120
            ds.RescaleSlope = 1
            ds.RescaleIntercept = int(intercept)
            ds.RescaleType = "HU"
            ds.WindowCenter, ds.WindowWidth = -600, 1500
            ds.SamplesPerPixel = 1
            ds.PhotometricInterpretation = "MONOCHROME2"
            ds.Rows, ds.Columns = size, size
            ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16 if signed else 12, 15 if signed else 11
            ds.PixelRepresentation = 1 if signed else 0
            ds.PixelData = np.ascontiguousarray(stored[k]).tobytes()
            ts = syntaxes[(k // 2) % len(syntaxes)] if syntaxes and k % 2 == 1 else None
            name = prng.bytes(6).hex().upper() + ".dcm"
            _write(ds, folder / name, ts)
        if extras:
            loc = _base_dataset(ident, uids, ct_class, "CT")
            loc.SeriesInstanceUID = uid(i, "localizer") if not (sentinels and "SeriesInstanceUID" in sentinels) else f"{sentinels['SeriesInstanceUID']}.{i + 1}.1"
            loc.SOPInstanceUID = uid(i, "localizer", 0) if not (sentinels and "SOPInstanceUID" in sentinels) else f"{sentinels['SOPInstanceUID']}.{i + 1}.0"
            loc.file_meta.MediaStorageSOPInstanceUID = loc.SOPInstanceUID
            loc.SeriesNumber, loc.InstanceNumber, loc.SeriesDescription = 1, 1, "Topogram 0.6 T20f"
            loc.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
            loc.ImagePositionPatient = [f"{origin[0]:.4f}", "0", f"{origin[2] + (slices - 1) * thick:.4f}"]
            loc.ImageOrientationPatient = [1, 0, 0, 0, 0, -1]  # coronal projection
            loc.PixelSpacing = [f"{thick:.4f}", f"{ps:.6f}"]
            loc.RescaleSlope, loc.RescaleIntercept = 1, -1024
            loc.SamplesPerPixel, loc.PhotometricInterpretation = 1, "MONOCHROME2"
            loc.Rows, loc.Columns = slices, size
            loc.BitsAllocated, loc.BitsStored, loc.HighBit, loc.PixelRepresentation = 16, 12, 11, 0
            proj = np.clip(hu.mean(axis=1)[::-1] + 1024, 0, 4095).astype(np.uint16)
            loc.PixelData = proj.tobytes()
            (images / f"case_{i:03d}" / "study_1" / "series_1").mkdir(parents=True, exist_ok=True)
            _write(loc, images / f"case_{i:03d}" / "study_1" / "series_1" / (prng.bytes(6).hex().upper() + ".dcm"), None)
            if i == 0:
                sr = _base_dataset(ident, uids, pydicom.uid.BasicTextSRStorage, "SR")
                sr.SeriesInstanceUID = uid(i, "sr")
                sr.SOPInstanceUID = uid(i, "sr", 0)
                sr.file_meta.MediaStorageSOPInstanceUID = sr.SOPInstanceUID
                sr.SeriesNumber, sr.InstanceNumber = 9, 1
                sr.ValueType, sr.CompletionFlag, sr.VerificationFlag = "CONTAINER", "COMPLETE", "UNVERIFIED"
                item = Dataset()
                item.RelationshipType, item.ValueType, item.TextValue = "CONTAINS", "TEXT", "Synthetic report: nodule present."
                sr.ContentSequence = [item]
                (images / f"case_{i:03d}" / "study_1" / "series_9").mkdir(parents=True, exist_ok=True)
                _write(sr, images / f"case_{i:03d}" / "study_1" / "series_9" / "REPORT.dcm", None)
        rows.append({"patient_id": ident["PatientID"], "label": cls, "center_x_mm": f"{centre[0]:.3f}",
                     "center_y_mm": f"{centre[1]:.3f}", "center_z_mm": f"{centre[2]:.3f}", "diameter_mm": f"{diameter:.2f}"})
    if extras:
        atomic_write_text(images / "README.txt", "Synthetic lung CT cohort written by data_prep.synthetic.ct (not DICOM).\n")
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    labels = out_dir / "labels.csv"
    atomic_write_text(labels, buf.getvalue())
    return {"images": images, "labels": labels}
