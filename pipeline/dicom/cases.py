"""Which series of a patient are its CT, its PET and its structure sets.

CT candidates are the CT series that are not localizers; PET candidates the PT series,
attenuation-corrected ones preferred when both kinds are there. More than one candidate of a
modality is refused, listing them, unless ``--series UID`` names one. The PET must share the
CT's FrameOfReferenceUID (then the two grids are in one patient coordinate system); the
structure sets (RTSTRUCT) and segmentations (SEG) considered are those that mention that frame
(or one passed with ``--accept-frame``); a patient with neither is refused. Mentioning the frame
is not enough to be rasterised: each ROI mapped to a label must itself be defined in the CT's
frame (:func:`pipeline.dicom.rtstruct.check_placeable`).
"""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.dicom.errors import DicomImportError
from pipeline.dicom.scan import Series


@dataclass(frozen=True)
class CaseSeries:
    """The series chosen for one patient."""

    patient: str
    ct: Series
    pet: Series
    structures: list[Series]
    segmentations: list[Series]


def _is_localizer(series: Series) -> bool:
    kinds = [str(v).upper() for v in series.headers[0].get("ImageType", [])]
    return "LOCALIZER" in kinds or len(series.headers) < 2


def _attenuation_corrected(series: Series) -> bool:
    return "ATTN" in [str(v).upper() for v in series.headers[0].get("CorrectedImage", [])]


def _one(candidates: list[Series], modality: str, patient: str, chosen: set[str]) -> Series:
    named = [s for s in candidates if s.uid in chosen]
    if len(named) == 1:
        return named[0]
    if not candidates:
        raise DicomImportError(f"patient {patient}: no {modality} series found")
    if len(candidates) > 1 or len(named) > 1:
        listed = "; ".join(s.summary() for s in (named or candidates))
        raise DicomImportError(
            f"patient {patient}: {len(named or candidates)} candidate {modality} series "
            f"({listed}); choose one with --series UID"
        )
    return candidates[0]


def choose_series(
    patient: str, series: dict[str, Series], chosen: set[str], accepted_frames: set[str] = frozenset()
) -> CaseSeries:
    """The CT, PET and RTSTRUCTs of one patient (see the module doc for the rules).

    ``accepted_frames``: frames of reference the user vouched for as the CT's (``--accept-frame``).
    """
    cts = [s for s in series.values() if s.modality == "CT" and not _is_localizer(s)]
    ct = _one(cts, "CT", patient, chosen)
    pets = [s for s in series.values() if s.modality == "PT"]
    if any(_attenuation_corrected(s) for s in pets):
        pets = [s for s in pets if _attenuation_corrected(s)]
    same_for = [s for s in pets if s.frame_of_reference == ct.frame_of_reference]
    if pets and not same_for:
        raise DicomImportError(
            f"patient {patient}: no PET series shares the CT's FrameOfReferenceUID {ct.frame_of_reference} "
            f"(CT series {ct.uid}; PET series {', '.join(f'{s.uid} in {s.frame_of_reference}' for s in pets)})"
        )
    pet = _one(same_for, "PET", patient, chosen)
    frames = {ct.frame_of_reference} | set(accepted_frames)
    structures = [s for s in series.values() if s.modality == "RTSTRUCT" and _referenced_frames(s) & frames]
    segmentations = [s for s in series.values() if s.modality == "SEG" and s.frame_of_reference in frames]
    if not structures and not segmentations:
        others = [s.uid for s in series.values() if s.modality in ("RTSTRUCT", "SEG")]
        raise DicomImportError(
            f"patient {patient}: no RTSTRUCT or SEG in the CT's frame of reference "
            f"{ct.frame_of_reference}" + (f" (others: {others})" if others else "")
        )
    return CaseSeries(patient, ct, pet, structures, segmentations)


def _referenced_frames(series: Series) -> set[str]:
    frames = set()
    for ds in series.headers:
        frames |= {str(f.FrameOfReferenceUID) for f in ds.get("ReferencedFrameOfReferenceSequence", [])}
        frames |= {
            str(r.ReferencedFrameOfReferenceUID)
            for r in ds.get("StructureSetROISequence", [])
            if "ReferencedFrameOfReferenceUID" in r
        }
        if "FrameOfReferenceUID" in ds:
            frames.add(str(ds.FrameOfReferenceUID))
    return frames
