"""From a clinic's DICOM to a HECKTOR 2022 training root.

Modules, one step each:

* :mod:`pipeline.dicom.scan`: every DICOM file under a folder, identified by its tags only
  (never by file or folder name), grouped by patient and series.
* :mod:`pipeline.dicom.volume`: one CT or PET series -> a SimpleITK image (slices sorted by
  position along the slice normal, rescale per slice, orientation and spacing checked).
* :mod:`pipeline.dicom.suv`: body-weight SUV after the QIBA vendor-neutral calculation.
* :mod:`pipeline.dicom.rtstruct`: RT Structure Set contours -> label mask on the CT grid
  (voxel centres inside the polygons, even-odd rule).
* :mod:`pipeline.dicom.seg`: DICOM SEG segments -> masks on the CT grid (voxel centres in set
  SEG pixels).
* :mod:`pipeline.dicom.cases`: which series of a patient are its CT, PET and contours.
* :mod:`pipeline.dicom.clinical`: clinical CSV rows from the headers, ``--clinical`` merge,
  pseudonyms.
* :mod:`pipeline.dicom.convert`: the whole import (:func:`import_dicom`), written to a
  temporary sibling folder and renamed into place, so a refusal leaves nothing behind.
* :mod:`pipeline.dicom.demo_writer`: the synthetic demo cohort written as DICOM.

Every refusal is a :class:`DicomImportError` naming the patient, the series and the figure.
"""

from pipeline.dicom.errors import DicomImportError

__all__ = ["DicomImportError"]
