"""``stabilize doctor``: from a diagnosis to a verified cure.

`doctor` probes a run, tries the remedies its findings call for as short trials at the same budget and seed,
judges each by its outcome and its own verdict, and returns a `DoctorResult` (a ranked table, the winning
change, a plot). Models declare their structural variants with ``stabilize_variants()`` (`Variant`).
"""

from stabilize.doctor.remedies import Findings, Remedy, plan
from stabilize.doctor.repair import DoctorResult, doctor, repaired
from stabilize.doctor.trial import Trial, run_trial
from stabilize.models.variants import VARIANT_KINDS, Variant, declared_variants

__all__ = [
    "VARIANT_KINDS",
    "DoctorResult",
    "Findings",
    "Remedy",
    "Trial",
    "Variant",
    "declared_variants",
    "doctor",
    "plan",
    "repaired",
    "run_trial",
]
