"""Evaluation: metrics, evaluation of a run, cost (FLOPs, latency), figures, slide reading,
prediction and the student/teacher cascade."""
