"""Salted pseudonyms and the list of DICOM tags that identify a patient.

Why salted HMAC and not a plain hash: patient IDs are short and guessable (hospital number
ranges, birth dates), so `sha256(id)` can be reversed by trying every candidate. A keyed HMAC
with a secret salt cannot be recomputed by whoever reads the cache, yet the same salt always maps
the same patient to the same pseudonym, so a cohort prepared twice (or extended later) keeps its
groups and splits stable.

Collision odds: a pseudonym keeps 40 bits (10 hex digits) of HMAC-SHA256. For n distinct values
the chance that any two share a pseudonym is about n^2 / 2^41: 1e-7 for 500 patients, 5e-5 for
10,000 and 0.5 % for 100,000. `prepare_ct` checks for collisions anyway and stops if one occurs
(raise `n_hex` for cohorts of millions).
"""
from __future__ import annotations

import hashlib
import hmac

__all__ = ["IDENTIFYING_TAGS", "pseudonym"]

#: DICOM keywords whose values identify a person, a visit or an image instance. `data_prep` reads
#: some of them into memory (to match label rows and to derive pseudonyms) and writes none of them.
IDENTIFYING_TAGS: tuple[str, ...] = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "OtherPatientIDs",
    "AccessionNumber",
    "InstitutionName",
    "InstitutionAddress",
    "ReferringPhysicianName",
    "PerformingPhysicianName",
    "OperatorsName",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "SOPInstanceUID",
    "FrameOfReferenceUID",
    "StudyDate",
    "SeriesDate",
    "AcquisitionDate",
    "ContentDate",
    "StudyTime",
    "StudyID",
)


def pseudonym(value: str, salt: str, prefix: str = "P", n_hex: int = 10) -> str:
    """A stable, non-reversible stand-in for an identifier: `prefix-<n_hex hex digits>`.

    Args:
        value: the identifier (PatientID, StudyInstanceUID, a NIfTI file stem...). Surrounding
            whitespace is ignored, because DICOM pads odd-length strings with a space.
        salt: the secret key (`PrepareOptions.resolved_salt()`); never stored anywhere.
        prefix: names what the pseudonym stands for: "P" patient, "S" series, "T" study.
        n_hex: hex digits kept (4 bits each); see the module docstring for collision odds.

    Returns:
        For example "P-3f9a1c2b7d".

    Raises:
        ValueError: empty salt (a pseudonym without a secret is only a hash).
    """
    if not salt:
        raise ValueError("pseudonym() needs a non-empty salt")
    digest = hmac.new(salt.encode("utf-8"), str(value).strip().encode("utf-8"), hashlib.sha256).hexdigest()
    return f"{prefix}-{digest[:n_hex]}"
