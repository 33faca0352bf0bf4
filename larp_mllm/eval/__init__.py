"""Evaluation: reconstruction metrics (`metrics`, `perceptual`), the I3D network (`i3d`), FVD statistics and the I3D
input (`fvd`), and the two protocols: rFVD of a tokenizer (`reconstruction`) and the gFVD real set (`real_set`)."""
