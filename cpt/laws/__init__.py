"""Mixture and scaling laws: forms, a robust fitter, and the critical mixture ratio behind `cpt fit`."""
