"""The one error type of the DICOM import."""

from __future__ import annotations


class DicomImportError(ValueError):
    """A case cannot be imported as it is; the message names patient, series and figure."""
