"""Labelled synthetic 12-lead ECGs from a cardiac dipole model (the project's default data, SPEC 3.5).

(table filled in below)
"""
from .generator import LEADS, SyntheticSet, derive_limb_leads, generate_dataset, generate_record, split_of
from .labels import CLASS_NAMES, RHYTHMS, SUBCLASSES, SUBDIAGNOSTIC, SUPERCLASSES, TASKS

__all__ = ["SyntheticSet", "generate_dataset", "generate_record", "derive_limb_leads", "split_of", "LEADS",
           "CLASS_NAMES", "SUPERCLASSES", "SUBCLASSES", "SUBDIAGNOSTIC", "RHYTHMS", "TASKS"]
