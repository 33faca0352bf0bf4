"""Evaluation: reconstruction metrics (`metrics`, `perceptual`), the I3D network (`i3d`), FVD statistics (`fvd`)."""
