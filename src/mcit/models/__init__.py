"""Models: build or load a LLaVA + processor, apply a tuning mode, encode samples."""
