"""Evaluation of control: quantitative metrics and the synthetic world's exact re-annotation."""
