"""Distillation techniques: knowledge distillation (a training loss) and parameter distillation (a student built from the teacher)."""
