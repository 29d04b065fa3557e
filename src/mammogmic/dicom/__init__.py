"""DICOM results and PACS exchange: what a reading workstation can take back from ``mammogmic predict``.

* :mod:`mammogmic.dicom.results`: per study a Comprehensive SR (TID 1500 measurement report: breast- and
  image-level probabilities, the K retrieved patches as image regions on the source images) and per image a
  FRACTIONAL Segmentation with the benign and malignant saliency maps on the source pixel grid
  (``predict --dicom-out``; the ``dicom`` extra: highdicom).
* :mod:`mammogmic.dicom.web`: a study fetched from a PACS over DICOMweb (QIDO-RS, WADO-RS) and the results
  stored back (STOW-RS) (``predict --dicomweb``; the ``dicomweb`` extra: dicomweb-client).

Both modules import their extra at the top: import them only where the feature is used.
"""
