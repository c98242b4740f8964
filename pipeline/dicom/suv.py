"""Body-weight SUV of a PET series after the QIBA vendor-neutral calculation.

Pure functions: :func:`suv_inputs` collects every input from the headers (refusing, naming
the tag, when one is missing), :func:`suv_factor` turns them into the factor that multiplies
the rescaled pixel values. ``Units``:

* ``GML``: already SUV (g/ml); factor 1.
* ``BQML``: ``SUVbw = Bq/ml x weight [g] / dose [Bq]``, the injected dose decay-corrected
  to the scan time when ``DecayCorrection`` is ``START`` (images corrected to the series
  start), taken as injected when it is ``ADMIN`` (images already corrected to the
  administration time). The scan time is the series date and time, unless it is later than
  the earliest acquisition time (post-processing can rewrite SeriesTime), then that
  acquisition time, with a warning. The injection time is
  ``RadiopharmaceuticalStartDateTime``, else the series date with
  ``RadiopharmaceuticalStartTime``.
* ``CNTS``: only with the Philips SUV scale factor (7053,1000), taken as the factor.

Anything else (a missing weight, dose, half-life or time; ``DecayCorrection`` ``NONE``;
images not corrected for attenuation and decay; another unit) refuses the case: SUV is never
guessed.
"""

from __future__ import annotations

import math
from datetime import datetime, timedelta
from typing import Any

import pydicom

from pipeline.dicom.errors import DicomImportError

_PHILIPS_SUV_SCALE = (0x7053, 0x1000)


def _tag(ds: pydicom.Dataset, key: str, where: str) -> Any:
    value = ds.get(key)
    if value is None or value == "":
        raise DicomImportError(f"{where}: SUV needs tag {key}, which is missing or empty")
    return value


def _datetime(date: str, time: str, where: str, what: str) -> datetime:
    time = str(time).strip()
    whole, _, frac = time.partition(".")
    try:
        base = datetime.strptime(f"{str(date).strip()}{whole.ljust(6, '0')}", "%Y%m%d%H%M%S")
    except ValueError:
        raise DicomImportError(f"{where}: {what} {date!r} {time!r} is not a DICOM date and time") from None
    return base + timedelta(seconds=float(f"0.{frac}") if frac else 0.0)


def _scan_time(headers: list[pydicom.Dataset], where: str) -> tuple[datetime, list[str]]:
    first = headers[0]
    series = _datetime(_tag(first, "SeriesDate", where), _tag(first, "SeriesTime", where), where, "series time")
    acq = [
        _datetime(h.get("AcquisitionDate") or first.SeriesDate, h.AcquisitionTime, where, "acquisition time")
        for h in headers
        if h.get("AcquisitionTime")
    ]
    if acq and series > min(acq):
        return min(acq), [
            f"SeriesTime {series:%H:%M:%S} is after the earliest AcquisitionTime "
            f"{min(acq):%H:%M:%S}; the acquisition time is used as the scan time"
        ]
    return series, []


def _injection_time(first: pydicom.Dataset, where: str) -> datetime:
    info = _tag(first, "RadiopharmaceuticalInformationSequence", where)[0]
    if info.get("RadiopharmaceuticalStartDateTime"):
        text = str(info.RadiopharmaceuticalStartDateTime)
        return _datetime(text[:8], text[8:].split("+")[0].split("-")[0], where, "RadiopharmaceuticalStartDateTime")
    start = _tag(info, "RadiopharmaceuticalStartTime", where)
    return _datetime(_tag(first, "SeriesDate", where), start, where, "RadiopharmaceuticalStartTime")


def suv_inputs(headers: list[pydicom.Dataset], where: str) -> dict[str, Any]:
    """Every input of the SUV factor of one PET series, read from its headers.

    Args:
        headers: the series' headers (any order). where: ``patient X, series Y`` for messages.

    Returns:
        A JSON-ready dict: ``units``, and for BQML ``decay_correction``, ``patient_weight_kg``,
        ``injected_dose_bq``, ``half_life_s``, ``injection_time``, ``scan_time``,
        ``warnings``; for CNTS ``philips_suv_scale_factor``.
    """
    first = headers[0]
    units = str(_tag(first, "Units", where)).upper()
    if units == "GML":
        return {"units": units, "warnings": []}
    if units == "CNTS":
        if _PHILIPS_SUV_SCALE not in first:
            raise DicomImportError(
                f"{where}: Units CNTS needs the vendor's SUV scale factor (7053,1000), which is missing"
            )
        return {"units": units, "philips_suv_scale_factor": float(first[_PHILIPS_SUV_SCALE].value), "warnings": []}
    if units != "BQML":
        raise DicomImportError(f"{where}: Units {units!r} is not supported for SUV (GML, BQML or CNTS)")
    corrected = [str(v).upper() for v in _tag(first, "CorrectedImage", where)]
    for need in ("ATTN", "DECY"):
        if need not in corrected:
            raise DicomImportError(
                f"{where}: CorrectedImage {corrected} lacks {need}; SUV needs images "
                "corrected for attenuation and decay"
            )
    decay = str(_tag(first, "DecayCorrection", where)).upper()
    if decay not in ("START", "ADMIN"):
        raise DicomImportError(f"{where}: DecayCorrection {decay!r} is not START or ADMIN")
    info = _tag(first, "RadiopharmaceuticalInformationSequence", where)[0]
    scan, warnings = _scan_time(headers, where)
    return {
        "units": units,
        "decay_correction": decay,
        "patient_weight_kg": float(_tag(first, "PatientWeight", where)),
        "injected_dose_bq": float(_tag(info, "RadionuclideTotalDose", where)),
        "half_life_s": float(_tag(info, "RadionuclideHalfLife", where)),
        "injection_time": _injection_time(first, where).isoformat(),
        "scan_time": scan.isoformat(),
        "warnings": warnings,
    }


def suv_factor(inputs: dict[str, Any], where: str = "") -> float:
    """The factor that turns the rescaled pixel values into SUVbw (see the module doc)."""
    units = inputs["units"]
    if units == "GML":
        return 1.0
    if units == "CNTS":
        return float(inputs["philips_suv_scale_factor"])
    weight, dose, half = inputs["patient_weight_kg"], inputs["injected_dose_bq"], inputs["half_life_s"]
    for name, value in (("PatientWeight", weight), ("RadionuclideTotalDose", dose), ("RadionuclideHalfLife", half)):
        if not (math.isfinite(value) and value > 0):
            raise DicomImportError(f"{where}: {name} {value} is not a positive number")
    delay = (
        datetime.fromisoformat(inputs["scan_time"]) - datetime.fromisoformat(inputs["injection_time"])
    ).total_seconds()
    if delay < 0:
        raise DicomImportError(
            f"{where}: scan time {inputs['scan_time']} is before the injection {inputs['injection_time']}"
        )
    decayed = dose * 2.0 ** (-delay / half) if inputs["decay_correction"] == "START" else dose
    return weight * 1000.0 / decayed
