"""Salted pseudonyms and the identifying-tag list."""
from __future__ import annotations

import hashlib
import hmac
import re

import pytest
from pydicom.datadict import tag_for_keyword

from data_prep.deid import IDENTIFYING_TAGS, pseudonym


def test_pseudonym_format_and_value_match_hmac_sha256():
    expected = hmac.new(b"salt-1", b"MRN123", hashlib.sha256).hexdigest()[:10]
    assert pseudonym("MRN123", "salt-1") == f"P-{expected}"
    assert re.fullmatch(r"S-[0-9a-f]{10}", pseudonym("1.2.3", "salt-1", prefix="S"))


def test_pseudonym_stable_and_ignores_dicom_padding():
    assert pseudonym("MRN123 ", "k") == pseudonym("MRN123", "k")
    assert pseudonym("MRN123", "k") == pseudonym("MRN123", "k")


def test_pseudonym_differs_by_salt_and_value():
    assert pseudonym("MRN123", "a") != pseudonym("MRN123", "b")
    assert pseudonym("MRN123", "a") != pseudonym("MRN124", "a")


def test_pseudonym_empty_salt_refused():
    with pytest.raises(ValueError, match="non-empty salt"):
        pseudonym("MRN123", "")


def test_identifying_tags_are_dicom_keywords():
    for keyword in IDENTIFYING_TAGS:
        assert tag_for_keyword(keyword) is not None, keyword
    for needed in ("PatientName", "PatientID", "PatientBirthDate", "AccessionNumber", "InstitutionName", "StudyInstanceUID",
                   "SeriesInstanceUID", "SOPInstanceUID", "StudyDate", "ReferringPhysicianName", "OperatorsName"):
        assert needed in IDENTIFYING_TAGS
