"""Everything measured on a trained run: robustness, strong attacks, corruptions, attribution, audits, certification."""
