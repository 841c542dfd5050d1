"""Scaling-law experiments (PAPER.md section 4): grid sweeps (`sweep`), fits and plots of AUC
against FLOPs, length and depth (`fit`), and a compute-optimal size planner (`planner`)."""
