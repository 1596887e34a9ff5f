"""DICOM CT series: find them in a tree, check their geometry, decode them to Hounsfield units.

Identifying tags stop here. `SeriesInfo` keeps PatientID and the instance UIDs in memory only
(to match label rows and to derive pseudonyms; they are excluded from its repr), and every
message this module raises names files by the path the user gave and series by modality, series
number, description and file count, never by a tag value that identifies a person or a visit.
Since folder and file names can carry identifiers too, `prepare_ct` rewrites these messages to
pseudonyms and positions before they leave (`prepare_lung_ct._Namer`); pydicom's validation
warnings, which quote values, are silenced while reading (`quiet_pydicom`).

Why slices are ordered by position along the slice normal, `dot(ImagePositionPatient,
cross(row, col))`: file names are arbitrary and InstanceNumber is set by the scanner in whatever
direction it acquired (often head to feet), while the position is the geometry itself. That is
also how GDCM (and so SimpleITK) orders a series, so both readers agree voxel for voxel.

World convention: DICOM patient coordinates (LPS, millimetres). `Volume.direction[:, a]` is the
world direction of index axis a, in ITK order (a=0: columns i, 1: rows j, 2: slices k), exactly
SimpleITK's `GetDirection()` reshaped to 3x3; `origin` is the world position of voxel [0, 0, 0].
"""
from __future__ import annotations

import contextlib
import logging
import warnings
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from .errors import DataPrepError

__all__ = ["Volume", "SliceHeader", "SeriesInfo", "SeriesGeometry", "load_series", "index_dicom_tree",
           "select_ct_series", "check_geometry", "read_series_volume", "DICOM_SUFFIXES"]

#: Files with these suffixes must be DICOM; other files without the 'DICM' prefix are skipped.
DICOM_SUFFIXES = (".dcm", ".dicom", ".ima")

_HEADER_TAGS = [
    "Modality", "SOPClassUID", "SeriesInstanceUID", "StudyInstanceUID", "PatientID", "SeriesNumber",
    "SeriesDescription", "ImageType", "ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing",
    "Rows", "Columns", "NumberOfFrames", "SliceThickness", "SpacingBetweenSlices",
]


@dataclass
class Volume:
    """A 3D image in Hounsfield units with its place in the world.

    Attributes:
        array: float32 [z, y, x] (slices, rows, columns).
        spacing: (z, y, x) voxel size in mm.
        origin: (x, y, z) world position (LPS, mm) of voxel [0, 0, 0].
        direction: float64 [3, 3]; column a is the world direction of index axis a in (x, y, z)
            order, as SimpleITK's GetDirection().
    """

    array: np.ndarray = field(repr=False)
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: np.ndarray = field(default_factory=lambda: np.eye(3))

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(v) for v in self.array.shape)  # type: ignore[return-value]

    def index_to_world(self, kji: Sequence[float]) -> np.ndarray:
        """World (x, y, z) mm of a (k, j, i) index (fractional indices allowed)."""
        k, j, i = (float(v) for v in kji)
        sz, sy, sx = self.spacing
        return np.asarray(self.origin, float) + np.asarray(self.direction, float) @ np.array([i * sx, j * sy, k * sz])

    def world_to_index(self, xyz: Sequence[float]) -> np.ndarray:
        """Fractional (k, j, i) index of a world (x, y, z) mm point."""
        sz, sy, sx = self.spacing
        ijk = np.linalg.solve(np.asarray(self.direction, float), np.asarray(xyz, float) - np.asarray(self.origin, float))
        ijk = ijk / np.array([sx, sy, sz])
        return ijk[::-1].copy()

    def contains_index(self, kji: Sequence[float], margin: float = 0.5) -> bool:
        """True when a fractional (k, j, i) index lies in the grid, voxels counting `margin` beyond their centre."""
        kji = np.asarray(kji, float)
        return bool(np.all(kji >= -margin) and np.all(kji <= np.asarray(self.array.shape) - 1 + margin))


@dataclass
class SliceHeader:
    """The geometry of one stored image, read without its pixels."""

    path: Path
    position: tuple[float, float, float] | None
    orientation: tuple[float, ...] | None
    pixel_spacing: tuple[float, float] | None
    rows: int
    columns: int
    frames: int
    thickness: float | None
    spacing_between: float | None


@dataclass
class SeriesInfo:
    """One series found in a tree: what prepare needs, identifiers in memory only.

    Attributes:
        patient_id, study_uid, series_uid: raw identifiers, kept to match label rows and to
            compute pseudonyms; excluded from repr and never written or printed.
        modality, series_number, description, image_type, sop_class: what describes the series
            in messages and decides whether it is a CT image series.
        slices: one SliceHeader per file.
    """

    patient_id: str = field(repr=False)
    study_uid: str = field(repr=False)
    series_uid: str = field(repr=False)
    modality: str
    series_number: str
    description: str
    image_type: tuple[str, ...]
    sop_class: str
    slices: list[SliceHeader]

    @property
    def n_files(self) -> int:
        return len(self.slices)

    @property
    def folder(self) -> Path:
        parents = {s.path.parent for s in self.slices}
        return parents.pop() if len(parents) == 1 else Path(*_common_parts([s.path.parent for s in self.slices]))

    @property
    def is_image(self) -> bool:
        """Holds images with a geometry (not an SR document, presentation state, raw data...)."""
        return all(s.rows > 0 and s.columns > 0 and s.position is not None and s.orientation is not None for s in self.slices)

    @property
    def is_localizer(self) -> bool:
        return "LOCALIZER" in self.image_type

    def describe(self) -> str:
        """A short, identifier-free description: modality, number, description, files."""
        number = f" #{self.series_number}" if self.series_number else ""
        desc = f" '{self.description}'" if self.description else ""
        kind = " localizer" if self.is_localizer else ""
        names = ", ".join(s.path.name for s in self.slices[:2]) + (", ..." if self.n_files > 2 else "")
        return f"{self.modality or '?'}{kind} series{number}{desc} ({self.n_files} file(s) in {self.folder}: {names})"


@dataclass
class SeriesGeometry:
    """A checked series geometry: slice order and the voxel grid, before any pixel is decoded."""

    order: list[int]
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: np.ndarray
    shape: tuple[int, int, int]

    def as_volume_grid(self) -> Volume:
        """A Volume with this grid and no pixels: its array is a zero-strided view of one 0."""
        return Volume(array=np.broadcast_to(np.float32(0), self.shape), spacing=self.spacing, origin=self.origin, direction=self.direction)


def _common_parts(paths: list[Path]) -> tuple[str, ...]:
    parts = [p.parts for p in paths]
    out = []
    for group in zip(*parts):
        if len(set(group)) != 1:
            break
        out.append(group[0])
    return tuple(out) or (".",)


def _floats(value: Any, n: int) -> tuple[float, ...] | None:
    if value is None:
        return None
    seq = [value] if isinstance(value, (str, bytes, int, float)) else list(value)
    try:
        vals = tuple(float(v) for v in seq)
    except (TypeError, ValueError):
        return None
    return vals if len(vals) == n else None


@contextlib.contextmanager
def quiet_pydicom():
    """Silence pydicom's value validation while reading.

    Why: pydicom warns (on stderr and its logger) with the offending value itself, e.g.
    "Invalid value for VR UI: '1.2.826.0.1.3680043.10.054321.1'" for a UID with a leading-zero
    component, common in legacy exports; that would print a study or series UID. The values are
    only read into memory and pseudonymised, so nothing is lost by not validating them.
    """
    import pydicom.config

    settings = pydicom.config.settings
    old_mode = settings.reading_validation_mode
    logger = logging.getLogger("pydicom")
    old_disabled = logger.disabled
    settings.reading_validation_mode = pydicom.config.IGNORE
    logger.disabled = True
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        settings.reading_validation_mode = old_mode
        logger.disabled = old_disabled


def _is_part10(path: Path) -> bool:
    try:
        with open(path, "rb") as fh:
            head = fh.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:132] == b"DICM"


def _read_header(path: Path) -> tuple[SliceHeader, dict[str, Any]] | None:
    """Header of one file; None for a file that is not DICOM and does not claim to be.

    Raises:
        DataPrepError: a `.dcm`-like file without the DICOM file meta header, or an unreadable header.
    """
    import pydicom

    if not _is_part10(path):
        if path.suffix.lower() in DICOM_SUFFIXES:
            raise DataPrepError(
                f"{path}: not a DICOM file: it has no DICOM file meta header (the 'DICM' prefix at byte 128 is "
                f"missing). Re-export it from the PACS as a DICOM Part 10 file, or move it out of the input folder.",
                str(path),
            )
        return None
    try:
        with quiet_pydicom():
            ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=_HEADER_TAGS)
            info = {k: ds.get(k) for k in _HEADER_TAGS}
        header = SliceHeader(
            path=path,
            position=_floats(info["ImagePositionPatient"], 3),  # type: ignore[arg-type]
            orientation=_floats(info["ImageOrientationPatient"], 6),
            pixel_spacing=_floats(info["PixelSpacing"], 2),  # type: ignore[arg-type]
            rows=int(info["Rows"] or 0),
            columns=int(info["Columns"] or 0),
            frames=int(info["NumberOfFrames"] or 1),
            thickness=float(info["SliceThickness"]) if info["SliceThickness"] not in (None, "") else None,
            spacing_between=float(info["SpacingBetweenSlices"]) if info["SpacingBetweenSlices"] not in (None, "") else None,
        )
        if not info["SeriesInstanceUID"] or not info["SOPClassUID"]:
            # every DICOM object has both (type 1); pydicom reads a file cut inside its header without
            # an error, so without this check a cut slice would vanish silently or open a false gap
            raise DataPrepError(f"{path}: the DICOM header is incomplete (no SeriesInstanceUID or SOPClassUID): the file is "
                                f"truncated or damaged. Re-export it.", str(path))
    except DataPrepError:
        raise
    except Exception as exc:  # pydicom raises many types for a damaged header
        raise DataPrepError(f"{path}: the DICOM header cannot be read ({type(exc).__name__}: {exc}). The file is damaged or truncated; re-export it.", str(path)) from exc
    return header, info


def _iter_files(root: Path) -> Iterable[Path]:
    if root.is_file():
        yield root
        return
    for p in sorted(root.rglob("*")):
        if p.is_file() and not p.name.startswith("."):
            yield p


def index_dicom_tree(root: str | Path, problems: list[DataPrepError] | None = None) -> list[SeriesInfo]:
    """Find every DICOM series under `root` (any nesting) by reading headers only.

    Non-DICOM files (README.txt, spreadsheets, ...) are skipped. Files that claim to be DICOM but
    cannot be read either raise at once or, when `problems` is a list, are appended to it so the
    caller can quarantine them.

    Args:
        root: a folder (searched recursively) or a single file.
        problems: optional list collecting DataPrepError for unreadable files.

    Returns:
        SeriesInfo per SeriesInstanceUID, in the order their first file was found; SR documents and
        other non-image series are included (see `SeriesInfo.is_image`).

    Raises:
        DataPrepError: `root` does not exist, or an unreadable file when `problems` is None.
    """
    root = Path(root)
    if not root.exists():
        raise DataPrepError(f"{root} does not exist. Pass the folder that holds the DICOM series.", str(root))
    groups: dict[str, list[tuple[SliceHeader, dict[str, Any]]]] = defaultdict(list)
    for path in _iter_files(root):
        try:
            got = _read_header(path)
        except DataPrepError as err:
            if problems is None:
                raise
            problems.append(err)
            continue
        if got is None:
            continue
        uid = str(got[1]["SeriesInstanceUID"] or f"__no_series_uid__{path.parent}")
        groups[uid].append(got)
    out = []
    for uid, members in groups.items():
        first = members[0][1]
        out.append(SeriesInfo(
            patient_id=str(first["PatientID"] or "").strip(),
            study_uid=str(first["StudyInstanceUID"] or "").strip(),
            series_uid=uid.strip(),
            modality=str(first["Modality"] or "").strip().upper(),
            series_number=str(first["SeriesNumber"] if first["SeriesNumber"] is not None else ""),
            description=str(first["SeriesDescription"] or "").strip(),
            image_type=tuple(str(v).strip().upper() for v in (first["ImageType"] or [])),
            sop_class=str(first["SOPClassUID"] or ""),
            slices=[h for h, _ in members],
        ))
    return out


def select_ct_series(series: list[SeriesInfo], where: str | Path, allow_non_ct: bool = False) -> SeriesInfo:
    """The one CT image series of a folder (localizers and non-image series ignored).

    Raises:
        DataPrepError: no CT image series (listing what was found, e.g. an MR series, and how to
            allow it), or several (listed by modality, number, description and files).
    """
    images = [s for s in series if s.is_image and not s.is_localizer]
    ct = [s for s in images if s.modality == "CT"]
    if not ct and allow_non_ct and len(images) == 1:
        return images[0]
    if not ct:
        found = "; ".join(s.describe() for s in series) or "no DICOM files at all"
        hint = (" Other modalities are refused because the HU windows assume CT; pass allow_non_ct=True "
                "(prepare.allow_non_ct) to read them anyway." if any(s.modality != "CT" for s in images) else "")
        raise DataPrepError(f"{where}: no CT image series found (found: {found}).{hint}", str(where))
    if len(ct) > 1:
        listed = "; ".join(s.describe() for s in ct)
        raise DataPrepError(
            f"{where}: {len(ct)} CT series in one folder ({listed}). Keep one series per folder, or prepare the "
            f"tree with prepare_ct and label by series (label_key=series).", str(where))
    return ct[0]


def check_geometry(info: SeriesInfo, name: str | None = None) -> SeriesGeometry:
    """Order slices along the normal and check that they form one regular grid.

    Args:
        info: the series (headers only).
        name: how messages name the series (a pseudonym in prepare); default `info.describe()`.

    Raises:
        DataPrepError: multi-frame images, missing geometry tags, several orientations, image
            sizes or pixel spacings, duplicate slice positions, gaps or uneven spacing, or slices
            shifted sideways (gantry tilt).
    """
    name = name or info.describe()
    sl = info.slices
    if any(s.frames > 1 for s in sl):
        bad = next(s for s in sl if s.frames > 1)
        raise DataPrepError(f"{bad.path}: multi-frame image ({bad.frames} frames) in {name}; only one-slice-per-file CT series are supported. Convert it with dcm2niix and pass the NIfTI file.", str(bad.path))
    for s in sl:
        if s.position is None or s.orientation is None or s.pixel_spacing is None or not s.rows or not s.columns:
            raise DataPrepError(f"{s.path}: missing ImagePositionPatient, ImageOrientationPatient, PixelSpacing, Rows or Columns in {name}; the slice cannot be placed in the world. Re-export the series from the scanner or PACS.", str(s.path))
    o0 = np.asarray(sl[0].orientation, float)
    for s in sl[1:]:
        if not np.allclose(s.orientation, o0, atol=1e-4):
            raise DataPrepError(f"{s.path}: ImageOrientationPatient differs from {sl[0].path.name} in {name}; a series must have one orientation. Split the series or remove the stray files.", str(s.path))
        if (s.rows, s.columns) != (sl[0].rows, sl[0].columns):
            raise DataPrepError(f"{s.path}: image size {s.rows}x{s.columns} differs from {sl[0].rows}x{sl[0].columns} ({sl[0].path.name}) in {name}; a series must have one image size.", str(s.path))
        if not np.allclose(s.pixel_spacing, sl[0].pixel_spacing, rtol=1e-4, atol=1e-5):
            raise DataPrepError(f"{s.path}: PixelSpacing {s.pixel_spacing} differs from {sl[0].pixel_spacing} ({sl[0].path.name}) in {name}.", str(s.path))
    row, col = o0[:3], o0[3:]
    row, col = row / np.linalg.norm(row), col / np.linalg.norm(col)
    normal = np.cross(row, col)
    pos = np.array([s.position for s in sl], float)
    along = pos @ normal
    order = [int(v) for v in np.argsort(along, kind="stable")]
    along_sorted = along[order]
    row_mm, col_mm = float(sl[0].pixel_spacing[0]), float(sl[0].pixel_spacing[1])  # type: ignore[index]
    if len(sl) > 1:
        diffs = np.diff(along_sorted)
        dup = np.flatnonzero(diffs < 1e-3)
        if dup.size:
            a, b = sl[order[dup[0]]].path, sl[order[dup[0] + 1]].path
            raise DataPrepError(f"{name}: {dup.size} duplicate slice position(s), e.g. {a} and {b} both lie at {along_sorted[dup[0]]:.2f} mm along the slice normal. Remove the duplicated files (often a second export of the same series).", str(a))
        dz = float(np.median(diffs))
        tol = max(0.02, 0.05 * dz)
        uneven = np.flatnonzero(np.abs(diffs - dz) > tol)
        if uneven.size:
            k = int(uneven[0])
            a, b = sl[order[k]].path, sl[order[k + 1]].path
            raise DataPrepError(f"{name}: slice spacing is not uniform ({uneven.size} gap(s) or uneven step(s)): {diffs[k]:.2f} mm between {a} and {b} where the series has {dz:.2f} mm. A slice is probably missing; re-export the complete series.", str(a))
        lateral = pos[order] - np.outer(along_sorted, normal)
        shift = np.linalg.norm(lateral - lateral[0], axis=1).max()
        if shift > 0.1 * min(row_mm, col_mm):
            raise DataPrepError(f"{name}: slices are shifted sideways by up to {shift:.2f} mm (gantry tilt or a sheared stack); resample it to an orthogonal grid (e.g. dcm2niix) and pass the NIfTI file.", str(sl[0].path))
    else:
        s0 = sl[0]
        dz = float(s0.spacing_between or s0.thickness or 1.0)
    first = sl[order[0]]
    direction = np.stack([row, col, normal], axis=1)
    # PixelSpacing is (row spacing = between rows = y, column spacing = x)
    return SeriesGeometry(order=order, spacing=(dz, row_mm, col_mm), origin=tuple(float(v) for v in first.position),  # type: ignore[arg-type]
                          direction=direction, shape=(len(sl), first.rows, first.columns))


def _decode(path: Path, name: str, shape: tuple[int, int]) -> np.ndarray:
    import pydicom

    try:
        with quiet_pydicom():
            ds = pydicom.dcmread(path)
    except Exception as exc:
        raise DataPrepError(f"{path}: cannot be read as DICOM ({type(exc).__name__}: {exc}); the file is damaged or truncated. Re-export it.", str(path)) from exc
    if "PixelData" not in ds:
        raise DataPrepError(f"{path}: no complete Pixel Data element in {name}: the file holds no image or is truncated. Remove it or re-export the series.", str(path))
    ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    ts_name = getattr(ts, "name", str(ts))
    try:
        with quiet_pydicom():
            arr = ds.pixel_array
    except Exception as exc:
        raise DataPrepError(f"{path}: the pixel data cannot be decoded (transfer syntax {ts_name}; {type(exc).__name__}: {exc}). "
                            f"The file is truncated, or its compression needs a decoder that is not installed (pylibjpeg, pylibjpeg-libjpeg, pylibjpeg-openjpeg).", str(path)) from exc
    if arr.shape != shape:
        raise DataPrepError(f"{path}: decoded image has shape {arr.shape}, expected {shape} from its header in {name}.", str(path))
    with quiet_pydicom():
        slope = float(ds.get("RescaleSlope", 1.0) or 1.0)
        intercept = float(ds.get("RescaleIntercept", 0.0) or 0.0)
    return (arr.astype(np.float64) * slope + intercept).astype(np.float32)


def read_series_volume(info: SeriesInfo, name: str | None = None, geometry: SeriesGeometry | None = None) -> Volume:
    """Decode a series into a Volume in HU (pixel_array * RescaleSlope + RescaleIntercept, per slice).

    Raises:
        DataPrepError: geometry errors (see check_geometry), missing or undecodable pixel data.
    """
    name = name or info.describe()
    geom = geometry or check_geometry(info, name)
    planes = [_decode(info.slices[k].path, name, geom.shape[1:]) for k in geom.order]
    return Volume(array=np.stack(planes, axis=0), spacing=geom.spacing, origin=geom.origin, direction=geom.direction)


def load_series(path: str | Path, allow_non_ct: bool = False) -> Volume:
    """Load the one CT series held in a folder (searched recursively) as HU.

    Non-DICOM files beside it are ignored, and so are localizers and non-image objects (SR).

    Args:
        path: a folder holding one CT series, or a single DICOM file.
        allow_non_ct: also accept one non-CT image series (MR, PT...) when no CT series is present.

    Returns:
        Volume with float32 HU [z, y, x] in position order.

    Raises:
        DataPrepError: naming the file and the reason, for a non-CT series, a truncated file,
            missing pixel data, a file without DICOM meta, undecodable compression, several CT
            series, or inconsistent geometry.
    """
    path = Path(path)
    series = index_dicom_tree(path)
    info = select_ct_series(series, path, allow_non_ct=allow_non_ct)
    return read_series_volume(info)
