"""Scaling-law experiments (docs/paper.md section 4): grid sweeps (`sweep`), fits and plots of AUC
against FLOPs, length and depth (`fit`), and a compute-optimal size planner (`planner`)."""
