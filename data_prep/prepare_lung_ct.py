"""`ecl prepare ct`: lung CT (a DICOM tree or NIfTI volumes) into a prepared cache of 2D inputs.

Order of work, cheapest first:

1. Options and the labels CSV are checked; the build key is computed from the input file names
   and sizes, the labels CSV's content hash, `options.public_dict()` (without `workers`) and an
   HMAC of a constant under the salt (so a new salt rebuilds, and the salt never appears). A
   finished cache with the same key is left alone ("cache up to date").
2. DICOM headers only (`dicom.index_dicom_tree`): series are matched to label rows (by
   PatientID, StudyInstanceUID or SeriesInstanceUID, `options.label_key`), their geometry is
   checked (`dicom.check_geometry`) and every lesion centre is checked to lie inside its volume.
   For NIfTI input the label key is the file stem (`nifti.nifti_stem`).
3. The user's split file, if any, is checked (`manifest.read_split_file`: image,split over the
   image names below). A generated split (grouped by patient pseudonym, stratified by class,
   `splits.make_split`) is drawn after step 4 over the images actually kept, so quarantined
   series cannot leave a class without training images; `splits.check_trainable` refuses a
   cohort that still has one (or only one class).
4. Pixels, in shards of SHARD_SERIES series over `options.n_workers` processes with a progress
   bar: decode, resample to `spacing_mm`, crop `crop_mm` cubes around each lesion (or sample
   lung slices where the row has no centre), turn planes into uint8 [S, S, 3] (`ct_transforms.decode_ct`, MONAI).
   Each shard is written atomically; an interrupted run resumes with the missing shards.
5. Finalize: manifest columns image, label, split, group, patient, series, lesion, slice, where
   image = f"{patient}_l{lesion}_s{slice}", group = patient = the patient pseudonym, series = the
   series pseudonym; meta {"kind": "ct", "class_names", "options", "preprocessing", "notices"}.

Steps 1-3 are this module's (`read_ct` returns the `cohort.Cohort`: one item per series, its
rows the series' images); steps 4-5, the shards, workers, resume and quarantine, are
`build.build_cache`, shared with every other format.

Labels CSV: a key column (patient_id, study_uid or series_uid), `label`, and optionally a lesion
centre as `center_x_mm, center_y_mm, center_z_mm` (world, DICOM LPS) or `center_i, center_j,
center_k` (voxel column, row and slice; for DICOM the slice index counts in position order along
the slice normal, for NIfTI it is the file's own k), and `diameter_mm` (spreads the
slices_per_lesion planes over the lesion). Several rows per key are several lesions; a row without
centre samples `slices_per_lesion` axial slices inside the lungs instead.

Class names are ordered by frequency in the labels CSV (most frequent first, ties in order of
first appearance): the head class first, as long-tailed tables are usually written.

Privacy: no tag value that identifies a person, visit or instance is written or printed, and
neither are the names of the input folders and files (PACS exports are often named like
`LAST^FIRST_MRN/CT THORAX/IM_MRN_0003.dcm`). Messages and quarantine.csv name series and slices
by pseudonym and position ("series S-..., patient P-..., slice 12 of 40", slices counted in
position order along the slice normal) and a file whose series is unknown by its position in
the sorted input listing ("input file 17 of 530": the 17th of `sorted(images_dir.rglob('*'))`,
hidden files left out). `_Namer` rewrites every message on its way out, so third-party texts
(pydicom, nibabel, MONAI) that quote a path are covered too; pydicom's value warnings are silenced
(`dicom.quiet_pydicom`). The salt is never written.
"""
from __future__ import annotations

import contextlib
import hashlib
import hmac
import os
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .build import build_cache, fixed_splits, is_up_to_date
from .cache import FORMAT_VERSION
from .cohort import Cohort
from .ct_transforms import CT_DECODE_VERSION, LesionSpec, decode_ct
from .deid import pseudonym
from .dicom import SeriesInfo, Volume, check_geometry, index_dicom_tree, read_series_volume
from .errors import DataPrepError
from .io import file_sha256, read_user_csv
from .nifti import NIFTI_SUFFIXES, load_nifti, nifti_grid, nifti_stem
from .options import PrepareOptions, check_options

__all__ = ["prepare_ct", "read_ct", "SHARD_SERIES", "LABEL_KEYS"]

SHARD_SERIES = 4
LABEL_KEYS = {"patient": "patient_id", "study": "study_uid", "series": "series_uid"}
_WORLD = ("center_x_mm", "center_y_mm", "center_z_mm")
_INDEX = ("center_i", "center_j", "center_k")


@dataclass
class _Lesion:
    row: int                      # 1-based data row in the labels CSV
    label: str
    centre_world: tuple[float, float, float] | None
    centre_index: tuple[float, float, float] | None  # (i, j, k)
    diameter: float | None
    lesion: int = 0               # index within the patient


@dataclass
class _Task:
    """One series and what to cut from it: picklable, identifier-free except file paths."""

    name: str                     # e.g. "series S-1a2b3c4d5e (patient P-...)": pseudonyms only, never a path
    patient: str
    series: str
    source: str                   # "dicom" or "nifti"
    info: SeriesInfo | None       # headers (identifiers in memory only; travels to workers by pipe)
    nifti: str | None
    lesions: list[_Lesion]
    rel: str                      # folder or file relative to images_dir, for quarantine
    images: list[tuple[str, str, int, int]] = field(default_factory=list)  # (image, label, lesion, slice)


def _num(value: str, path: Path, row: int, col: str) -> float | None:
    value = str(value).strip()
    if value == "":
        return None
    try:
        out = float(value)
    except ValueError:
        raise DataPrepError(f"{path}: row {row}, column {col}: {value!r} is not a number. Write millimetres or voxel indices as plain numbers.", str(path)) from None
    if not np.isfinite(out):
        raise DataPrepError(f"{path}: row {row}, column {col}: {value!r} is not a finite number.", str(path))
    return out


def _read_labels(path: Path, key_col: str) -> tuple[dict[str, list[_Lesion]], list[str]]:
    """Label rows grouped by key, and class names (by frequency, ties by first appearance)."""
    df = read_user_csv(path, f"Labels CSV {path} does not exist. Pass the CSV with {key_col},label[,center_x_mm,...].",
                       f"Write it as {key_col},label[,center_x_mm,...].")
    df.columns = [c.strip() for c in df.columns]
    for col in (key_col, "label"):
        if col not in df.columns:
            raise DataPrepError(f"{path}: no '{col}' column (columns: {', '.join(df.columns)}). The key column follows "
                                f"prepare.label_key ({', '.join(f'{k} -> {v}' for k, v in LABEL_KEYS.items())}).", str(path))
    for group in (_WORLD, _INDEX):
        have = [c for c in group if c in df.columns]
        if have and len(have) != 3:
            raise DataPrepError(f"{path}: centre columns {have} given without {[c for c in group if c not in have]}; give all three or none.", str(path))
    if not len(df):
        raise DataPrepError(f"{path}: no data rows.", str(path))
    rows: dict[str, list[_Lesion]] = defaultdict(list)
    for n, rec in enumerate(df.to_dict("records"), start=1):
        key = str(rec[key_col]).strip()
        label = str(rec["label"]).strip()
        if not key:
            raise DataPrepError(f"{path}: row {n}: empty {key_col}. Every row needs the key of its series.", str(path))
        if not label:
            raise DataPrepError(f"{path}: row {n}: empty label. Give every lesion a class name.", str(path))
        world = tuple(_num(rec[c], path, n, c) for c in _WORLD) if _WORLD[0] in rec else (None,) * 3
        index = tuple(_num(rec[c], path, n, c) for c in _INDEX) if _INDEX[0] in rec else (None,) * 3
        for vals, cols in ((world, _WORLD), (index, _INDEX)):
            if any(v is None for v in vals) and any(v is not None for v in vals):
                raise DataPrepError(f"{path}: row {n}: {', '.join(cols)} must all be filled or all be empty.", str(path))
        if world[0] is not None and index[0] is not None:
            raise DataPrepError(f"{path}: row {n}: both world ({', '.join(_WORLD)}) and voxel ({', '.join(_INDEX)}) centres; keep one.", str(path))
        diameter = _num(rec.get("diameter_mm", ""), path, n, "diameter_mm") if "diameter_mm" in rec else None
        if diameter is not None and diameter <= 0:
            raise DataPrepError(f"{path}: row {n}, column diameter_mm: {diameter:g} is not a size; write the lesion's "
                                f"diameter in millimetres (> 0), or leave the cell empty if it is unknown.", str(path))
        rows[key].append(_Lesion(row=n, label=label, centre_world=world if world[0] is not None else None,  # type: ignore[arg-type]
                                 centre_index=index if index[0] is not None else None, diameter=diameter))  # type: ignore[arg-type]
    for key, lesions in rows.items():
        if len(lesions) > 1 and any(les.centre_world is None and les.centre_index is None for les in lesions):
            raise DataPrepError(f"{path}: rows {', '.join(str(les.row) for les in lesions)} share one {key_col} but some have no "
                                f"lesion centre; several rows per key are several lesions and each needs its centre.", str(path))
    labels = [str(v).strip() for v in df["label"]]
    if len(set(labels)) < 2:
        raise DataPrepError(f"{path}: every row has the label {labels[0]!r}; a classifier needs at least two classes. "
                            f"Check the label column.", str(path))
    first = {c: i for i, c in reversed(list(enumerate(labels)))}
    counts = Counter(labels)
    class_names = sorted(counts, key=lambda c: (-counts[c], first[c]))
    return rows, class_names


def _list_inputs(images_dir: Path) -> tuple[list[Path], list[Path]]:
    files = [p for p in sorted(images_dir.rglob("*")) if p.is_file() and not p.name.startswith(".")]
    nifti = [p for p in files if p.name.lower().endswith(NIFTI_SUFFIXES)]
    return files, nifti


def _position_order(info: SeriesInfo) -> list[int]:
    """Slice indices in position order along the slice normal (file order when geometry is missing)."""
    sl = info.slices
    if not sl or any(s.position is None or s.orientation is None for s in sl):
        return list(range(len(sl)))
    o = np.asarray(sl[0].orientation, float)
    normal = np.cross(o[:3], o[3:])
    along = np.array([s.position for s in sl], float) @ normal
    return [int(v) for v in np.argsort(along, kind="stable")]


class _Namer:
    """Rewrites messages so that input paths and raw identifiers become pseudonyms and positions.

    Why: folder and file names of PACS exports carry names and record numbers, and third-party
    error texts quote them; replacing every known spelling of every input path (as found, relative
    to images_dir, resolved) on the way out covers messages this package did not write itself.
    """

    def __init__(self, root: Path, files: list[Path]):
        self.root = root
        self._map: dict[str, str] = {}
        self._resolved_root = root.resolve()
        self._keys: list[int] | None = None  # the distinct key lengths, longest first
        self._position = {p: i for i, p in enumerate(files, start=1)}
        self._by_folder: dict[Path, list[Path]] = defaultdict(list)
        for p in files:
            self._by_folder[p.parent].append(p)
        n = len(files)
        # folders between root and the files first (a PACS export's patient folder carries a name and an
        # MRN); series folders are named again, better, by add_series
        folders = {parent for p in files for parent in p.parents if parent != root and root in parent.parents}
        for folder in folders:
            self.add(folder, "a folder under --images")
        for i, p in enumerate(files, start=1):
            self.add(p, f"input file {i} of {n}")

    def add(self, path: str | Path, label: str) -> None:
        """Name `path` (a file or folder under root) `label` in every message from now on."""
        p = Path(path)
        keys = {str(p)}
        with contextlib.suppress(ValueError):
            rel = p.relative_to(self.root)
            keys.add(rel.as_posix())
            keys.add(str(self._resolved_root / rel))  # the absolute spelling, without a resolve() per file
        for k in keys:
            if k and k not in (".", str(self.root), str(self._resolved_root)):
                self._map[k] = label
        self._keys = None

    def add_value(self, value: str) -> None:
        """A raw identifier (PatientID, a UID) that must never be printed."""
        value = str(value).strip()
        if len(value) >= 4:
            self._map[value] = "<identifier withheld>"
            self._keys = None

    def add_series(self, info: SeriesInfo, label: str) -> None:
        """Name the slices of a series by position ("<label>, slice k of n") and its folder by `label`."""
        order = _position_order(info)
        for k, idx in enumerate(order, start=1):
            self.add(info.slices[idx].path, f"{label}, slice {k} of {len(order)}")
        self.add(info.folder, f"the folder of {label}")
        own = {s.path for s in info.slices}
        for p in self._by_folder.get(info.folder, []):  # e.g. a slice whose header is too damaged to read
            if p not in own:
                self.add(p, f"input file {self._position[p]} of {len(self._position)} (in the folder of {label})")
        for value in (info.patient_id, info.study_uid, info.series_uid):
            self.add_value(value)

    def __call__(self, text: str | None) -> str:
        """`text` with every known spelling replaced, scanning left to right, longest match first.

        Cost: one dict lookup per (position, distinct key length), so a message costs the same for
        ten files as for a hundred thousand (a plain replace per key would not).
        """
        if not text:
            return text or ""
        if self._keys is None:  # longest first: a file's path wins over its folder's
            self._keys = sorted({len(k) for k in self._map}, reverse=True)  # type: ignore[assignment]
        out: list[str] = []
        i, n = 0, len(text)
        while i < n:
            for length in self._keys:  # type: ignore[union-attr]
                if i + length <= n:
                    label = self._map.get(text[i:i + length])  # type: ignore[call-overload]
                    if label is not None:
                        out.append(label)
                        i += length
                        break
            else:
                out.append(text[i])
                i += 1
        return "".join(out)

    def error(self, err: DataPrepError) -> DataPrepError:
        """The same fault, its message and path rewritten."""
        out = DataPrepError(self(str(err)), self(err.path) if err.path else None)
        return out


def _rel(path: str | Path | None, root: Path) -> str:
    if path is None:
        return ""
    p = Path(path)
    try:
        return p.relative_to(root).as_posix()
    except ValueError:
        return str(p)


class _Faults:
    """Stop at the first fault, or collect it for quarantine.csv (on_error='skip')."""

    def __init__(self, on_error: str, root: Path, namer: _Namer):
        self.skip = on_error == "skip"
        self.root = root
        self.namer = namer
        self.rows: list[dict[str, str]] = []

    def __call__(self, err: DataPrepError, series: str = "") -> None:
        err = self.namer.error(err)
        if not self.skip:
            raise err
        self.rows.append({"file": err.path or "", "series": series, "reason": str(err)})


def _plan_dicom(images_dir: Path, labels: dict[str, list[_Lesion]], options: PrepareOptions, salt: str,
                faults: _Faults, labels_csv: Path) -> list[_Task]:
    problems: list[DataPrepError] = []
    series = index_dicom_tree(images_dir, problems)
    for s in series:  # name every series first, so that every later message can use it
        faults.namer.add_series(s, f"series {pseudonym(s.series_uid, salt, 'S')} (patient {pseudonym(s.patient_id, salt, 'P')})")
    for err in problems:
        faults(err)
    images = [s for s in series if s.is_image and not s.is_localizer]
    cts = [s for s in images if s.modality == "CT" or options.allow_non_ct]
    if not cts:
        other = sorted({s.modality or "?" for s in images})
        hint = f" (found image series of modality {', '.join(other)}; pass prepare.allow_non_ct to use them)" if other else ""
        raise DataPrepError(f"{images_dir}: no CT image series found{hint}. Pass the folder holding the DICOM export.", str(images_dir))
    key_col = LABEL_KEYS[options.label_key]
    attr = {"patient": "patient_id", "study": "study_uid", "series": "series_uid"}[options.label_key]
    by_key: dict[str, list[SeriesInfo]] = defaultdict(list)
    for s in cts:
        by_key[getattr(s, attr)].append(s)
    tasks = []
    for key, members in by_key.items():
        for s in members:
            patient = pseudonym(s.patient_id, salt, "P")
            sname = pseudonym(s.series_uid, salt, "S")
            folder = str(s.folder)
            name = f"series {sname} (patient {patient})"
            if len(members) > 1:
                faults(DataPrepError(f"{name}: {len(members)} CT series share this {key_col} ({pseudonym(key, salt, 'K')}); "
                                     f"label by series (prepare.label_key=series, column series_uid) or remove the extra series.", folder), sname)
                continue
            if key not in labels:
                faults(DataPrepError(f"{name}: no row of {labels_csv} has its {key_col}; add a row (or remove the series from the input folder).", folder), sname)
                continue
            tasks.append(_Task(name=name, patient=patient, series=sname, source="dicom", info=s, nifti=None,
                               lesions=labels[key], rel=folder))
    for key, lesions in labels.items():
        if key not in by_key:
            rows = ", ".join(str(les.row) for les in lesions)
            faults(DataPrepError(f"{labels_csv}: row(s) {rows} ({key_col} {pseudonym(key, salt, 'K')} after pseudonymisation) match no CT "
                                 f"series under {images_dir}. Check the {key_col} values, prepare.label_key, or add the missing series.", str(labels_csv)))
    return tasks


def _plan_nifti(images_dir: Path, nifti: list[Path], labels: dict[str, list[_Lesion]], options: PrepareOptions, salt: str,
                faults: _Faults, labels_csv: Path) -> list[_Task]:
    key_col = LABEL_KEYS[options.label_key]
    stems: dict[str, Path] = {}
    for p in nifti:
        stem = nifti_stem(p)
        if stem in stems:
            raise DataPrepError(f"{images_dir}: two NIfTI files share the stem '{_rel(p, images_dir)}' vs '{_rel(stems[stem], images_dir)}'; rename one.", str(p))
        stems[stem] = p
    tasks = []
    for stem, p in stems.items():
        patient = pseudonym(stem, salt, "P")
        sname = pseudonym(stem, salt, "S")
        rel = str(p)
        name = f"volume {sname} (patient {patient})"
        faults.namer.add(p, name)
        faults.namer.add_value(stem)
        if stem not in labels:
            faults(DataPrepError(f"{name}: no row of {labels_csv} has its file stem in {key_col}; add a row or remove the file.", str(p)), sname)
            continue
        tasks.append(_Task(name=name, patient=patient, series=sname, source="nifti", info=None, nifti=str(p), lesions=labels[stem], rel=rel))
    for key, lesions in labels.items():
        if key not in stems:
            faults(DataPrepError(f"{labels_csv}: row(s) {', '.join(str(les.row) for les in lesions)} name a NIfTI stem that is not under {images_dir}.", str(labels_csv)))
    return tasks


def _grid_volume(task: _Task) -> Volume:
    """Geometry without pixels (a zero-strided array): from DICOM headers, or the NIfTI header."""
    if task.source == "dicom":
        return check_geometry(task.info, task.name).as_volume_grid()  # type: ignore[arg-type]
    return nifti_grid(task.nifti)  # type: ignore[arg-type]


def _check_centres(task: _Task, grid: Volume) -> None:
    """Resolve voxel centres to world mm and refuse any centre outside the volume."""
    for les in task.lesions:
        if les.centre_index is not None:
            i, j, k = les.centre_index
            les.centre_world = tuple(float(v) for v in grid.index_to_world((k, j, i)))  # type: ignore[assignment]
        if les.centre_world is not None:
            kji = grid.world_to_index(les.centre_world)
            if not grid.contains_index(kji):
                raise DataPrepError(
                    f"{task.name}: the lesion centre of labels row {les.row} lies outside the volume (voxel k,j,i = "
                    f"{', '.join(f'{v:.1f}' for v in kji)}; shape {grid.shape}). Check center_x/y/z_mm (DICOM LPS world mm) "
                    f"or center_i/j/k.", task.rel)


def _cut(task: _Task, options: dict[str, Any]) -> list[np.ndarray]:
    """Decode one series and return its images in task.images order."""
    if task.source == "dicom":
        vol = read_series_volume(task.info, task.name)  # type: ignore[arg-type]
    else:
        vol = load_nifti(task.nifti)  # type: ignore[arg-type]
    lesions = [LesionSpec(les.centre_world, les.diameter) for les in task.lesions]
    return decode_ct(vol, lesions, options["spacing_mm"], options["crop_mm"], options["channels"],
                     options["slices_per_lesion"], options["ct_image_size"], task.name, task.rel)


class _SeriesDecode:
    """The decode step of a CT cohort: one series task -> its lesion (or lung) images (picklable for workers).

    Why a wrapper around `_cut`: a reader's own error (nibabel, MONAI, numpy) quotes paths; it becomes
    this series' DataPrepError, so its text goes through the parent's `_Namer` like every other message.
    """

    def __init__(self, options: dict[str, Any]):
        self.options = options

    def __call__(self, task: _Task) -> list[np.ndarray]:
        try:
            return _cut(task, self.options)
        except DataPrepError:
            raise
        except Exception as exc:  # noqa: BLE001 - see the class docstring
            raise DataPrepError(f"{task.name}: cutting the series failed ({type(exc).__name__}: {exc})") from None


class _CtRename:
    """Decode faults as they may be shown: input paths relative to the root, then through the `_Namer`."""

    def __init__(self, root: Path, namer: _Namer):
        self.root = root
        self.namer = namer

    def __call__(self, item: int, err: DataPrepError) -> DataPrepError:
        return DataPrepError(self.namer(str(err)), self.namer(_rel(err.path, self.root)))


def _key_parts(images_dir: Path, files: list[Path], labels_csv: Path, salt: str) -> dict[str, Any]:
    """Build-key parts (build.cache_key adds the split file and the options): input names and sizes,
    the labels CSV's content hash and an HMAC under the salt (a new salt gives new pseudonyms, hence a
    rebuild; the salt itself never appears)."""
    return {
        "format_version": FORMAT_VERSION,
        "kind": "ct",
        "decode": CT_DECODE_VERSION,  # a new decode (ct_transforms) rebuilds old caches
        "files": [[p.relative_to(images_dir).as_posix(), p.stat().st_size] for p in files],
        "labels": file_sha256(labels_csv),
        "salt": hmac.new(salt.encode("utf-8"), b"ecl-ct-build-key", hashlib.sha256).hexdigest(),
    }


def prepare_ct(images_dir: str | os.PathLike, labels_csv: str | os.PathLike, out_dir: str | os.PathLike,
               options: PrepareOptions | None = None) -> Path:
    """Prepare a lung-CT cohort into a cache of uint8 [S, S, 3] lesion (or lung) images.

    Args:
        images_dir: a DICOM tree (any nesting; localizers, SR documents and non-DICOM files are
            skipped) or a folder of .nii/.nii.gz volumes.
        labels_csv: see the module docstring.
        out_dir: the cache folder.
        options: spacing_mm, crop_mm, ct_image_size, channels, slices_per_lesion, label_key,
            salt, allow_non_ct, on_error, workers, fractions, split_seed, split_file.

    Returns:
        `out_dir`, holding a complete cache (and quarantine.csv when on_error="skip").

    Raises:
        DataPrepError: bad options or labels CSV, no CT series, a label row without series or a
            series without label row, inconsistent geometry, a lesion centre outside its volume,
            an unreadable file (with on_error="stop"), or nothing left after quarantine.
    """
    options = options or PrepareOptions()
    check_options(options)
    salt = options.resolved_salt()
    images_dir, labels_csv, out_dir = Path(images_dir), Path(labels_csv), Path(out_dir)
    if not images_dir.is_dir():
        raise DataPrepError(f"{images_dir} is not a folder. Pass the folder holding the DICOM series or NIfTI volumes.", str(images_dir))
    key_col = LABEL_KEYS[options.label_key]
    labels, class_names = _read_labels(labels_csv, key_col)
    files, nifti = _list_inputs(images_dir)
    # before any DICOM header is read: an unchanged cohort costs a directory listing
    if is_up_to_date(out_dir, _key_parts(images_dir, files, labels_csv, salt), options):
        return out_dir

    namer = _Namer(images_dir, files)
    faults = _Faults(options.on_error, images_dir, namer)
    try:
        return _prepare(images_dir, labels_csv, out_dir, options, salt, labels, class_names, files, nifti, faults)
    except DataPrepError as err:
        raise namer.error(err) from None
    except OSError as exc:  # a machine fault (disk full, permissions): keep its errno, rename its file
        raise OSError(exc.errno, namer(exc.strerror), namer(str(exc.filename)) if exc.filename else None) from None
    except Exception as exc:  # noqa: BLE001 - any other text may quote input paths: never let it out unrenamed
        raise DataPrepError(namer(f"preparing the CT cohort failed unexpectedly ({type(exc).__name__}: {exc}). This is "
                                  f"probably a bug: report it with this message, which names no input path.")) from None


def _prepare(images_dir: Path, labels_csv: Path, out_dir: Path, options: PrepareOptions, salt: str,
             labels: dict[str, list[_Lesion]], class_names: list[str], files: list[Path], nifti: list[Path],
             faults: _Faults) -> Path:
    """Read the cohort and build its cache; every DataPrepError leaves `prepare_ct` through `_Namer`."""
    cohort = _read(images_dir, labels_csv, options, salt, labels, class_names, files, nifti, faults)
    opts = {"spacing_mm": options.spacing_mm, "crop_mm": options.crop_mm, "ct_image_size": options.ct_image_size,
            "channels": options.channels, "slices_per_lesion": options.slices_per_lesion, "root": str(images_dir)}
    return build_cache(cohort, _SeriesDecode(opts), out_dir, options, "ct")


def read_ct(images_dir: str | os.PathLike, labels_csv: str | os.PathLike, options: PrepareOptions) -> Cohort:
    """Read and check a lung-CT cohort (headers only, no pixels) as a `Cohort` of series tasks.

    Messages are renamed by `_Namer` (pseudonyms and positions, never input paths). Decode its
    items with `_SeriesDecode`, as `prepare_ct` does.
    """
    check_options(options)
    salt = options.resolved_salt()
    images_dir, labels_csv = Path(images_dir), Path(labels_csv)
    labels, class_names = _read_labels(labels_csv, LABEL_KEYS[options.label_key])
    files, nifti = _list_inputs(images_dir)
    namer = _Namer(images_dir, files)
    try:
        return _read(images_dir, labels_csv, options, salt, labels, class_names, files, nifti,
                     _Faults(options.on_error, images_dir, namer))
    except DataPrepError as err:
        raise namer.error(err) from None


def _read(images_dir: Path, labels_csv: Path, options: PrepareOptions, salt: str, labels: dict[str, list[_Lesion]],
          class_names: list[str], files: list[Path], nifti: list[Path], faults: _Faults) -> Cohort:
    """Steps 2-3 of the module docstring: series matched to label rows, geometry and centres checked."""
    if nifti:
        from .dicom import DICOM_SUFFIXES, _is_part10

        nifti_set = set(nifti)
        dicom = [p for p in sorted(images_dir.rglob("*")) if p.is_file() and not p.name.startswith(".") and p not in nifti_set
                 and (p.suffix.lower() in DICOM_SUFFIXES or _is_part10(p))]
        if dicom:  # one input kind per folder: the DICOM files would otherwise be ignored without a word
            raise DataPrepError(f"{images_dir}: holds both NIfTI volumes ({len(nifti)}) and DICOM files ({len(dicom)}, e.g. "
                                f"{dicom[0]}); prepare them from separate folders, or convert the DICOM series to NIfTI "
                                f"(dcm2niix) first.", str(images_dir))
    if nifti:
        tasks = _plan_nifti(images_dir, nifti, labels, options, salt, faults, labels_csv)
    else:
        tasks = _plan_dicom(images_dir, labels, options, salt, faults, labels_csv)
    # pseudonym collisions would merge two patients into one group: refuse (see deid docstring)
    raw_by_patient: dict[str, set[str]] = defaultdict(set)
    for t in tasks:
        raw_by_patient[t.patient].add(t.info.patient_id if t.info is not None else str(t.nifti))
    if any(len(v) > 1 for v in raw_by_patient.values()):
        raise DataPrepError("two different patients received the same pseudonym (a 1 in 10^12 event per pair); set another prepare.salt.")

    good: list[_Task] = []
    for t in tasks:
        try:
            _check_centres(t, _grid_volume(t))
        except DataPrepError as err:
            faults(err, t.series)
            continue
        good.append(t)
    if not good:
        raise DataPrepError(f"{images_dir}: no series left to prepare ({len(faults.rows)} quarantined; see the reasons above "
                            f"or in quarantine.csv).", str(images_dir))
    # lesion numbers run per patient over its rows, so names stay unique when a patient has several series
    lesion_no: dict[str, int] = defaultdict(int)
    for t in good:
        for les in t.lesions:
            les.lesion = lesion_no[t.patient]
            lesion_no[t.patient] += 1
            for s in range(options.slices_per_lesion):
                t.images.append((f"{t.patient}_l{les.lesion}_s{s}", les.label, les.lesion, s))

    rows = [(t, img, lab, les, s) for t in good for img, lab, les, s in t.images]
    names = [img for _, img, *_ in rows]
    groups: list[str | None] = [t.patient for t, *_ in rows]
    row_labels: list[str | None] = [lab for _, _, lab, _, _ in rows]
    notices: list[str] = []
    splits = fixed_splits(names, groups, row_labels, options, notices)
    metadata = pd.DataFrame({"patient": [t.patient for t, *_ in rows], "series": [t.series for t, *_ in rows],
                             "lesion": [les for *_, les, _ in rows], "slice": [s for *_, s in rows]})
    from . import ct as _ct

    windows = getattr(_ct, "WINDOWS", None)
    return Cohort(
        kind="ct", source="ct", items=good, item_rows=[len(t.images) for t in good], images=names, labels=row_labels,
        groups=groups, metadata=metadata, class_names=list(class_names), key=_key_parts(images_dir, files, labels_csv, salt),
        splits=splits, notices=notices, where=str(labels_csv), shard_size=SHARD_SERIES,
        rename=_CtRename(images_dir, faults.namer),
        quarantine_row=lambda item, err: {"file": err.path or "", "series": good[item].series, "reason": str(err)},
        quarantine_columns=("file", "series", "reason"), quarantined=faults.rows, drop_absent_classes=True, what="series",
        preprocessing={"windows": {k: list(v) for k, v in windows.items()}} if isinstance(windows, dict) else {},
    )
